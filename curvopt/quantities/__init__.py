"""Layer-agnostic formulas: each file turns layouts (from :mod:`curvopt.rules`) into quantities.

* :mod:`.first_order` -- BatchGrad, SumGradSquared, Variance, BatchL2Grad from the gradient.
* :mod:`.second_order` -- the cotangent columns (exact/MC loss-Hessian square roots, KFRA,
  activation residuals) sent back through autograd, and DiagGGN, Kronecker factors and
  DiagHessian formed from them.
"""

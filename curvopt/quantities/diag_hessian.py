"""DiagHessian residuals placeholder."""
import torch


def propagate(col, lrec, recs, g_out):
    return None


def residual_diagonal(items):
    return torch.zeros_like(items[0][1].param)

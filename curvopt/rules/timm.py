"""timm's normalization layers, registered lazily (``timm`` is never imported here).

``timm.layers.norm.LayerNorm2d`` (ConvNeXt, and torchvision's ConvNeXt copy
``torchvision.models.convnext.LayerNorm2d``) is an ``nn.LayerNorm(C)`` subclass whose
``forward`` permutes ``[N, C, *spatial]`` to channels-last, normalizes over ``C`` and
permutes back.  Its affine parameters are the :class:`~.layout.Elementwise` layout
over channels, with the spatial positions as rows:

.. math:: \\nabla\\gamma_n = \\sum_p r_{n,p} \\odot \\hat x_{n,p},\\qquad
          \\nabla\\beta_n = \\sum_p r_{n,p},

``r_{n,p}, \\hat x_{n,p} \\in \\mathbb R^C`` the output cotangent and the normalized
input at position ``p``.  timm's channels-last ``LayerNorm`` (an ``nn.LayerNorm``
that overrides ``forward`` with the same maths) gets ``nn.LayerNorm``'s rule.
"""

from __future__ import annotations

import torch.nn.functional as F

from .layout import Rule
from .norm import LayerNormRule, _affine
from .registry import register_lazy


@register_lazy("timm.layers.norm", "LayerNorm2d")
@register_lazy("torchvision.models.convnext", "LayerNorm2d")
class LayerNorm2dRule(Rule):
    def layouts(self, module, args, kwargs, output):
        x = args[0]  # [N, C, *spatial]
        N, C = x.shape[:2]
        xhat = F.layer_norm(x.movedim(1, -1), module.normalized_shape, None, None, module.eps)
        return _affine(module, N, xhat.reshape(N, -1, C),
                       lambda cot: cot.reshape(cot.shape[0], N, C, -1).transpose(2, 3))


register_lazy("timm.layers.norm", "LayerNorm")(LayerNormRule)

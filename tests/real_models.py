"""Tiny copies of the vision architectures people train, for the engine and optimizer tests.

torchvision and timm are not dependencies, so their blocks are written out here
following their code (torchvision 0.20 ``resnet.BasicBlock``,
``mobilenetv3.InvertedResidual`` with ``ops.SqueezeExcitation``,
``vision_transformer.EncoderBlock``/``Encoder``/``VisionTransformer``; timm 1.0
``convnext.ConvNeXtBlock`` with ``layers.Mlp``, ``LayerNorm`` and ``LayerNorm2d``):
the same module structure, parameter names, in-place ops (``out += identity``,
``ReLU(inplace=True)``), parameters owned by containers (``class_token``,
``pos_embedding``, ``gamma``) and functional calls, only smaller.

:func:`build` gives a seeded :class:`Problem` (model, ``CrossEntropyLoss``, a
fixed batch): ``block=True`` one block of each kind wrapped as a classifier
(stem + block + global pooling + Linear head), ``block=False`` a small full
model (2 residual stages, 2 inverted residuals, 2 encoder blocks, 2 ConvNeXt
blocks).  Defaults are the test sizes (4-16 channels, 8x8 images, 5 tokens of
dimension 16, N=4); ``width``/``image``/``N`` scale them up for the benchmarks.
``perturb=True`` (the default) moves every norm layer's affine parameters and
running statistics, the class token and the layer scale away from their
identity-like initial values, so that no term of a test is trivially zero or one.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

NAMES = ("resnet", "mobilenet", "vit", "convnext")


# --------------------------------------------------------------------------- ResNet (torchvision)


def conv3x3(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)


def conv1x1(in_planes: int, out_planes: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)


class BasicBlock(nn.Module):
    """torchvision's ResNet basic block: conv-BN-ReLU-conv-BN, ``out += identity``, ReLU."""

    def __init__(self, inplanes: int, planes: int, stride: int = 1, downsample=None):
        super().__init__()
        self.conv1 = conv3x3(inplanes, planes, stride)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = conv3x3(planes, planes)
        self.bn2 = nn.BatchNorm2d(planes)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        identity = x
        out = self.conv1(x)
        out = self.bn1(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn2(out)
        if self.downsample is not None:
            identity = self.downsample(x)
        out += identity
        out = self.relu(out)
        return out


class ResNet(nn.Module):
    """torchvision's ResNet layout: conv1-bn1-relu-maxpool stem, stages, avgpool, fc."""

    def __init__(self, width: int, stages: int, classes: int, maxpool: bool):
        super().__init__()
        self.conv1 = conv3x3(3, width)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        self.maxpool = nn.MaxPool2d(3, stride=2, padding=1) if maxpool else nn.Identity()
        inplanes = width
        for i in range(stages):
            planes, stride = width * 2**i, 1 if i == 0 else 2
            down = None
            if stride != 1 or inplanes != planes:
                down = nn.Sequential(conv1x1(inplanes, planes, stride), nn.BatchNorm2d(planes))
            setattr(self, f"layer{i + 1}", nn.Sequential(BasicBlock(inplanes, planes, stride,
                                                                    down)))
            inplanes = planes
        self.stages = stages
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(inplanes, classes)

    def forward(self, x: Tensor) -> Tensor:
        x = self.maxpool(self.relu(self.bn1(self.conv1(x))))
        for i in range(self.stages):
            x = getattr(self, f"layer{i + 1}")(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.fc(x)


# --------------------------------------------------------------------------- MobileNetV3 (torchvision)


def _make_divisible(v: float, divisor: int = 8, min_value=None) -> int:
    min_value = min_value or divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class Conv2dNormActivation(nn.Sequential):
    """torchvision.ops.Conv2dNormActivation: Conv2d (no bias before a norm), norm, activation."""

    def __init__(self, cin, cout, kernel_size=3, stride=1, groups=1, norm_layer=nn.BatchNorm2d,
                 activation_layer=nn.ReLU):
        padding = (kernel_size - 1) // 2
        layers = [nn.Conv2d(cin, cout, kernel_size, stride, padding, groups=groups,
                            bias=norm_layer is None)]
        if norm_layer is not None:
            layers.append(norm_layer(cout))
        if activation_layer is not None:
            layers.append(activation_layer(inplace=True))
        super().__init__(*layers)


class SqueezeExcitation(nn.Module):
    """torchvision.ops.SqueezeExcitation: ``input * scale_act(fc2(act(fc1(avgpool(input)))))``."""

    def __init__(self, input_channels, squeeze_channels, activation=nn.ReLU,
                 scale_activation=nn.Sigmoid):
        super().__init__()
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc1 = nn.Conv2d(input_channels, squeeze_channels, 1)
        self.fc2 = nn.Conv2d(squeeze_channels, input_channels, 1)
        self.activation = activation()
        self.scale_activation = scale_activation()

    def _scale(self, input: Tensor) -> Tensor:
        scale = self.avgpool(input)
        scale = self.fc1(scale)
        scale = self.activation(scale)
        scale = self.fc2(scale)
        return self.scale_activation(scale)

    def forward(self, input: Tensor) -> Tensor:
        scale = self._scale(input)
        return scale * input


#: MobileNetV3's norm layer
_MNV3_NORM = partial(nn.BatchNorm2d, eps=0.001, momentum=0.01)


class InvertedResidual(nn.Module):
    """MobileNetV3's block: 1x1 expand, depthwise kxk, squeeze-excitation, 1x1 project."""

    def __init__(self, cin, expanded, cout, kernel, stride, use_se, use_hs):
        super().__init__()
        self.use_res_connect = stride == 1 and cin == cout
        act = nn.Hardswish if use_hs else nn.ReLU
        layers: list[nn.Module] = []
        if expanded != cin:
            layers.append(Conv2dNormActivation(cin, expanded, 1, norm_layer=_MNV3_NORM,
                                               activation_layer=act))
        layers.append(Conv2dNormActivation(expanded, expanded, kernel, stride, groups=expanded,
                                           norm_layer=_MNV3_NORM, activation_layer=act))
        if use_se:
            squeeze = _make_divisible(expanded // 4, 8)
            layers.append(SqueezeExcitation(expanded, squeeze, scale_activation=nn.Hardsigmoid))
        layers.append(Conv2dNormActivation(expanded, cout, 1, norm_layer=_MNV3_NORM,
                                           activation_layer=None))
        self.block = nn.Sequential(*layers)

    def forward(self, input: Tensor) -> Tensor:
        result = self.block(input)
        if self.use_res_connect:
            result += input
        return result


class MobileNetV3(nn.Module):
    """torchvision's MobileNetV3 layout: features (stem, blocks, 1x1 conv), avgpool, classifier.

    The classifier's Dropout is ``p=0`` so that a fixed batch gives a deterministic loss.
    """

    def __init__(self, width: int, blocks: list, classes: int, last: int | None):
        super().__init__()
        layers: list[nn.Module] = [Conv2dNormActivation(3, width, 3, norm_layer=_MNV3_NORM,
                                                        activation_layer=nn.Hardswish)]
        c = width
        for expanded, cout, kernel, stride, use_se, use_hs in blocks:
            layers.append(InvertedResidual(c, expanded, cout, kernel, stride, use_se, use_hs))
            c = cout
        if last is not None:
            layers.append(Conv2dNormActivation(c, 6 * c, 1, norm_layer=_MNV3_NORM,
                                               activation_layer=nn.Hardswish))
            c = 6 * c
        self.features = nn.Sequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        if last is None:
            self.classifier = nn.Sequential(nn.Linear(c, classes))
        else:
            self.classifier = nn.Sequential(nn.Linear(c, last), nn.Hardswish(inplace=True),
                                            nn.Dropout(p=0.0, inplace=True),
                                            nn.Linear(last, classes))

    def forward(self, x: Tensor) -> Tensor:
        x = self.features(x)
        x = self.avgpool(x)
        x = torch.flatten(x, 1)
        return self.classifier(x)


# --------------------------------------------------------------------------- ViT (torchvision)


class MLPBlock(nn.Sequential):
    """torchvision's ``MLP(in_dim, [mlp_dim, in_dim], GELU, dropout)``: Linear GELU Dropout Linear Dropout."""

    def __init__(self, in_dim: int, mlp_dim: int, dropout: float = 0.0):
        super().__init__(nn.Linear(in_dim, mlp_dim), nn.GELU(), nn.Dropout(dropout),
                         nn.Linear(mlp_dim, in_dim), nn.Dropout(dropout))


class EncoderBlock(nn.Module):
    """torchvision's ViT encoder block on ``nn.MultiheadAttention(batch_first=True)``."""

    def __init__(self, num_heads: int, hidden_dim: int, mlp_dim: int):
        super().__init__()
        self.num_heads = num_heads
        self.ln_1 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.self_attention = nn.MultiheadAttention(hidden_dim, num_heads, dropout=0.0,
                                                    batch_first=True)
        self.dropout = nn.Dropout(0.0)
        self.ln_2 = nn.LayerNorm(hidden_dim, eps=1e-6)
        self.mlp = MLPBlock(hidden_dim, mlp_dim)

    def forward(self, input: Tensor) -> Tensor:
        torch._assert(input.dim() == 3, f"Expected (batch, seq, hidden), got {input.shape}")
        x = self.ln_1(input)
        x, _ = self.self_attention(x, x, x, need_weights=False)
        x = self.dropout(x)
        x = x + input
        y = self.ln_2(x)
        y = self.mlp(y)
        return x + y


class Encoder(nn.Module):
    """torchvision's ViT encoder: owns ``pos_embedding`` ``[1, S, D]`` (added in forward)."""

    def __init__(self, seq_length, num_layers, num_heads, hidden_dim, mlp_dim):
        super().__init__()
        self.pos_embedding = nn.Parameter(torch.empty(1, seq_length, hidden_dim).normal_(std=0.02))
        self.dropout = nn.Dropout(0.0)
        self.layers = nn.Sequential(OrderedDict(
            (f"encoder_layer_{i}", EncoderBlock(num_heads, hidden_dim, mlp_dim))
            for i in range(num_layers)))
        self.ln = nn.LayerNorm(hidden_dim, eps=1e-6)

    def forward(self, input: Tensor) -> Tensor:
        input = input + self.pos_embedding
        return self.ln(self.layers(self.dropout(input)))


class VisionTransformer(nn.Module):
    """torchvision's ViT: patchify conv, ``class_token`` ``[1, 1, D]`` (expanded and
    concatenated), encoder, head on the class token."""

    def __init__(self, image_size, patch_size, num_layers, num_heads, hidden_dim, mlp_dim,
                 classes):
        super().__init__()
        self.image_size, self.patch_size, self.hidden_dim = image_size, patch_size, hidden_dim
        self.conv_proj = nn.Conv2d(3, hidden_dim, patch_size, stride=patch_size)
        seq_length = (image_size // patch_size) ** 2 + 1
        self.class_token = nn.Parameter(torch.zeros(1, 1, hidden_dim))
        self.encoder = Encoder(seq_length, num_layers, num_heads, hidden_dim, mlp_dim)
        self.seq_length = seq_length
        self.heads = nn.Sequential(OrderedDict(head=nn.Linear(hidden_dim, classes)))

    def _process_input(self, x: Tensor) -> Tensor:
        n, _, h, w = x.shape
        p = self.patch_size
        x = self.conv_proj(x)
        x = x.reshape(n, self.hidden_dim, (h // p) * (w // p))
        return x.permute(0, 2, 1)

    def forward(self, x: Tensor) -> Tensor:
        x = self._process_input(x)
        n = x.shape[0]
        batch_class_token = self.class_token.expand(n, -1, -1)
        x = torch.cat([batch_class_token, x], dim=1)
        x = self.encoder(x)
        x = x[:, 0]
        return self.heads(x)


# --------------------------------------------------------------------------- ConvNeXt (timm)


class LayerNorm(nn.LayerNorm):
    """timm.layers.LayerNorm: channels-last LayerNorm with its own ``forward``."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class LayerNorm2d(nn.LayerNorm):
    """timm.layers.LayerNorm2d: LayerNorm over the channels of an NCHW tensor (permutes)."""

    def __init__(self, num_channels, eps=1e-6, affine=True):
        super().__init__(num_channels, eps=eps, elementwise_affine=affine)

    def forward(self, x: Tensor) -> Tensor:
        x = x.permute(0, 2, 3, 1)
        x = F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return x.permute(0, 3, 1, 2)


# The real classes live in timm.layers.norm; curvopt (like any library that dispatches on
# the class of a module of an optional package) may recognise them by that path.
LayerNorm.__module__ = LayerNorm2d.__module__ = "timm.layers.norm"


class Mlp(nn.Module):
    """timm.layers.Mlp: fc1, act, drop1, norm (Identity), fc2, drop2."""

    def __init__(self, in_features, hidden_features):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.drop1 = nn.Dropout(0.0)
        self.norm = nn.Identity()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop2 = nn.Dropout(0.0)

    def forward(self, x: Tensor) -> Tensor:
        return self.drop2(self.fc2(self.norm(self.drop1(self.act(self.fc1(x))))))


class ConvNeXtBlock(nn.Module):
    """timm's ConvNeXt block (``conv_mlp=False``): depthwise 7x7, channels-last LayerNorm + Mlp,
    layer scale ``gamma`` applied as ``x.mul(gamma.reshape(1, -1, 1, 1))``, shortcut."""

    def __init__(self, chs: int, kernel_size: int = 7, mlp_ratio: float = 4,
                 ls_init_value: float | None = 1e-6):
        super().__init__()
        self.conv_dw = nn.Conv2d(chs, chs, kernel_size, padding=kernel_size // 2, groups=chs)
        self.norm = LayerNorm(chs)
        self.mlp = Mlp(chs, int(mlp_ratio * chs))
        self.gamma = nn.Parameter(ls_init_value * torch.ones(chs)) if ls_init_value else None
        self.shortcut = nn.Identity()
        self.drop_path = nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        shortcut = x
        x = self.conv_dw(x)
        x = x.permute(0, 2, 3, 1)
        x = self.norm(x)
        x = self.mlp(x)
        x = x.permute(0, 3, 1, 2)
        if self.gamma is not None:
            x = x.mul(self.gamma.reshape(1, -1, 1, 1))
        return self.drop_path(x) + self.shortcut(shortcut)


class ConvNeXt(nn.Module):
    """timm's ConvNeXt layout: patch stem (conv + LayerNorm2d), one stage of blocks, and the
    ``NormMlpClassifierHead`` (global average pool, LayerNorm2d, flatten, fc)."""

    def __init__(self, width, depth, classes, patch_size=2, ls_init_value=1e-6):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, patch_size, stride=patch_size),
                                  LayerNorm2d(width))
        self.stages = nn.Sequential(nn.Sequential(OrderedDict(blocks=nn.Sequential(
            *[ConvNeXtBlock(width, ls_init_value=ls_init_value) for _ in range(depth)]))))
        self.head = nn.Sequential(OrderedDict(global_pool=nn.AdaptiveAvgPool2d(1),
                                              norm=LayerNorm2d(width), flatten=nn.Flatten(1),
                                              fc=nn.Linear(width, classes)))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.stages(self.stem(x)))


# --------------------------------------------------------------------------- problems


@dataclass
class Problem:
    name: str
    model: nn.Module
    loss_fn: nn.Module
    X: Tensor
    y: Tensor


def _perturb(model: nn.Module, g: torch.Generator) -> None:
    """Move parameters and buffers that start at 0/1 (norms, tokens, layer scale) off them."""
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)) and m.weight is not None:
                m.weight.copy_(1 + 0.3 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.3 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.2 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
        for name, p in model.named_parameters():
            if name.endswith(("class_token", "gamma")):
                p.copy_(0.5 + 0.5 * torch.randn(p.shape, generator=g))
            elif name.endswith("pos_embedding"):
                p.copy_(0.5 * torch.randn(p.shape, generator=g))


def make_model(name: str, block: bool = True, width: int = 8, image: int = 8,
               classes: int = 3) -> nn.Module:
    """The (untrained, torch-default-initialised) model ``name`` in :data:`NAMES`."""
    if name == "resnet":
        if block:
            return ResNet(width, 1, classes, maxpool=False)
        return ResNet(width, 2, classes, maxpool=True)
    if name == "mobilenet":
        if block:  # stem, one inverted residual with SE and Hardswish, head
            return MobileNetV3(width, [(2 * width, width, 3, 1, True, True)], classes, None)
        return MobileNetV3(width, [(2 * width, width, 3, 1, True, True),
                                   (3 * width, 2 * width, 3, 2, True, False)], classes, 2 * width)
    if name == "vit":
        dim = 2 * width
        return VisionTransformer(image, 4, 1 if block else 2, 2, dim, 2 * dim, classes)
    if name == "convnext":
        return ConvNeXt(width, 1 if block else 2, classes)
    raise ValueError(f"unknown model {name!r}; choose from {NAMES}")


def build(name: str, block: bool = True, N: int = 4, dtype=torch.float64, train: bool = False,
          seed: int = 0, width: int = 8, image: int = 8, classes: int = 3,
          perturb: bool = True) -> Problem:
    """Model ``name`` (a block classifier or the small full model), seeded, in ``dtype``, in
    train or eval mode, with ``CrossEntropyLoss`` (mean) and a fixed batch ``[N, 3, image, image]``."""
    torch.manual_seed(seed)
    model = make_model(name, block, width, image, classes)
    g = torch.Generator().manual_seed(seed + 1)
    if perturb:
        _perturb(model, g)
    model = model.to(dtype).train(train)
    X = torch.randn(N, 3, image, image, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (N,), generator=g)
    return Problem(name, model, nn.CrossEntropyLoss(), X, y)

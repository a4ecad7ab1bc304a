"""Small float64 models, inputs and losses shared by the test files.

A :class:`Case` is a factory: ``case.build(N)`` returns a fresh, seeded model
in eval mode (float64) and an input batch of size ``N``.  Targets are made
from the output shape by :func:`make_target`, so every case works with
``MSELoss``; ``case.ce`` says whether its output is ``[N, C, ...]`` logits
for ``CrossEntropyLoss``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

DTYPE = torch.float64


# --------------------------------------------------------------------------- custom modules


class RMSNorm(nn.Module):
    """Hand-written RMSNorm with its own parameter (no rule can know it)."""

    def __init__(self, d: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(1.0 + 0.3 * torch.randn(d))
        self.eps = eps

    def forward(self, x):
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


class ScaleShift(nn.Module):
    """Custom parameterized elementwise affine map ``x * a + b`` on the last axis."""

    def __init__(self, d: int):
        super().__init__()
        self.a = nn.Parameter(1.0 + 0.5 * torch.randn(d))
        self.b = nn.Parameter(0.5 * torch.randn(d))

    def forward(self, x):
        return x * self.a + self.b


class Attention(nn.Module):
    """``nn.MultiheadAttention(batch_first=True)`` self-attention, mean over tokens, linear head."""

    def __init__(self, d=4, heads=2, classes=3):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, heads, batch_first=True)
        self.head = nn.Linear(d, classes)

    def forward(self, x):
        a, _ = self.attn(x, x, x, need_weights=False)
        return self.head(torch.tanh(a).mean(1))


class Residual(nn.Module):
    """``x + block(x)``."""

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x):
        return x + self.block(x)


class CatBranches(nn.Module):
    """``torch.cat([a(x), b(x)], dim)``."""

    def __init__(self, a: nn.Module, b: nn.Module, dim: int = 1):
        super().__init__()
        self.a, self.b, self.dim = a, b, dim

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], self.dim)


class FunctionalMLP(nn.Module):
    """Modules glued by functional ops (``torch.relu``, ``torch.tanh``, ``*``)."""

    def __init__(self):
        super().__init__()
        self.l1 = nn.Linear(5, 4)
        self.l2 = nn.Linear(4, 4)
        self.l3 = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.relu(self.l1(x))
        h = torch.tanh(self.l2(h)) * 2.0
        return self.l3(h)


class FunctionalCNN(nn.Module):
    """Conv, ``torch.relu``, ``x.flatten(1)``, Linear."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(2, 3, 3)
        self.fc = nn.Linear(3 * 3 * 3, 3)

    def forward(self, x):
        return self.fc(torch.relu(self.conv(x)).flatten(1))


class SharedLinear(nn.Module):
    """A Linear applied twice in one forward (weight sharing)."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(5, 4)
        self.shared = nn.Linear(4, 4)
        self.out = nn.Linear(4, 3)

    def forward(self, x):
        h = torch.tanh(self.inp(x))
        h = torch.tanh(self.shared(h))
        h = torch.tanh(self.shared(h))
        return self.out(h)


class SeqMean(nn.Module):
    """Linear on ``[N, S, D]`` (3-D input), tanh, mean over S, Linear head."""

    def __init__(self, d_in=4, d_hidden=5, classes=3):
        super().__init__()
        self.l1 = nn.Linear(d_in, d_hidden)
        self.l2 = nn.Linear(d_hidden, classes)

    def forward(self, x):
        return self.l2(torch.tanh(self.l1(x)).mean(1))


class EmbeddingBag(nn.Module):
    """Embedding with padding_idx on ``[N, S]`` indices, mean over S, Linear head."""

    def __init__(self, vocab=7, dim=4, classes=3, padding_idx=0):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim, padding_idx=padding_idx)
        self.fc = nn.Linear(dim, classes)

    def forward(self, idx):
        return self.fc(torch.tanh(self.emb(idx)).mean(1))


class EmbeddingFlat(nn.Module):
    """Embedding (no padding) on ``[N, S]``, flatten, Linear."""

    def __init__(self, vocab=6, dim=3, seq=3, classes=3):
        super().__init__()
        self.emb = nn.Embedding(vocab, dim)
        self.fc = nn.Linear(dim * seq, classes)

    def forward(self, idx):
        return self.fc(self.emb(idx).flatten(1))


# --------------------------------------------------------------------------- case type


@dataclass
class Case:
    name: str
    make_model: Callable[[], nn.Module]
    make_input: Callable[[int], Tensor]
    ce: bool = True
    tags: frozenset = field(default_factory=frozenset)
    seed: int = 0

    def build(self, N: int = 3, seed: int | None = None) -> tuple[nn.Module, Tensor]:
        s = self.seed if seed is None else seed
        torch.manual_seed(1000 + s)
        model = self.make_model().to(DTYPE).eval()
        _randomize_buffers(model)
        torch.manual_seed(2000 + s + N)
        X = self.make_input(N)
        if X.is_floating_point():
            X = X.to(DTYPE)
        return model, X

    def __repr__(self):
        return self.name


def _randomize_buffers(model: nn.Module):
    """Non-trivial running statistics for BatchNorm (eval mode uses them)."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            with torch.no_grad():
                m.running_mean.normal_(0.0, 0.5)
                m.running_var.uniform_(0.5, 2.0)


def randn(*shape):
    return lambda N: torch.randn(N, *shape, dtype=DTYPE)


def randint(high, *shape, low=0):
    return lambda N: torch.randint(low, high, (N, *shape))


# --------------------------------------------------------------------------- MLPs with activations

ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "sigmoid": nn.Sigmoid,
    "tanh": nn.Tanh,
    "elu": lambda: nn.ELU(alpha=0.7),
    "leakyrelu": lambda: nn.LeakyReLU(0.1),
    "selu": nn.SELU,
    "softplus": lambda: nn.Softplus(beta=1.5),
    "gelu": nn.GELU,
    "gelu_tanh": lambda: nn.GELU(approximate="tanh"),
    "silu": nn.SiLU,
}


def mlp(act: str, sizes=(5, 4, 4, 3)) -> Callable[[], nn.Module]:
    def make():
        layers = []
        for i in range(len(sizes) - 1):
            layers.append(nn.Linear(sizes[i], sizes[i + 1]))
            if i < len(sizes) - 2:
                layers.append(ACTIVATIONS[act]())
        return nn.Sequential(*layers)

    return make


MLP_CASES = [
    Case(f"mlp_{a}", mlp(a), randn(5), tags=frozenset({"mlp", "act", "seq"}))
    for a in ACTIVATIONS
]

# --------------------------------------------------------------------------- other dense


def _padded_idx(N):
    """``[N, 4]`` indices in [0, 7) with the padding index 0 in column 0."""
    idx = torch.randint(1, 7, (N, 4))
    idx[:, 0] = 0
    return idx


def _linear_nobias():
    return nn.Sequential(nn.Linear(5, 4, bias=False), nn.Tanh(), nn.Linear(4, 3, bias=False))


def _dropout():
    return nn.Sequential(nn.Linear(5, 4), nn.Dropout(0.5), nn.ReLU(), nn.Linear(4, 3))


def _linear3d_out():
    return nn.Sequential(nn.Linear(4, 5), nn.Sigmoid(), nn.Linear(5, 3))


def _layernorm(**kw):
    return lambda: nn.Sequential(nn.Linear(5, 4), nn.LayerNorm(4, **kw), nn.Tanh(), nn.Linear(4, 3))


def _layernorm_2d():
    return nn.Sequential(nn.Linear(4, 4), nn.LayerNorm((3, 4)), nn.Tanh(), nn.Flatten(),
                         nn.Linear(12, 3))


def _bn1d(affine=True):
    return lambda: nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, affine=affine), nn.Sigmoid(),
                                 nn.Linear(4, 3))


def _rmsnorm():
    return nn.Sequential(nn.Linear(5, 4), RMSNorm(4), nn.Tanh(), nn.Linear(4, 3))


def _scaleshift():
    return nn.Sequential(nn.Linear(5, 4), ScaleShift(4), nn.Tanh(), nn.Linear(4, 3))


def _residual_mlp():
    return nn.Sequential(
        nn.Linear(5, 4),
        nn.Tanh(),
        Residual(nn.Sequential(nn.Linear(4, 4), nn.Sigmoid(), nn.Linear(4, 4))),
        nn.ReLU(),
        Residual(nn.Sequential(nn.Linear(4, 4), nn.ELU())),
        nn.Linear(4, 3),
    )


def _branch_cat():
    return nn.Sequential(
        CatBranches(nn.Linear(5, 3), nn.Sequential(nn.Linear(5, 2), nn.Tanh())),
        nn.Sigmoid(),
        nn.Linear(5, 3),
    )


DENSE_CASES = [
    Case("linear_nobias", _linear_nobias, randn(5), tags=frozenset({"mlp", "seq"})),
    Case("dropout_eval", _dropout, randn(5), tags=frozenset({"mlp", "seq"})),
    Case("linear3d_mean", SeqMean, randn(3, 4), tags=frozenset({"seq3d"})),
    # output [N, S, 3]: for MSE only (CE would read S as classes)
    Case("linear3d_out", _linear3d_out, randn(3, 4), ce=False, tags=frozenset({"seq3d"})),
    Case("layernorm", _layernorm(), randn(5), tags=frozenset({"norm"})),
    Case("layernorm_noaffine", _layernorm(elementwise_affine=False), randn(5),
         tags=frozenset({"norm"})),
    Case("layernorm_nobias", _layernorm(bias=False), randn(5), tags=frozenset({"norm"})),
    Case("layernorm_2d", _layernorm_2d, randn(3, 4), tags=frozenset({"norm"})),
    Case("batchnorm1d_eval", _bn1d(), randn(5), tags=frozenset({"norm", "bn"})),
    Case("batchnorm1d_eval_noaffine", _bn1d(False), randn(5), tags=frozenset({"norm", "bn"})),
    Case("rmsnorm_custom", _rmsnorm, randn(5), tags=frozenset({"custom"})),
    Case("scaleshift_custom", _scaleshift, randn(5), tags=frozenset({"custom"})),
    Case("attention", Attention, randn(3, 4), tags=frozenset({"custom", "attention"})),
    Case("residual_mlp", _residual_mlp, randn(5), tags=frozenset({"residual"})),
    Case("branch_cat", _branch_cat, randn(5), tags=frozenset({"residual"})),
    Case("functional_mlp", FunctionalMLP, randn(5), tags=frozenset({"functional"})),
    Case("weight_sharing", SharedLinear, randn(5), tags=frozenset({"functional", "shared"})),
    Case("embedding_padding", EmbeddingBag, _padded_idx, tags=frozenset({"embedding"})),
    Case("embedding_flat", EmbeddingFlat, randint(6, 3), tags=frozenset({"embedding"})),
]

# --------------------------------------------------------------------------- convolutions


def conv_net(conv: Callable[[], nn.Module], in_shape, act=nn.ReLU, classes=3, extra=()):
    """``conv -> act -> (extra) -> Flatten -> Linear``; the Linear size from a dry run."""

    def make():
        c = conv()
        body = [c, act(), *[e() for e in extra]]
        with torch.no_grad():
            n_flat = nn.Sequential(*body)(torch.zeros(1, *in_shape)).numel()
        return nn.Sequential(*body, nn.Flatten(), nn.Linear(n_flat, classes))

    return make


def _conv_case(name, conv, in_shape, tags=(), **kw):
    return Case(name, conv_net(conv, in_shape, **kw), randn(*in_shape),
                tags=frozenset({"conv", "seq", *tags}))


CONV_CASES = [
    _conv_case("conv1d", lambda: nn.Conv1d(2, 3, 3, stride=2, padding=1), (2, 7)),
    _conv_case("conv1d_same_reflect",
               lambda: nn.Conv1d(2, 2, 3, padding="same", padding_mode="reflect"), (2, 5),
               act=nn.Tanh),
    _conv_case("conv2d", lambda: nn.Conv2d(2, 3, 3, padding=1), (2, 4, 4), act=nn.Tanh),
    _conv_case("conv2d_nobias", lambda: nn.Conv2d(2, 2, 2, bias=False), (2, 3, 3)),
    _conv_case("conv2d_stride_dilation",
               lambda: nn.Conv2d(2, 3, 3, stride=2, dilation=2, padding=2), (2, 5, 5)),
    _conv_case("conv2d_same_even_kernel", lambda: nn.Conv2d(2, 2, (2, 3), padding="same"),
               (2, 3, 4), act=nn.Sigmoid),
    _conv_case("conv2d_reflect",
               lambda: nn.Conv2d(2, 2, 3, padding=1, padding_mode="reflect"), (2, 3, 3)),
    _conv_case("conv2d_circular",
               lambda: nn.Conv2d(2, 2, 3, padding=(1, 2), padding_mode="circular"), (2, 3, 3)),
    _conv_case("conv2d_replicate",
               lambda: nn.Conv2d(2, 2, 2, padding=1, padding_mode="replicate"), (2, 3, 3)),
    _conv_case("conv2d_groups", lambda: nn.Conv2d(4, 4, 2, groups=2), (4, 3, 3),
               tags=("groups",)),
    _conv_case("conv2d_depthwise", lambda: nn.Conv2d(2, 4, 2, groups=2, stride=2), (2, 4, 4),
               tags=("groups",)),
    _conv_case("conv3d", lambda: nn.Conv3d(2, 2, 2, padding=1), (2, 2, 2, 3)),
    _conv_case("conv3d_stride_groups", lambda: nn.Conv3d(2, 2, 2, stride=2, groups=2),
               (2, 3, 3, 3), tags=("groups",)),
    _conv_case("convT1d", lambda: nn.ConvTranspose1d(2, 3, 3, stride=2, output_padding=1),
               (2, 3), tags=("convT",)),
    _conv_case("convT2d",
               lambda: nn.ConvTranspose2d(2, 2, 3, stride=2, padding=1, output_padding=1),
               (2, 2, 2), act=nn.Tanh, tags=("convT",)),
    _conv_case("convT2d_dilation", lambda: nn.ConvTranspose2d(2, 2, 2, dilation=2), (2, 2, 2),
               tags=("convT",)),
    _conv_case("convT2d_groups",
               lambda: nn.ConvTranspose2d(4, 2, 2, groups=2, stride=2, bias=False), (4, 2, 2),
               tags=("convT", "groups")),
    _conv_case("convT3d", lambda: nn.ConvTranspose3d(2, 2, 2, stride=2), (2, 1, 2, 2),
               tags=("convT",)),
    _conv_case("groupnorm",
               lambda: nn.Sequential(nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4)), (2, 3, 3),
               tags=("norm",)),
    _conv_case("groupnorm_noaffine",
               lambda: nn.Sequential(nn.Conv2d(2, 4, 2), nn.GroupNorm(2, 4, affine=False)),
               (2, 3, 3), tags=("norm",)),
    _conv_case("batchnorm2d_eval",
               lambda: nn.Sequential(nn.Conv2d(2, 3, 2), nn.BatchNorm2d(3)), (2, 3, 3),
               tags=("norm", "bn")),
    _conv_case("residual_conv",
               lambda: nn.Sequential(nn.Conv2d(2, 2, 3, padding=1),
                                     Residual(nn.Sequential(nn.Tanh(),
                                                            nn.Conv2d(2, 2, 3, padding=1)))),
               (2, 3, 3), tags=("residual",)),
    Case("functional_cnn", FunctionalCNN, randn(2, 5, 5), tags=frozenset({"conv", "functional"})),
    # output [N, C, L]: cross-entropy over an extra axis
    Case("conv1d_logits_nd", lambda: nn.Sequential(nn.Conv1d(2, 4, 3, padding=1), nn.Tanh(),
                                                   nn.Conv1d(4, 3, 1)),
         randn(2, 4), tags=frozenset({"conv", "nd_out"})),
]

# --------------------------------------------------------------------------- pooling

POOLS: dict[str, tuple[Callable[[], nn.Module], Callable[[], nn.Module], tuple]] = {
    "maxpool1d": (lambda: nn.Conv1d(2, 2, 2), lambda: nn.MaxPool1d(2), (2, 7)),
    "avgpool1d": (lambda: nn.Conv1d(2, 2, 2), lambda: nn.AvgPool1d(3, stride=2), (2, 8)),
    "maxpool2d": (lambda: nn.Conv2d(2, 2, 2), lambda: nn.MaxPool2d(2, stride=1), (2, 4, 4)),
    "maxpool2d_pad_dil": (lambda: nn.Conv2d(2, 2, 2),
                          lambda: nn.MaxPool2d(2, stride=2, padding=1, dilation=1), (2, 4, 4)),
    "avgpool2d": (lambda: nn.Conv2d(2, 2, 2), lambda: nn.AvgPool2d(2, padding=1), (2, 4, 4)),
    "maxpool3d": (lambda: nn.Conv3d(2, 2, 2), lambda: nn.MaxPool3d(2), (2, 3, 3, 3)),
    "avgpool3d": (lambda: nn.Conv3d(2, 2, 2), lambda: nn.AvgPool3d(2), (2, 3, 3, 3)),
    "adaptiveavg1d": (lambda: nn.Conv1d(2, 2, 2), lambda: nn.AdaptiveAvgPool1d(3), (2, 6)),
    "adaptivemax1d": (lambda: nn.Conv1d(2, 2, 2), lambda: nn.AdaptiveMaxPool1d(2), (2, 6)),
    "adaptiveavg2d": (lambda: nn.Conv2d(2, 2, 2), lambda: nn.AdaptiveAvgPool2d((2, 1)),
                      (2, 4, 4)),
    "adaptivemax2d": (lambda: nn.Conv2d(2, 2, 2), lambda: nn.AdaptiveMaxPool2d(2), (2, 4, 4)),
    "adaptiveavg3d": (lambda: nn.Conv3d(2, 2, 2), lambda: nn.AdaptiveAvgPool3d(1),
                      (2, 3, 3, 3)),
    "adaptivemax3d": (lambda: nn.Conv3d(2, 2, 2), lambda: nn.AdaptiveMaxPool3d(1),
                      (2, 3, 3, 3)),
}

POOL_CASES = [
    _conv_case(name, conv, shape, tags=("pool",), act=nn.Tanh, extra=(pool,))
    for name, (conv, pool, shape) in POOLS.items()
]

ALL_CASES: list[Case] = MLP_CASES + DENSE_CASES + CONV_CASES + POOL_CASES
CASES_BY_NAME = {c.name: c for c in ALL_CASES}
assert len(CASES_BY_NAME) == len(ALL_CASES)


def cases_with(*tags: str) -> list[Case]:
    return [c for c in ALL_CASES if any(t in c.tags for t in tags)]


# --------------------------------------------------------------------------- losses and targets

LOSS_KINDS = ("ce", "mse", "bce", "nll")


@dataclass(frozen=True)
class LossSpec:
    """A loss configuration: kind in LOSS_KINDS, reduction and keyword arguments."""

    kind: str
    reduction: str = "mean"
    weight: bool = False
    label_smoothing: float = 0.0
    ignore_index: bool = False

    @property
    def id(self) -> str:
        s = f"{self.kind}_{self.reduction}"
        if self.weight:
            s += "_weight"
        if self.label_smoothing:
            s += "_ls"
        if self.ignore_index:
            s += "_ignore"
        return s

    def make(self, num_classes: int | None = None) -> nn.Module:
        kw = {"reduction": self.reduction}
        if self.kind in ("ce", "nll"):
            if self.weight:
                g = torch.Generator().manual_seed(7)
                kw["weight"] = torch.rand(num_classes, generator=g, dtype=DTYPE) + 0.5
            if self.ignore_index:
                kw["ignore_index"] = IGNORE
            if self.kind == "ce":
                return nn.CrossEntropyLoss(label_smoothing=self.label_smoothing, **kw)
            return nn.NLLLoss(**kw)
        if self.kind == "mse":
            return nn.MSELoss(**kw)
        if self.kind == "bce":
            return nn.BCEWithLogitsLoss(**kw)
        raise ValueError(self.kind)


IGNORE = 1  # ignore_index used by the tests: a real class, so some targets hit it


def make_target(spec: LossSpec, out: Tensor, seed: int = 0) -> Tensor:
    """A target for ``spec`` matching the model output ``out``."""
    g = torch.Generator().manual_seed(3000 + seed)
    if spec.kind in ("ce", "nll"):
        C = out.shape[1]
        shape = (out.shape[0], *out.shape[2:])
        y = torch.randint(0, C, shape, generator=g)
        if spec.ignore_index:
            # make sure at least one target is ignored and one is not
            flat = y.reshape(-1)
            flat[0] = IGNORE
            if flat.numel() > 1:
                flat[-1] = (IGNORE + 1) % C
        return y
    if spec.kind == "mse":
        return torch.randn(out.shape, generator=g, dtype=out.dtype)
    if spec.kind == "bce":
        return torch.randint(0, 2, out.shape, generator=g).to(out.dtype)
    raise ValueError(spec.kind)


def setup(case: Case, spec: LossSpec, N: int = 3, seed: int | None = None):
    """(model, loss_fn, X, y) for a case and a loss configuration."""
    model, X = case.build(N, seed)
    with torch.no_grad():
        out = model(X)
    C = out.shape[1] if out.dim() > 1 else None
    if spec.kind == "nll":
        model = nn.Sequential(model, nn.LogSoftmax(dim=1))
    loss_fn = spec.make(C)
    y = make_target(spec, out, seed=0 if seed is None else seed)
    return model, loss_fn, X, y


def num_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def clone_to(model: nn.Module, dtype) -> nn.Module:
    import copy

    return copy.deepcopy(model).to(dtype)


__all__ = [
    "Case",
    "ALL_CASES",
    "CASES_BY_NAME",
    "MLP_CASES",
    "DENSE_CASES",
    "CONV_CASES",
    "POOL_CASES",
    "ACTIVATIONS",
    "LossSpec",
    "make_target",
    "setup",
    "cases_with",
    "mlp",
    "conv_net",
    "num_params",
]

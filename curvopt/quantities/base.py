"""What every quantity is made of: the request object, the captured calls, the contexts.

A quantity is **one registered class** (a subclass of :class:`Quantity`,
registered in :data:`REGISTRY` by subclassing): the user-facing request
(``BatchGrad()``, ``KFAC(mc_samples=1)``: BackPACK's names and options) that
also declares

* ``savefield`` -- the attribute/result key (BackPACK's);
* :meth:`Quantity.columns` -- what must be sent back through autograd at the
  start of backward (:data:`EXACT` loss-Hessian square-root columns, MC
  samples ``("mc", M)``, :data:`KFRA_H`, :data:`RESIDUALS`; nothing for first
  order, which reads the gradient autograd delivers anyway);
* :meth:`Quantity.compute` -- the value for one parameter from its
  :class:`ParamContext` (the layouts of its recorded calls);
* :meth:`Quantity.sync` -- how a rank-local value becomes the global batch's
  under ``torch.distributed``.

The engine (:mod:`curvopt.engine`) captures :class:`Record` objects and loops
over the requests; it knows no quantity by name.  A new quantity is one file in
:mod:`curvopt.quantities` (imported by its ``__init__``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .. import losses
from .._dist import GlobalBatch
from ..rules.layout import Bound, Layout, Rule, concat

#: column kinds a quantity may need sent back (besides ``("mc", M)``)
EXACT, KFRA_H, RESIDUALS = ("exact",), ("kfra",), ("residuals",)


def mc(M: int) -> tuple:
    """The column kind of ``M`` Monte-Carlo samples (quantities with equal ``M`` share them)."""
    return ("mc", int(M))


#: every quantity class the engine computes, in definition order (also the order it computes
#: them in); the public ones (``Quantity.public``) are the order ``track="all"`` and the docs use
REGISTRY: list[type[Quantity]] = []


@dataclass(frozen=True)
class Quantity:
    """Base class: a request for one quantity, stored as ``param.<savefield>``."""

    savefield: ClassVar[str] = ""
    #: whether the quantity needs the loss function (second order) or only the gradient.
    needs_loss: ClassVar[bool] = False
    #: one of BackPACK's ten, offered to users (:data:`curvopt.extensions.ALL`, ``track=``,
    #: the recipes); ``False``: a request only an optimizer makes, with arguments no name
    #: or recipe can give (EKFAC's eigenbases).  Still registered: the engine, ranks and
    #: micro-batches treat every quantity alike, and one flag is all the rest filters on.
    public: ClassVar[bool] = True

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        if cls.__dict__.get("savefield"):
            REGISTRY.append(cls)

    def __repr__(self) -> str:  # pragma: no cover - cosmetic
        fields = ", ".join(f"{k}={v!r}" for k, v in self.__dict__.items())
        return f"{type(self).__name__}({fields})"

    def columns(self) -> set[tuple]:
        """Column kinds this quantity reads (sent back once per backward for all requests)."""
        return set()

    def compute(self, ctx: ParamContext) -> Any:
        """The value for one parameter (``None``: nothing for this parameter)."""
        raise NotImplementedError

    def sync(self, value, ctx: ParamContext, gb: GlobalBatch):
        """Rank-local ``value`` -> ``(parts, finish)``: ``parts`` are summed over ranks (one
        bucketed all-reduce for every quantity of the backward), then ``finish(parts)``
        gives the global batch's value.  Default: linear in the loss, ``Σ_r ρ_r q_r``."""
        return [value * gb.rho], lambda parts: parts[0]

    # -- micro-batches (gradient accumulation) -------------------------------------------
    #: how the value depends on the loss normalizer ``f = 1/z``: ``1`` (linear in the loss:
    #: GGN diagonals) or ``2`` (sums of squared per-sample gradients); per-sample values
    #: (``per_sample = True``) are concatenated over micro-batches instead of summed.
    power: ClassVar[int] = 1
    per_sample: ClassVar[bool] = False

    def unnormalize(self, value, ctx: ParamContext, z: float, n: int):
        r"""One micro-batch's ``value`` (normalizer ``z``, ``n`` samples) as an additive
        state, independent of the normalization: :math:`q\,z^{p}`."""
        return value * z**self.power

    def merge(self, a, b):
        """Two micro-batches' states combined (the union of their samples)."""
        return torch.cat([a, b]) if self.per_sample else a + b

    def normalize(self, state, Z: float, N: int):
        """The union's value from its state (normalizer ``Z``, ``N`` samples): exactly what
        one backward over the concatenated batch gives."""
        return state / Z**self.power


# -------------------------------------------------------------------- captured calls
@dataclass(eq=False)
class Columns:
    """What was sent back to one layer output during a backward pass (typed, not keyed).

    Shapes: ``[K, *output.shape]`` per column batch.
    """

    exact: Tensor | None = None  #: exact loss-Hessian square root (f H = Σ_k s_k s_kᵀ)
    mc: dict = field(default_factory=dict)  #: M -> M sampled columns
    kfra_H: Tensor | None = None  #: KFRA's batch-averaged Hessian at this output, [D, D]
    #: DiagHessian: key -> (columns, signed weights [K, N]) of the residual of one nonlinear
    #: operation (the same key at every record the columns reach)
    residuals: dict = field(default_factory=dict)
    #: DiagHessian: a residual that is diagonal at this output (closed forms), like the output
    diag_residual: Tensor | None = None

    def add_diag_residual(self, r: Tensor) -> None:
        self.diag_residual = r if self.diag_residual is None else self.diag_residual + r


@dataclass(eq=False)
class Record:
    """One call of a hooked module in the forward pass."""

    name: str
    module: nn.Module
    rule: Rule
    args: tuple
    kwargs: dict
    output: Tensor
    edge: object  #: gradient edge of the output (where columns are sent)
    order: int = 0  #: position among the recorded module outputs of the forward pass
    in_edge: object = None  #: gradient edge of the module's input (KFRA/DiagHessian fast paths)
    grad: Tensor | None = None  #: the gradient autograd delivered at the output
    dtype: torch.dtype = torch.float32  #: captured tensors and columns are kept in this dtype
    batch: int | None = None  #: the model's batch size when the call was recorded
    done: bool = False
    columns: Columns = field(default_factory=Columns)
    _layouts: dict | None = None

    @property
    def shape(self):
        return tuple(self.output.shape)

    def layouts(self) -> dict[str, Layout]:
        if self._layouts is None:
            self._layouts = self.rule.layouts(self.module, self.args, self.kwargs, self.output)
        return self._layouts

    def retire(self) -> None:
        """Free the tensors and the graph node (breaks the record <-> node cycle)."""
        self.args, self.kwargs, self.columns, self._layouts = (), {}, Columns(), None
        self.edge = self.in_edge = None


@dataclass(eq=False)
class Boundary:
    """Output of a parameter-free leaf module: where KFRA averages over the batch."""

    name: str
    edge: object
    shape: tuple
    order: int
    module: nn.Module = None
    in_edge: object = None  #: gradient edge of the module's input (None: no gradient)
    dtype: torch.dtype = torch.float32  #: dtype of the output (columns sent from it match)


# ---------------------------------------------------------------------------- contexts
@dataclass(eq=False)
class BackwardContext:
    """Everything the column senders need at the start of one backward pass."""

    loss: losses.Loss
    output: Tensor  #: the loss input o (the model output)
    target: Tensor | None
    grad_output: Tensor  #: ∂(total)/∂o as autograd delivers it
    records: list[Record]
    boundaries: list[Boundary]
    requests: tuple[Quantity, ...]
    mc_generator: Callable | None = None
    #: under torch.distributed: ``() -> GlobalBatch`` (collectives: every rank calls it)
    global_batch: Callable[[], GlobalBatch] | None = None
    #: loss rows per model sample (``logits.reshape(-1, V)`` of ``[N, T, V]``: ``T``)
    rows_per_sample: int = 1
    #: a layer coupled the samples (batch_coupling="rows"): exact columns per sample
    coupled: bool = False

    def kinds(self) -> set[tuple]:
        return set().union(*(q.columns() for q in self.requests)) if self.requests else set()


@dataclass(eq=False)
class ParamContext:
    """One parameter's recorded calls at the end of backward, with a cache shared by the
    quantities computed for it (a sum of squares serves both SumGradSquared and Variance)."""

    param: nn.Parameter
    name: str
    items: list  #: [(Record, Layout)] of every recorded call that uses the parameter
    #: ``p.grad`` when it holds exactly this backward's gradient (it was ``None`` before)
    fresh_grad: Tensor | None = None
    cache: dict = field(default_factory=dict)

    @property
    def N(self) -> int:
        return self.items[0][1].N

    def cached(self, key, fn: Callable[[], Any]):
        if key not in self.cache:
            self.cache[key] = fn()
        return self.cache[key]

    def bounds(self, pick: Callable[[Columns], Tensor | None]) -> list[Bound]:
        """Each call's layout bound to the columns ``pick`` selects, merged per layout kind."""
        out = []
        for r, lay in self.items:
            c = pick(r.columns)
            if c is not None:
                out.append(lay.bind(c))
        return concat(out)

    def grad_bounds(self) -> list[Bound]:
        """Bound to the gradient (``K = 1``), cached."""
        return self.cached("grad_bounds", lambda: concat(
            [lay.bind(r.grad.unsqueeze(0)) for r, lay in self.items]))


# ----------------------------------------------------------------------- column senders
#: column kind name (``kind[0]``) -> ``sender(ctx, kinds)``, in the order they run at the
#: start of backward (registered by the modules that define the kinds).
SENDERS: dict[str, Callable[[BackwardContext, set], None]] = {}


def sender(name: str):
    """Decorator: register the function that sends the columns of kind ``name`` back."""
    def deco(fn):
        SENDERS[name] = fn
        return fn

    return deco


def send_columns(ctx: BackwardContext) -> None:
    """Send every column kind the requests need back to the records (once per kind)."""
    kinds = ctx.kinds()
    for name, fn in SENDERS.items():
        mine = {k for k in kinds if k[0] == name}
        if mine:
            fn(ctx, mine)

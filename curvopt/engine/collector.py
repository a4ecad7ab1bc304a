"""Capture during the ordinary forward and backward pass, then compute.

How one backward pass is turned into the requested quantities:

1. **Forward**: a forward hook on every module that owns parameters keeps a
   :class:`Record` of the call (its inputs and the gradient edge of its
   output).  A forward hook on the loss module keeps its input and target.
2. **Start of backward**: a tensor hook on the loss input fires first.  While
   the graph below is intact, it sends the columns of the loss-Hessian square
   root (exact and/or MC) back through autograd to every recorded layer output
   (``autograd.grad(..., inputs=edges)``): no per-module backward code, so
   residual, branched and functional graphs work as they are.
3. **During backward**: a tensor hook on each recorded output keeps the
   gradient that autograd delivers there.
4. **End of backward** (``queue_callback``): for each parameter, its rule
   turns (records, cotangents) into a layout, and the layer-agnostic formulas in
   :mod:`curvopt.quantities` produce every requested quantity, sharing work
   between them.  Results go to ``Collector.results`` and, like BackPACK, to
   attributes on the parameters.
"""

from __future__ import annotations

import warnings
import weakref
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import chain

import torch
from torch import Tensor, nn
from torch.autograd.graph import get_gradient_edge

from .. import _dist, losses, rules
from .._threads import is_small, one_thread
from ..errors import CollectError, UnsupportedLossError
from ..quantities import KFRA, REGISTRY, BatchGrad, DiagHessian, Quantity
from ..quantities.base import (
    BackwardContext,
    Boundary,
    ParamContext,
    Record,
    send_columns,
)
from ..quantities.first_order import release_buffers
from ..rules.fallback import FallbackRule
from ..rules.layout import DenseBound, ElementwiseBound, round_off
from ..rules.param_use import ParamUseRule
from . import distributed, graph

__all__ = ["Collector", "collect", "release_buffers"]

_ACTIVE: weakref.WeakSet = weakref.WeakSet()
#: model -> backward passes with results so far, over every collector (coverage schedule)
_BACKWARDS_WITH_RESULTS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
#: default :attr:`Collector.coverage_every`
COVERAGE_EVERY = 50


def _in_edge(args):
    x = args[0] if args else None
    return get_gradient_edge(x) if torch.is_tensor(x) and x.requires_grad else None


@dataclass(eq=False)
class LossCall:
    """One call of the loss module in the forward pass."""

    module: nn.Module
    input: Tensor
    target: Tensor
    output: Tensor


def _weak(obj, method: str, *bound):
    """A tensor hook calling ``obj.method(*bound, grad)`` without keeping ``obj`` alive.

    Hooks live on graph nodes; a strong reference would tie the collector (and its
    results) to the graph's lifetime through a reference cycle.
    """
    ref = weakref.ref(obj)

    def hook(g):
        o = ref()
        if o is not None:
            return getattr(o, method)(*bound, g)

    return hook


def _weak_pre(obj, rec):
    """A node pre-hook (``grad_outputs -> None``) calling ``obj._grad_hook(rec, grad)``."""
    ref = weakref.ref(obj)

    def hook(grad_outputs):
        o = ref()
        if o is not None and grad_outputs[0] is not None:
            o._grad_hook(rec, grad_outputs[0])

    return hook


def _expand(x, N):
    if torch.is_tensor(x) and x.dim() and x.shape[0] == 1:
        return x.expand(N, *x.shape[1:])
    return x


def _tensors(x) -> list:
    """Every tensor in a (nested) output or argument structure (dicts, ModelOutputs, ...)."""
    if torch.is_tensor(x):
        return [x]
    if isinstance(x, dict):
        x = list(x.values())
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    return []


def _first_tensor(out):
    if torch.is_tensor(out):
        return out
    if isinstance(out, (tuple, list)):
        for o in out:
            if torch.is_tensor(o):
                return o
    return None


def _detach(x, dtype):
    """A captured input: detached, floating tensors in the statistics' dtype."""
    if not torch.is_tensor(x):
        return x
    x = x.detach()
    return x.to(dtype) if x.is_floating_point() else x


def _detach_all(xs, dtype):
    return tuple(_detach(x, dtype) for x in xs)


def _compute_dtype(module: nn.Module) -> torch.dtype:
    """float32, or the parameters' dtype where it is wider: statistics of a bfloat16 model
    or of autocast's low-precision activations are computed and summed in float32."""
    dt = torch.float32
    for p in module.parameters():
        if p.is_floating_point():
            dt = torch.promote_types(dt, p.dtype)
    return dt


def _to_dtype(value, dtype):
    """A result in the parameter's dtype (computed in float32 or wider)."""
    if torch.is_tensor(value):
        return value if value.dtype == dtype else value.to(dtype)
    if isinstance(value, list) and any(t.dtype != dtype for t in value):
        return value.like([t.to(dtype) for t in value]) if hasattr(value, "like") else [
            t.to(dtype) for t in value]
    return value


def _no_autocast(device):
    """The engine's own arithmetic runs outside autocast (float32 statistics)."""
    if device is None:
        return torch.autocast("cpu", enabled=False)
    return torch.autocast(device.type, enabled=False)


def _refuse_compiled(model: nn.Module) -> None:
    for name, m in model.named_modules():
        compiled = getattr(m, "_compiled_call_impl", None) is not None
        if compiled or type(m).__name__ == "OptimizedModule":
            where = f"'{name}'" if name else "the model"
            raise CollectError(
                f"{where} is compiled (torch.compile): curvopt's hooks capture each layer's "
                "call in eager mode, which compiled graphs do not run. Give curvopt (and "
                "run) the uncompiled module, e.g. model._orig_mod for torch.compile(model), "
                "or compile only parameter-free parts of the model."
            )


class Collector:
    """Hooks on a model (and its loss) that compute the requested quantities on backward.

    Args:
        model: any ``nn.Module``.
        loss_fn: the loss *module* applied to the model output (``None`` is allowed
            when only first-order quantities are requested).
        extensions: the quantities to compute (instances from :mod:`curvopt.extensions`);
            may be changed between backward passes via :attr:`extensions`.
        set_attributes: also store results as attributes on the parameters
            (``p.grad_batch``, ``p.kfac``, ...), as BackPACK does.
        distributed: ``"auto"`` (default): when a ``torch.distributed`` process group
            with more than one rank is initialized, batch-level quantities describe the
            global batch (see :mod:`curvopt.engine.distributed`); ``False``: rank-local.
            The loss is taken to be mean-reduced unless ``loss_fn.reduction == 'sum'``.
        gather: under ``torch.distributed``, also concatenate ``grad_batch`` and
            ``batch_l2`` over ranks (by default they stay on their rank, rescaled to
            the global loss).
        batch_coupling: ``"error"`` (default): a layer that mixes the samples of the batch
            (BatchNorm in train mode) raises, since per-sample quantities are not defined;
            ``"rows"``: every quantity treats the rows of what flows back through the
            coupled graph as samples (the K-FAC practice of kfac-pytorch and kfac-jax):
            ``grad_batch[n]`` is row n's part of the gradient (they still sum to
            ``p.grad``), the GGN diagonals and Kronecker factors use the loss-Hessian
            columns backpropagated through the coupled graph, row by row; KFRA and
            DiagHessian, which need per-sample Jacobians, raise.
        accumulate: ``False`` (default): each backward pass replaces the results.
            ``True``: the backward passes since the last :meth:`reset` are micro-batches
            of one batch (gradient accumulation: ``(loss / k).backward()`` k times, or a
            sum loss): :attr:`results` describe their union exactly as one backward over
            the concatenated batch would (per-sample quantities concatenated; every
            other quantity re-normalized with the union's loss normalizer).  Use with
            ``loss_scaling="unscale"`` when the loss is divided by ``k`` after the loss
            module.  KFRA refuses a second micro-batch.
        loss_scaling: what to do when the loss module's output is multiplied by a
            factor ``s`` before backward (``d total / d loss = s``): ``"warn"``
            (default; first-order quantities follow the scaled loss, curvature the loss
            module), or ``"unscale"`` (every quantity describes the loss module itself:
            the gradients reaching the layers are divided by ``s``; what
            ``torch.amp.GradScaler`` needs).  :attr:`loss_scale` holds the last ``s``.

    After each backward, :attr:`results` maps parameter names (as in
    ``model.named_parameters()``) to ``{savefield: value}``.
    """

    def __init__(self, model: nn.Module, loss_fn=None, extensions=(), set_attributes=True,
                 distributed="auto", gather=False, single_backward=False, loss_scaling="warn",
                 batch_coupling="error", accumulate=False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"collect: model must be an nn.Module, got {type(model).__name__}")
        if loss_scaling not in ("warn", "unscale"):
            raise ValueError(f"collect: loss_scaling must be 'warn' or 'unscale', got {loss_scaling!r}")
        self.model = model
        self.loss_fn = loss_fn
        self.set_attributes = set_attributes
        self.distributed = distributed
        self.gather = gather
        self.single_backward = single_backward
        self.loss_scaling = loss_scaling
        if batch_coupling not in ("error", "rows"):
            raise ValueError(f"collect: batch_coupling must be 'error' or 'rows', got {batch_coupling!r}")
        self.batch_coupling = batch_coupling
        self._coupled = False  # a layer coupled the samples of the running forward pass
        #: names of the layers that coupled the samples of a batch so far (batch_coupling="rows")
        self.coupled_layers: set[str] = set()
        self.accumulate = accumulate
        self._union: dict = {}  # (param name, savefield) -> (quantity, additive state)
        self._union_z = self._union_n = 0.0  # the union's loss normalizer and sample count
        self._normalizer_local = None  # this backward's loss normalizer (accumulation)
        #: ``d total / d (loss module output)`` of the last backward (1.0 when unscaled).
        self.loss_scale = 1.0
        #: ``None`` (MC targets from torch's global RNG) or ``device -> torch.Generator``:
        #: a private stream (the optimizers' own, so the user's RNG is never touched).
        self.mc_generator = None
        #: Run the coverage self-check (``p.grad`` equals the sum over the recorded calls,
        #: see :func:`_check_coverage`) on the model's first backward with results and then
        #: on every ``coverage_every``-th one, counted per model over every collector (a
        #: ``collect`` block per step continues the count); ``0``: never.  What it catches
        #: (a tied weight used via ``F.linear``, a gradient hook) is a property of the
        #: training code, present from the first backward on, while the check costs about
        #: 0.3 plain steps on the MLP 784-256-256-10 (SumGradSquared: 2.1x a plain step with
        #: it on every backward, 1.8x without).
        self.coverage_every = COVERAGE_EVERY
        #: ``None`` (every quantity for every parameter) or ``{savefield: parameters}``:
        #: a quantity named here is computed only for those parameters (an optimizer asks
        #: Kronecker factors for some parameters and diagonals for others).
        self.only: dict | None = None
        self._loss = None  # curvopt.losses.Loss of loss_fn, once a quantity needs it
        self._model_batch: int | None = None  # leading dimension of the model's first input
        self._no_grad_yet: list = []
        self._warned_unrecorded: set[str] = set()
        self._backwards = 0
        self._handles: list = []
        # Records of forward passes not yet reached by a backward.  A record and its graph
        # node reference each other through the output's hook (a cycle through C++ that
        # Python's GC cannot see), so records are cleared explicitly (`Record.retire`) when
        # a backward finishes without reaching them and on detach.
        self._pending: list[Record] = []
        self._boundaries: list[Boundary] = []  # parameter-free module outputs (KFRA only)
        self._grad_was_none: set = set()
        self._normalizer = None  # this rank's mean-reduction denominator (distributed only)
        self._loss_seen = False  # a loss-input hook fired in the running backward
        self._order = 0
        self._loss_calls: list[LossCall] = []
        self._queued = False
        self._nested = False
        # True while curvopt itself re-runs modules (the generic rule's torch.func calls).
        self._computing = False
        self.results: dict[str, dict] = {}
        #: samples the results describe (all ranks'; every micro-batch's with ``accumulate``)
        self.samples: int | None = None
        self._names = {}
        for n, p in model.named_parameters():
            self._names.setdefault(p, n)
        self._by_name = None
        self.extensions = extensions

    # ------------------------------------------------------------------ configuration
    @property
    def extensions(self) -> tuple:
        return self._extensions

    @extensions.setter
    def extensions(self, exts):
        exts = tuple(exts)
        seen = set()
        for e in exts:
            if not isinstance(e, Quantity) or type(e) not in REGISTRY:
                raise TypeError(
                    f"collect: {e!r} is not a curvopt extension; use the classes in "
                    "curvopt.extensions, e.g. BatchGrad() or KFAC(mc_samples=1)."
                )
            if e.savefield in seen:
                raise ValueError(f"collect: {type(e).__name__} requested twice")
            seen.add(e.savefield)
        second = [e for e in exts if e.needs_loss]
        if second:
            if self.loss_fn is None:
                raise UnsupportedLossError(
                    f"{type(second[0]).__name__} needs the loss function: pass it as "
                    "collect(model, loss_fn, ...)."
                )
            self._loss = losses.of(self.loss_fn, type(second[0]).__name__)
        self._extensions = exts
        # computed in registration order: first-order quantities share work in that order
        self._ordered = tuple(sorted(exts, key=lambda e: REGISTRY.index(type(e))))
        self._wants_boundaries = any(isinstance(e, KFRA) for e in exts)
        self._wants_in_edges = any(isinstance(e, (KFRA, DiagHessian)) for e in exts)

    def param_results(self, p: nn.Parameter) -> dict:
        """Results of the last backward for parameter ``p`` (empty if none)."""
        return self.results.get(self._names.get(p, ""), {})

    # --------------------------------------------------------------------- attach/detach
    def attach(self) -> Collector:
        if self._handles:
            return self
        if self.model in _ACTIVE:
            raise CollectError(
                "collect: this model already has an active curvopt collector (nested "
                "collect, or an optimizer of curvopt holding one). Exit the other first."
            )
        _refuse_compiled(self.model)
        self._handles.append(self.model.register_forward_pre_hook(self._model_pre_hook,
                                                                  with_kwargs=True))
        for site in rules.walk(self.model):
            name, module = site.name, site.module
            if site.check is not None:
                # e.g. BatchNorm in train mode: checked before the forward, parameters or not
                self._handles.append(module.register_forward_pre_hook(
                    self._call_check(site.check, name)))
            if site.role == "container" and site.params:
                self._handles.append(module.register_forward_hook(
                    self._container_hook(name, [n for n, _ in site.params]), with_kwargs=True))
            elif site.role == "leaf":  # activation, pooling, ...: a KFRA boundary
                self._handles.append(module.register_forward_hook(self._boundary_hook(name)))
            elif site.role == "layer":
                self._handles.append(module.register_forward_hook(
                    self._forward_hook(name, site.rule), with_kwargs=True))
        if isinstance(self.loss_fn, nn.Module):
            self._handles.append(self.loss_fn.register_forward_pre_hook(self._loss_pre_hook))
            self._handles.append(self.loss_fn.register_forward_hook(self._loss_hook))
        _ACTIVE.add(self.model)
        return self

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._reset()
        _ACTIVE.discard(self.model)

    def _reset(self) -> None:
        """Forget every forward pass and backward in flight (after an exception, on detach)."""
        for r in self._pending:
            r.retire()
        for lc in self._loss_calls:
            lc.input = lc.output = None
        self._pending.clear()
        self._boundaries.clear()
        self._loss_calls.clear()
        self._loss_seen = self._queued = self._nested = self._computing = False
        self._loss_arg = None
        self._coupled = False

    def _recover(self) -> None:
        """A forward pass starts: if the last backward was aborted (an exception or an
        interrupt inside backward: its end-of-backward callback never ran), forget its
        state, so that the next iteration works as if it had never started."""
        if (self._queued or self._loss_seen) and torch._C._current_graph_task_id() == -1:
            self._reset()

    def __enter__(self):
        return self.attach()

    def __exit__(self, *exc):
        self.detach()
        return False

    # ----------------------------------------------------------------------------- hooks
    def _call_check(self, rule, name):
        def hook(module, args):
            if self._extensions and torch.is_grad_enabled() and not self._computing:
                if rule.check(module, name, self.batch_coupling):
                    self._coupled = True
                    self.coupled_layers.add(name)

        return hook

    def _model_pre_hook(self, module, args, kwargs):
        # The model's batch size: the leading dimension of its first tensor input.
        if self._extensions and torch.is_grad_enabled() and not self._computing:
            x = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.dim()), None)
            self._model_batch = int(x.shape[0]) if x is not None else None
            # parameters without a gradient yet: one that has one after the backward but no
            # recorded call was used where curvopt cannot see it (_check_unrecorded)
            self._no_grad_yet = [p for p in self._names if p.requires_grad and p.grad is None]

    def _rows_per_sample(self, o: Tensor) -> int:
        """Loss rows per model sample: ``T`` when the loss sees ``[N·T, ...]`` rows of ``N``
        samples (sample-major, as ``logits.reshape(-1, V)``), else 1."""
        N = self._model_batch
        if N and o.shape[0] != N and o.shape[0] % N == 0:
            return o.shape[0] // N
        return 1

    def _boundary_hook(self, name):
        def hook(module, args, output):  # noqa: D401 - forward hook
            if not self._wants_boundaries or not torch.is_grad_enabled() or self._computing:
                return
            if torch.is_tensor(output) and output.requires_grad:
                self._order += 1
                self._boundaries.append(
                    Boundary(name, get_gradient_edge(output), tuple(output.shape), self._order,
                             module, _in_edge(args), output.dtype)
                )

        return hook

    def _forward_hook(self, name, rule):
        def hook(module, args, kwargs, output):
            if not self._extensions or not torch.is_grad_enabled() or self._computing:
                return
            out = _first_tensor(output)
            if out is None or not out.requires_grad:
                return None
            self._recover()
            N = self._model_batch
            if (N is not None and N > 1 and out is output and out.dim() and out.shape[0] == 1
                    and not isinstance(rule, FallbackRule)):
                # A call on a batch of one whose result is broadcast over the batch later
                # (position embeddings on position ids [1, T]): the per-sample information
                # exists only after the broadcast, so the call's output is expanded to the
                # batch here (a view: no copy) and the rule sees the call on every sample.
                out = output = out.expand(N, *out.shape[1:])
                args = tuple(_expand(a, N) for a in args)
                kwargs = {k: _expand(v, N) for k, v in kwargs.items()}
            dt = _compute_dtype(module)
            self._record(Record(
                name=name, module=module, rule=rule, args=_detach_all(args, dt),
                kwargs={k: _detach(v, dt) for k, v in kwargs.items()},
                output=out.detach(), edge=get_gradient_edge(out), order=0,
                in_edge=_in_edge(args) if self._wants_in_edges else None, dtype=dt,
            ), rec_params=list(module.parameters()))
            out.register_hook(_weak(self, "_grad_hook", self._pending[-1]))
            return output

        return hook

    def _record(self, rec: Record, rec_params) -> None:
        self._order += 1
        rec.order = self._order
        rec.batch = self._model_batch
        # Parameters without a gradient now will hold exactly this backward's gradient:
        # Variance reuses it, and _check_coverage compares it with the recorded uses.
        for p in rec_params:
            if p.grad is None:
                self._grad_was_none.add(id(p))
            else:
                self._grad_was_none.discard(id(p))
        self._pending.append(rec)

    def _container_hook(self, name, own: list[str]):
        """A container's own parameters: a record at the operation that broadcasts each
        over the batch (:mod:`curvopt.engine.graph`), the generic rule for the others."""
        def hook(module, args, kwargs, output):
            if not self._extensions or not torch.is_grad_enabled() or self._computing:
                return
            outs = _tensors(output)
            if not any(t.requires_grad for t in outs) or self._model_batch is None:
                return
            self._recover()
            params = {n: module._parameters[n] for n in own}
            found, unsupported = graph.find_uses(outs, [*_tensors(args), *_tensors(kwargs)],
                                                 params, self._model_batch)
            for use, edge in found:
                dt = torch.promote_types(params[use.name].dtype, torch.float32)
                rec = Record(name=f"{name}.{use.name}" if name else use.name, module=module,
                             rule=ParamUseRule(use), args=(), kwargs={},
                             output=torch.empty((), dtype=dt, device=outs[0].device).expand(use.O),
                             edge=edge, dtype=dt)
                self._record(rec, [params[use.name]])
                edge.node.register_prehook(_weak_pre(self, rec))
            if unsupported:  # read by the generic rule, differentiating these parameters only
                out = next(t for t in outs if t.requires_grad)
                dt = _compute_dtype(module)
                rec = Record(name=name, module=module, rule=FallbackRule(frozenset(unsupported)),
                             args=_detach_all(args, dt),
                             kwargs={k: _detach(v, dt) for k, v in kwargs.items()},
                             output=out.detach(), edge=get_gradient_edge(out), dtype=dt)
                self._record(rec, [params[n] for n in unsupported])
                out.register_hook(_weak(self, "_grad_hook", rec))

        return hook

    def _grad_hook(self, rec: Record, g: Tensor):
        if self._nested:
            return
        if rec.edge is None and not rec.done:
            raise CollectError(
                f"backward reached layer '{rec.name}' of a forward pass that an earlier "
                "backward (or leaving collect) retired. Run each forward's backward before "
                "the next forward's backward."
            )
        if rec.done or rec.grad is not None:
            raise CollectError(
                f"backward reached layer '{rec.name}' a second time for the same forward pass "
                "inside collect (retain_graph and a second backward?). Quantities are "
                "computed once per forward+backward: run a new forward before each backward."
            )
        if self.single_backward and self._backwards and not self.accumulate:
            raise CollectError(
                "a second backward pass inside one `with curvopt.collect(...)` block: the "
                "results of the first would be overwritten. Use one collect block per "
                "forward+backward, or a long-lived curvopt.Collector for a training loop."
            )
        rec.grad = g.detach().to(rec.dtype)
        self._queue()

    def _queue(self):
        if not self._queued:
            self._queued = True
            torch.autograd.Variable._execution_engine.queue_callback(self._finalize)

    def _loss_pre_hook(self, module, args):
        # Each loss call gets its own alias of the model output, so that the hooks of a
        # call whose result is not backpropagated (a loss computed for logging) never fire.
        self._loss_arg = None
        if not self._extensions or not torch.is_grad_enabled() or self._computing:
            return None
        o = args[0] if args else None
        if not (torch.is_tensor(o) and o.requires_grad) or not self._pending:
            return None
        alias = o.view_as(o)
        self._loss_arg = (alias, o)
        return (alias, *args[1:])

    def _loss_hook(self, module, args, output):
        if not self._extensions or not torch.is_grad_enabled() or self._computing:
            return
        alias = args[0] if args else None
        if self._loss_arg is None or self._loss_arg[0] is not alias:
            # The pre-hook did not alias this call: the loss module is shared with another
            # model (or collector) that ran no hooked forward since the last backward.
            return
        o = self._loss_arg[1]
        self._loss_arg = None
        self._recover()
        min_dim = self._loss.min_dim if self._loss is not None else 1
        if o.dim() < min_dim or o.shape[0] == 0:
            raise CollectError(
                f"the loss input has shape {tuple(o.shape)}: curvopt needs a batch with at "
                "least one sample along dimension 0 (unbatched inputs: add one with "
                "x.unsqueeze(0); skip empty batches in the loop)."
            )
        lc = LossCall(module, o, args[1].detach() if len(args) > 1 else None, output)
        self._loss_calls.append(lc)
        if self.accumulate and lc.target is not None:
            try:
                self._normalizer_local = losses.of(module).normalizer(o, lc.target)
            except UnsupportedLossError:
                self._normalizer_local = None
        if _dist.active() and lc.target is not None and getattr(module, "reduction", "") == "mean":
            try:
                self._normalizer = losses.of(module).normalizer(o, lc.target)
            except UnsupportedLossError:  # first order only: the batch share is the sample share
                self._normalizer = None
        self.loss_scale = 1.0
        if output.requires_grad:
            output.register_hook(_weak(self, "_loss_output_hook"))
        alias.register_hook(_weak(self, "_loss_input_hook", lc))

    def _loss_output_hook(self, g):
        if self._nested or g.numel() != 1:
            return
        self.loss_scale = float(g)
        if self.loss_scaling == "warn" and self.loss_scale != 1.0:
            warnings.warn(
                f"curvopt: the loss was scaled after the loss module (d total / d loss = "
                f"{self.loss_scale:.4g}). First-order quantities follow the scaled loss, "
                "curvature quantities follow the loss module as it is; apply scaling inside "
                "the loss module (e.g. reduction='sum') to keep them consistent, or use "
                "loss_scaling='unscale'.",
                stacklevel=2,
            )

    def _unscale(self, g: Tensor) -> Tensor:
        if self.loss_scaling == "unscale" and self.loss_scale != 1.0:
            return g / self.loss_scale
        return g

    def _loss_input_hook(self, lc: LossCall, g: Tensor):
        if self._nested:
            return
        self._queue()
        if not any(e.needs_loss for e in self._extensions):
            return
        if lc.input is None:
            raise CollectError(
                "backward reached a loss call of a forward pass that an earlier backward "
                "retired. Run each forward's backward before the next forward's backward."
            )
        if self._loss_seen:
            raise CollectError(
                "one backward pass reached two calls of the loss module; curvopt's curvature "
                "quantities need the model output to enter the loss once. Concatenate the "
                "outputs (and targets) and call the loss once, or use one backward per loss."
            )
        self._loss_seen = True
        recs = [r for r in self._pending if not r.done]
        if not recs:
            return
        if not bool(torch.isfinite(lc.input).all()):
            raise CollectError(
                "the model output entering the loss contains NaN or inf, so its curvature "
                "is undefined (no quantity of this backward pass is computed). Check the "
                "inputs for non-finite values and the learning rate; curvopt's optimizers "
                "skip such steps by themselves."
            )
        if self._coupled:
            bad = [type(e).__name__ for e in self._extensions if isinstance(e, (KFRA, DiagHessian))]
            if bad:
                raise CollectError(
                    f"{', '.join(bad)} need(s) per-sample Jacobians, which a layer that mixes "
                    "the samples of the batch (BatchNorm in train mode) does not have, also "
                    "with batch_coupling='rows'. Use model.eval() for these quantities, or "
                    "the GGN quantities (DiagGGNExact, KFLR, KFAC)."
                )
        ctx = BackwardContext(
            loss=self._loss, output=lc.input, target=lc.target, grad_output=self._unscale(g),
            records=recs, boundaries=self._boundaries, requests=self._extensions,
            mc_generator=self.mc_generator, rows_per_sample=self._rows_per_sample(lc.input),
            coupled=self._coupled,
            global_batch=(lambda: self._global_batch(lc.input.shape[0], lc.input.device))
            if self._dist_on() else None,
        )
        self._nested = True
        try:
            with _no_autocast(lc.input.device):
                send_columns(ctx)
        finally:
            self._nested = False

    # -------------------------------------------------------------------------- finalize
    def _dist_on(self) -> bool:
        return self.distributed == "auto" and _dist.active()

    def _global_batch(self, n_local: int, device) -> distributed.GlobalBatch:
        summed = self.loss_fn is not None and getattr(self.loss_fn, "reduction", "mean") == "sum"
        return distributed.GlobalBatch.of(n_local, device, self._normalizer, summed)

    def _finalize(self):
        loss_seen = self._loss_seen
        self._coupled = False
        self._queued = False
        self._loss_seen = False
        self._backwards += 1
        recs = [r for r in self._pending if r.grad is not None and not r.done]
        # Forward passes this backward did not reach (an evaluation with gradients on, say)
        # are retired: their graphs are freed, and a later backward through one raises.
        for r in self._pending:
            if r.grad is None:
                r.retire()
        self._pending = []
        for lc in self._loss_calls:
            lc.input = lc.output = None
        self._boundaries = []
        self._loss_calls.clear()
        for r in recs:
            r.done = True
            r.grad = self._unscale(r.grad)
        if recs and not loss_seen and any(e.needs_loss for e in self._extensions):
            for r in recs:
                r.retire()
            raise CollectError(
                "this backward pass reached the model without passing through the loss "
                f"module given to curvopt ({type(self.loss_fn).__name__} object at "
                f"{id(self.loss_fn):#x}), so curvature quantities have no loss Hessian: call "
                "that very loss module in the loop (not F.cross_entropy or a second "
                "instance), as loss = loss_fn(model(X), y)."
            )
        empty = [r.name for r in recs if r.output.numel() == 0]
        if empty:
            for r in recs:
                r.retire()
            raise CollectError(
                f"layer(s) {', '.join(empty)} received an empty batch; skip empty batches "
                "in the loop (there is nothing to compute per sample)."
            )
        bad = [recs[i].name for i in non_finite([r.grad for r in recs])]
        if bad:
            # Checked on the (small) layer-output gradients, not on the (large) results.
            warnings.warn(
                f"curvopt: a non-finite gradient reached layer(s) {', '.join(bad)}; the "
                "quantities of this backward pass are not finite. Check the loss, the "
                "learning rate, or lower the inputs' scale.",
                RuntimeWarning,
                stacklevel=2,
            )
        # Drop our reference to the previous results before computing: a user who kept
        # that dict keeps its tensors from being recycled (see first_order._reusable).
        self.results = {}
        self._computing = True
        try:
            with (_no_autocast(recs[0].output.device if recs else None),
                  one_thread(self._small_work(recs))):
                self.results = self._compute(recs)
        finally:
            self._computing = False
            self._grad_was_none = set()
            for r in recs:  # free captured tensors and the graph node
                r.retire()
        self._check_unrecorded()
        if self.set_attributes:
            for name, res in self.results.items():
                p = self._param_by_name(name)
                for k, v in res.items():
                    setattr(p, k, v)

    def _small_work(self, recs: list[Record]) -> bool:
        """Whether every layer output and parameter has at most 2^20 entries: then the
        engine's work runs on one CPU thread when OpenMP's pool sleeps (curvopt._threads).
        Measured with ``OMP_WAIT_POLICY=PASSIVE`` on the MLP 784-256-256-10 (N=128): a
        2-thread product of that size saves about 0.1 ms, each of the dozens of small
        operations around it loses about 0.08 ms to waking the pool (SumGradSquared 2.6x ->
        2.1x a plain step, DiagGGNExact 4.2x -> 3.9x)."""
        limit = 1 << 20
        if any(isinstance(e, BatchGrad) for e in self._extensions) and recs:
            # per-sample gradients write N times each parameter: memory traffic that two
            # threads do move faster (MLP BatchGrad 6.0x -> 7.6x a plain step on one)
            limit //= max(r.output.shape[0] if r.output.dim() else 1 for r in recs)
        return is_small(chain((r.output for r in recs), self._names), limit=limit)

    def _check_unrecorded(self) -> None:
        """Warn (once per parameter) about a parameter that received a gradient in this
        backward but was not used in any call curvopt recorded: it has no quantities."""
        missing = [self._names[p] for p in self._no_grad_yet
                   if p.grad is not None and self._names[p] not in self.results
                   and self._names[p] not in self._warned_unrecorded]
        self._no_grad_yet = []
        if missing and self._extensions:
            self._warned_unrecorded.update(missing)
            warnings.warn(
                f"curvopt: parameter(s) {', '.join(missing)} received a gradient but were used "
                "outside every module call curvopt records (e.g. a child module's weight used "
                "via F.linear by its parent), so they have no quantities. Route their use "
                "through the module that owns them.",
                RuntimeWarning,
                stacklevel=3,
            )

    def _param_by_name(self, name):
        if self._by_name is None:
            self._by_name = dict(self.model.named_parameters())
        return self._by_name[name]

    def _requests_for(self, p) -> tuple:
        if self.only is None:
            return self._ordered
        return tuple(e for e in self._ordered if e.savefield not in self.only
                     or any(q is p for q in self.only[e.savefield]))

    def _compute(self, recs: list[Record]) -> dict[str, dict]:
        """Group records by parameter and evaluate every requested quantity."""
        per_param: dict[nn.Parameter, list] = {}
        for r in recs:
            for lay in r.layouts().values():
                _check_batch(r, lay)
                per_param.setdefault(lay.param, []).append((r, lay))
        dist_on = self._dist_on()
        every, done = self.coverage_every, _BACKWARDS_WITH_RESULTS.get(self.model, 0)
        check = bool(recs) and every > 0 and done % every == 0
        if recs:
            _BACKWARDS_WITH_RESULTS[self.model] = done + 1
        out: dict[str, dict] = {}
        jobs = []  # (name, quantity, context) for the distributed reduction
        probes = []  # coverage self-checks, evaluated together (one device sync)
        for p, items in per_param.items():
            name = self._names.get(p)
            if name is None:
                continue
            fresh = not dist_on and id(p) in self._grad_was_none and p.grad is not None
            ctx = ParamContext(p, name, items, fresh_grad=self._unscale(p.grad) if fresh else None)
            res = {}
            for q in self._requests_for(p):
                value = _to_dtype(q.compute(ctx), p.dtype)
                if value is not None:
                    res[q.savefield] = value
                    jobs.append((name, q, ctx))
            if fresh and check:
                probe = _coverage_probe(ctx)
                if probe is not None:
                    probes.append(probe)
            out[name] = res
        _check_coverage(probes)
        gb = None
        if recs:
            self.samples = next(iter(recs[0].layouts().values())).N
        if dist_on and recs:
            gb = self._global_batch(self.samples, recs[0].output.device)
            distributed.reduce_results(out, jobs, gb, self.gather)
            self.samples = gb.n_global
        if self.accumulate and recs:
            out = self._accumulate(out, jobs, recs, gb)
        return out

    def _accumulate(self, out, jobs, recs, gb) -> dict:
        """Fold this backward's results into the union of the micro-batches since
        :meth:`reset` (see ``accumulate``) and return the union's results."""
        summed = self.loss_fn is not None and getattr(self.loss_fn, "reduction", "mean") == "sum"
        n = self.samples
        z = float(self._normalizer_local) if self._normalizer_local is not None else float(n)
        if gb is not None:  # the results describe the global batch: its normalizer
            z = z / gb.rho
        z = 1.0 if summed else z
        self._normalizer_local = None
        first = not self._union
        for name, q, ctx in jobs:
            state = q.unnormalize(out[name][q.savefield], ctx, z, n)
            key = (name, q.savefield)
            if key in self._union:
                state = q.merge(self._union[key][1], state)
            self._union[key] = (q, state)
        self._union_n += n
        self._union_z = 1.0 if summed else self._union_z + z
        self.samples = int(self._union_n)
        if first:
            # one micro-batch so far (the common case: one backward per step): its results
            # are the union's as they are, without the round trip through the states
            return out
        union: dict[str, dict] = {}
        for (name, field), (q, state) in self._union.items():
            union.setdefault(name, {})[field] = q.normalize(state, self._union_z, self._union_n)
        return union

    def reset(self) -> None:
        """Start a new union of micro-batches (``accumulate=True``): the next backward
        pass is the first of the next batch."""
        self._union = {}
        self._union_z = self._union_n = 0.0


def _check_batch(rec: Record, lay) -> None:
    """Refuse a call whose batch is not the model's: its rows are not samples (relative
    position ids ``[T, T]``), or a batch of one that was not broadcast over the batch."""
    N = rec.batch
    if N is None or lay.N == N or (rec.rule.locates_batch and lay.N != 1):
        return
    raise CollectError(
        f"layer '{rec.name}' was called on {lay.N} rows while the model's input has {N} "
        "samples: its inputs do not run along the batch (e.g. relative positions [T, T], or "
        "a batch of one used without broadcasting), so per-sample and curvature quantities "
        f"of '{rec.name}' are not defined. Freeze its parameters (requires_grad_(False)) or "
        "call it on per-sample inputs."
    )


def non_finite(tensors: list[Tensor]) -> list[int]:
    """Indices of the tensors with a NaN or infinite entry: one fused 2-norm per (device,
    dtype) and one sync each; a tensor whose norm is not finite is then checked entry by
    entry, since the sum of squares can overflow for large finite entries (float16 above
    65504).  (The max-norm cannot overflow but was measured 10x slower on CPU.)"""
    groups: dict = {}
    for i, t in enumerate(tensors):
        if t.numel():
            groups.setdefault((t.device, t.dtype), []).append(i)
    bad = []
    for idx in groups.values():
        flags = torch.isfinite(torch.stack(torch._foreach_norm([tensors[i] for i in idx])))
        if not bool(flags.all()):
            bad += [i for i, ok in zip(idx, flags.tolist(), strict=True)
                    if not ok and not bool(torch.isfinite(tensors[i]).all())]
    return sorted(bad)


def _coverage_probe(ctx: ParamContext) -> tuple | None:
    """The cheap half of the coverage self-check of one parameter (see
    :func:`_check_coverage`): ``(ctx, tol, residual, bound)``, tensors not yet synced;
    ``None`` when there is nothing to compare."""
    bounds = ctx.grad_bounds()
    grad = ctx.fresh_grad
    if len(bounds) != 1 or grad.numel() == 0:
        return None
    # round-off of the backward autograd ran (bfloat16 under autocast) or of p.grad
    tol = max(round_off(grad.dtype), *(round_off(r.output.dtype) for r, _ in ctx.items))
    b = bounds[0]
    if isinstance(b, DenseBound):
        probe = b.total_residual(grad, tol)
        return None if probe is None else (ctx, tol, *probe)
    total = b.total().to(grad.dtype)
    # torch.allclose(total, grad, rtol=tol, atol=tol·max|total|) as one number
    residual = ((total - grad).abs() - tol * grad.abs()).max()
    return ctx, tol, residual, tol * total.abs().max() + 1e-30


def _check_coverage(probes: list) -> None:
    """Warn if a ``p.grad`` is not the sum of the recorded uses' per-sample gradients.

    That happens when a weight is also used outside its module (``F.linear(h,
    emb.weight)`` for tied embeddings) or a gradient hook rescales it: the quantities
    would silently describe only the recorded uses.  Cheap: a random projection for
    dense layers, the (small) total otherwise; every parameter's comparison is read in
    one device sync, and only a parameter that fails it pays for the second look.
    """
    by_device: dict = {}
    for pr in probes:
        by_device.setdefault(pr[2].device, []).append(pr)
    for group in by_device.values():
        # compared on the device, in the values' own dtype (NaN compares False)
        ok = torch.stack([(r <= b).reshape(()) for _, _, r, b in group]).tolist()
        for (ctx, tol, _, _), passed in zip(group, ok, strict=True):
            if not passed:  # NaN included: the second look decides
                _second_look(ctx, tol)


def _second_look(ctx: ParamContext, tol: float) -> None:
    """A parameter whose cheap comparison failed: round-off scales with the summed terms,
    not with their (possibly cancelling) sum (an exactly-zero gradient of a bias before a
    BatchNorm, BERT's key bias, a weight before a train-mode BatchNorm); warn if it still
    differs."""
    grad = ctx.fresh_grad
    b = ctx.grad_bounds()[0]
    if isinstance(b, DenseBound):
        residual, _ = b.total_residual(grad, tol)
        if bool(residual <= b.cancellation_bound(tol)):
            return
    else:
        total = b.total().to(grad.dtype)
        if isinstance(b, ElementwiseBound):  # rows can cancel within a sample too
            t = b.R[0].abs() if b.Xhat is None else (b.R[0] * b.Xhat).abs()
            terms = t.sum((0, 1)).reshape(grad.shape)
        elif grad.numel() * ctx.N <= 1 << 22:
            terms = b.per_sample()[0].abs().sum(0)
        else:
            terms = total.abs()
        scale = float(terms.max()) if terms.numel() else 0.0
        if scale == scale and torch.allclose(total, grad, rtol=tol, atol=tol * scale + 1e-30):
            return
    if not torch.isfinite(grad).all():
        return  # already reported by the non-finite gradient warning
    warnings.warn(
        f"curvopt: the gradient of '{ctx.name}' differs from the sum over its recorded module "
        "calls: the parameter is also used outside its module (e.g. a tied weight used via "
        "F.linear) or a gradient hook changed it. Its per-sample and curvature quantities "
        "cover only the recorded calls; route every use through the module.",
        RuntimeWarning,
        stacklevel=4,
    )


@contextmanager
def collect(model: nn.Module, loss_fn=None, *extensions: Quantity, set_attributes: bool = True,
            distributed="auto", gather: bool = False, batch_coupling: str = "error",
            loss_scaling: str = "warn", accumulate: bool = False):
    """Compute ``extensions`` during the backward passes inside the ``with`` block.

    .. code-block:: python

        with curvopt.collect(model, loss_fn, BatchGrad(), KFLR()):
            loss_fn(model(X), y).backward()
        model[0].weight.grad_batch, model[0].weight.kflr

    Hooks are installed on entry and all removed on exit, also when the body
    raises.  One backward pass per block: a second raises :class:`CollectError`
    (use a :class:`Collector` for a loop), unless ``accumulate=True``: then the
    backward passes of the block are micro-batches of one batch, and the results
    describe their union (see :class:`Collector`).  ``loss_fn`` may be ``None`` when only
    first-order quantities are requested.  Yields the :class:`Collector` (``.results``
    keyed by parameter name).
    """
    if isinstance(loss_fn, Quantity):
        extensions = (loss_fn, *extensions)
        loss_fn = None
    col = Collector(model, loss_fn, extensions, set_attributes=set_attributes,
                    distributed=distributed, gather=gather, single_backward=True,
                    batch_coupling=batch_coupling, loss_scaling=loss_scaling,
                    accumulate=accumulate)
    col.attach()
    try:
        yield col
    finally:
        col.detach()

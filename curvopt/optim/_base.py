"""The thin adapter shared by curvopt's optimizers: engine, schedule, state, checks.

:class:`CurvatureOptimizer` is a ``torch.optim.Optimizer`` that holds a
:class:`curvopt.Collector` on the model (the same hooks as
:func:`curvopt.collect`), so the user writes the ordinary loop::

    opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()

Per step it

1. before the forward (at the end of the previous ``step()``, or before
   calling a closure) sets ``collector.extensions`` to what the update of
   the *next* step needs (``_extensions_for_step``) plus the tracked
   quantities, and ``collector.only`` to which parameters need which
   (``_only``); an idle step gets ``()`` and the hooks cost nothing;
2. in ``step()`` checks the loss (recorded by a forward hook on the loss
   module, or returned by the closure), the gradients and the fresh
   statistics for finiteness -- a non-finite value skips the step with a
   warning and leaves every state untouched;
3. calls the subclass's ``_update`` (pure functions of
   :mod:`curvopt.optim.functional`) on a :class:`Transaction`: copies of the
   per-parameter states and the parameter moves, applied together only when
   the whole update has been computed.  An exception (or ``KeyboardInterrupt``)
   inside ``step()`` therefore leaves parameters and state as they were, and
   the raw statistics of the step's backward are stored in ``self.state[p]``
   under their savefields (plain lists and tensors) with the same commit.

Monte-Carlo sampling and bit-exact resume
-----------------------------------------
The engine draws MC targets (``KFAC``, ``DiagGGNMC``) from
``collector.mc_generator(device)``: here a private ``torch.Generator`` per
optimizer and per device, created on first use and seeded ``seed + rank``.
Hence

* MC sampling never touches torch's global RNG (data order and dropout are
  the same as with any other optimizer; ``torch.get_rng_state()`` is unchanged
  by a whole iteration), and two optimizers in two threads are independent;
* the generator states (``uint8`` tensors) are part of ``state_dict()``
  (``"curvopt"`` entry), so a resumed run draws the same samples: it
  continues bit-exactly;
* a step that is skipped (non-finite values) or fails, and a backward that is
  interrupted, give their draws back: the streams are restored to where they
  were before that backward.

The seed defaults to one draw from torch's global RNG at construction, so
``torch.manual_seed`` before constructing makes runs reproducible.

Life cycle
----------
* **One optimizer per model.**  A new curvopt optimizer on a model whose
  earlier curvopt optimizer is still alive (a notebook cell run twice, an LR
  scheduler holding the old one) takes the model over with a warning; the old
  one is closed and raises :class:`~curvopt.errors.CollectError` if stepped.
  :meth:`CurvatureOptimizer.close` releases a model explicitly.
* **Parameters** must belong to the model; :meth:`add_param_group` brings new
  ones under the engine (progressive unfreezing: unfreeze, then add); the
  engine's hooks follow ``requires_grad`` changes of the optimizer's
  parameters at the next step.
* **Nothing wedges.**  A backward that did not finish (an exception in a hook,
  an interrupt) is noticed at the next forward or ``step()``: its MC draws are
  given back (the engine forgets the half-done pass itself), so the next
  iteration is an ordinary one; an exception inside ``step()`` changes nothing.
* **Checkpoints** hold tensors, numbers, strings and plain containers only
  (``torch.load`` with its default ``weights_only=True`` reads them).
  :meth:`load_state_dict` checks the optimizer class, the hyperparameter keys
  and the parameter and state shapes, and raises :class:`OptimizerError`
  before changing anything; every state tensor keeps the dtype it was saved with
  (``torch.optim`` would cast float64 caches of a float32 model to float32).

Loss scaling (``torch.amp.GradScaler``)
---------------------------------------
``scaler.scale(loss).backward(); scaler.step(opt); scaler.update()`` works as
with any ``torch.optim`` optimizer: the scaler unscales ``p.grad`` and calls
``step()`` only when the gradients are finite.  Curvature quantities are
computed from the loss module itself and do not see the scale; the engine
divides the first-order statistics by it (``collector.loss_scaling =
"unscale"``).  Where the engine does not offer that yet, the optimizer divides
the first-order statistics itself (``grad_batch`` by :math:`s`,
``sum_grad_squared``, ``variance``, ``batch_l2`` by :math:`s^2`) by the factor
:math:`s = \\partial\\,\\text{total} / \\partial\\,\\text{loss}` it observes.

Under ``torch.distributed``
---------------------------
With a process group of more than one rank initialized (see
:mod:`curvopt.optim._distributed`):

* the engine's statistics already describe the global batch, so every
  optimizer state is replicated (identical on all ranks);
* a ``DistributedDataParallel`` model has its gradients averaged by DDP; for
  a plain model the optimizer averages them in ``step()``, weighted by the
  ranks' batch sizes (:attr:`sync_gradients`, ``"auto"``; ``False`` when the
  training loop averages them itself);
* whether the loss was finite is agreed over the ranks, so all skip a step or
  none does;
* rank ``r``'s private MC streams are seeded with ``seed + r``: the ranks draw
  different samples, deterministically.  ``state_dict()`` holds the streams of
  the rank that saved it (``"mc_rng_rank"``); loaded on that rank (rank 0 of
  a checkpoint written by rank 0, or a single process) they continue
  bit-exactly; any other rank derives fresh streams from the saved states and
  its rank.  Everything else in the state dict is the same on every rank, so a
  checkpoint of rank 0 loads on any world size.  Tracked per-sample
  quantities (``grad_batch``, ``batch_l2``) are the saving rank's own.
"""

from __future__ import annotations

import hashlib
import math
import warnings
import weakref
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

from .. import losses
from .._threads import is_small, one_thread
from ..engine import Collector
from ..engine.collector import non_finite
from ..errors import CollectError, CurvoptError
from ..extensions import (
    KFAC,
    KFLR,
    KFRA,
    BatchGrad,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    DiagHessian,
    Extension,
    SumGradSquared,
    Variance,
)
from . import _distributed as D
from . import functional as F

__all__ = [
    "CurvatureOptimizer",
    "OptimizerError",
    "CurvatureChoiceWarning",
    "Transaction",
    "parse_track",
    "ALL_EXTENSIONS",
    "AUTO_EXACT_MAX_COLUMNS",
    "exact_columns",
]

#: The ten quantities, in the order ``track="all"`` requests them.
ALL_EXTENSIONS = (
    BatchGrad,
    SumGradSquared,
    Variance,
    BatchL2Grad,
    DiagGGNExact,
    DiagGGNMC,
    KFAC,
    KFLR,
    KFRA,
    DiagHessian,
)

#: ``curvature="auto"`` takes the exact loss-Hessian square root while it has at
#: most this many columns per sample (``C − 1`` for ``C`` classes), Monte Carlo
#: above.  Measured (exact cost over MC cost, both ``DiagGGN``, multiples of a plain
#: forward+backward, 2 CPU threads): MLP 784-256-256-C, N=128: 1.2x (C=4), 1.4x (8),
#: 2.2x (16), 3.4x (32), 11x (64), 21x (128); an embedding-LayerNorm-MLP language
#: model, 32 sequences of 16 tokens: 1.3x (V=4), 2.1x (8), 5.5x (16), 8.7x (32).
#: Ten columns keep ten-class problems (digits, CIFAR-10) exact at about 1.5x.
AUTO_EXACT_MAX_COLUMNS = 10

#: State entries shaped like their parameter, and entries that are Kronecker factor lists.
_PARAM_SHAPED = frozenset({
    "exp_avg", "exp_avg_curv", "exp_avg_sq", "var_avg", "gamma", "momentum_buffer", "kfe_scale",
    "diag_avg", "sum_grad_squared", "variance", "diag_ggn_exact", "diag_ggn_mc", "diag_h",
})
_FACTOR_LISTS = frozenset({"factors", "inverses", "eigenvectors", "kfac", "kflr", "kfra"})

#: model -> weak reference to the curvopt optimizer currently driving it.
_HOLDERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


class OptimizerError(CurvoptError, ValueError):
    """A curvopt optimizer cannot do what was asked (a foreign state dict or parameter)."""


class CurvatureChoiceWarning(UserWarning):
    """Once per optimizer: which curvature it chose and which parameters get which block.

    Silence with ``warnings.filterwarnings("ignore", category=CurvatureChoiceWarning)``.
    """


def parse_track(track: Any) -> tuple[Extension, ...]:
    """Normalise ``track``: ``"all"``, or an iterable of extension instances, classes or names.

    Names may be savefields (``"diag_ggn_exact"``) or class names (``"DiagGGNExact"``),
    case-insensitive.
    """
    if track is None:
        return ()
    if isinstance(track, str) and track.lower() == "all":
        return tuple(cls() for cls in ALL_EXTENSIONS)
    if isinstance(track, (str, Extension, type)):
        track = [track]
    by_name = {}
    for cls in ALL_EXTENSIONS:
        by_name[cls.savefield.lower()] = cls
        by_name[cls.__name__.lower()] = cls
    out = []
    for t in track:
        if isinstance(t, Extension):
            out.append(t)
        elif isinstance(t, type) and issubclass(t, Extension) and t is not Extension:
            out.append(t())
        elif isinstance(t, str) and t.lower() in by_name:
            out.append(by_name[t.lower()]())
        else:
            valid = ", ".join(c.savefield for c in ALL_EXTENSIONS)
            raise ValueError(f"track: unknown quantity {t!r}; valid: 'all' or any of {valid}")
    return tuple(out)


def exact_columns(loss_fn: nn.Module, output: Tensor, batch: int | None = None,
                  coupled: bool = False) -> int:
    """Columns per model sample of the exact loss-Hessian square root the engine sends back.

    ``C − 1`` per position for cross-entropy / NLL over ``C`` classes (times the
    positions of ``[N, C, d…]`` outputs), one per output element otherwise; times
    ``T`` when the loss sees ``[N·T, …]`` rows of a model batch of ``batch = N``
    (``logits.reshape(-1, V)``: the engine gives each row its own columns); times ``N``
    when a layer couples the samples.
    """
    if isinstance(loss_fn, (nn.CrossEntropyLoss, nn.NLLLoss)) and output.dim() >= 2:
        per_row = (output.shape[1] - 1) * math.prod(output.shape[2:])
    else:
        per_row = output[0].numel() if output.dim() else 1
    rows = output.shape[0] if output.dim() else 1
    if batch and rows != batch and rows % batch == 0:
        per_row *= rows // batch
    # a layer coupling the batch (train-mode BatchNorm): the engine isolates each sample's
    # columns, N times as many
    return per_row * (batch or rows) if coupled else per_row


def _merge(required: Iterable[Extension], tracked: Iterable[Extension]) -> tuple[Extension, ...]:
    """Required extensions first; a tracked one with the same savefield is dropped."""
    out, seen = [], set()
    for e in chain(required, tracked):
        if e.savefield not in seen:
            seen.add(e.savefield)
            out.append(e)
    return tuple(out)


def _weak_method(obj, name: str):
    """A function calling ``obj.<name>(...)`` that does not keep ``obj`` alive."""
    ref = weakref.ref(obj)

    def call(*args, **kwargs):
        o = ref()
        return None if o is None else getattr(o, name)(*args, **kwargs)

    return call


def _rng_key(device) -> str:
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return str(device)


def _plain(value: Any) -> Any:
    """``value`` with every list subclass (the engine's ``Factors``) turned into a plain list."""
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def _copy_to(value: Any, device: torch.device) -> Any:
    """Deep copy of a state value, tensors moved to ``device`` with their dtype kept."""
    if isinstance(value, Tensor):
        return value.detach().clone().to(device)
    if isinstance(value, dict):
        return {k: _copy_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to(v, device) for v in value)
    return value


def _floats(value: Any, out: list) -> list:
    """Append every floating tensor in ``value`` (nested lists, tuples, dicts)."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            out.append(value.detach())
    elif isinstance(value, (list, tuple)):
        for v in value:
            _floats(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _floats(v, out)
    return out


def _all_finite(value: Any) -> bool:
    """Whether every floating tensor in ``value`` is finite (one device sync for all of them)."""
    return _grads_finite(_floats(value, []))


def _grads_finite(grads: list[Tensor]) -> bool:
    """Whether every tensor is finite (:func:`curvopt.engine.collector.non_finite`; a sparse
    gradient by its stored values)."""
    return not non_finite([g.coalesce().values() if g.is_sparse else g for g in grads])


def _derived_streams(states: dict[str, Tensor], rank: int) -> dict[str, Tensor]:
    """Rank ``rank``'s private streams derived from another rank's saved states.

    The seed is a hash of the saved state and the rank, so the result is
    deterministic and differs between ranks.
    """
    out = {}
    for key, state in states.items():
        h = hashlib.sha256(state.cpu().numpy().tobytes() + f"/rank{rank}".encode())
        seed = int.from_bytes(h.digest()[:8], "little") >> 1
        try:
            gen = torch.Generator(device=key)
        except RuntimeError:  # a device this process does not have: seeded lazily
            continue
        gen.manual_seed(seed)
        out[key] = gen.get_state()
    return out


def _first_tensor(args, kwargs) -> Tensor | None:
    for x in chain(args, kwargs.values()):
        if isinstance(x, Tensor) and x.dim() > 0:
            return x
    return None


def _functorch_wrapped(x: Tensor) -> bool:
    """Whether ``x`` is a torch.func (vmap/grad) wrapper: the engine re-running a module."""
    check = getattr(torch._C._functorch, "is_functorch_wrapped_tensor", None)
    return bool(check(x)) if check is not None else False


class Transaction(dict):
    """The state changes and parameter moves of one step, applied together by :meth:`commit`.

    ``tx[p]`` is a shallow copy of ``optimizer.state[p]`` (made on first access);
    update rules assign new values to it (never modify its tensors in place), and
    :meth:`move` queues :math:`\\theta \\leftarrow (1 - \\eta\\omega)\\theta - \\eta d`.
    Until :meth:`commit`, the optimizer's state and the parameters are untouched.
    """

    def __init__(self, state: dict):
        super().__init__()
        self.state = state
        self.moves: list[tuple[Tensor, Tensor, float, float]] = []

    def __missing__(self, p: Tensor) -> dict:
        st = dict(self.state[p]) if p in self.state else {}
        self[p] = st
        return st

    def param_state(self, p: Tensor) -> dict:
        """``tx[p]`` with a step count (``torch.optim``'s convention: a tensor)."""
        st = self[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
        return st

    def move(self, p: Tensor, direction: Tensor, lr: float, weight_decay: float) -> None:
        self.moves.append((p, direction, lr, weight_decay))

    def count_step(self, p: Tensor) -> None:
        st = self.param_state(p)
        st["step"] = st["step"] + 1  # a new tensor: the committed state keeps its own

    def commit(self) -> None:
        for p, st in self.items():
            self.state[p] = st
        # one fused update per (lr, weight decay, device, dtype), as torch.optim's foreach
        # path: the per-parameter calls cost more than their arithmetic on small layers
        groups: dict = {}
        for p, d, lr, wd in self.moves:
            ps, ds = groups.setdefault((lr, wd, p.device, p.dtype, d.dtype), ([], []))
            ps.append(p)
            ds.append(d)  # not cast: the add rounds once, in the parameter's dtype
        for (lr, wd, *_), (ps, ds) in groups.items():
            F.apply_updates_(ps, ds, lr, wd)
        self.clear()
        self.moves.clear()


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` holding a :class:`curvopt.Collector`.

    Args:
        model: the model whose trainable parameters are optimised.
        loss_fn: the loss *module* the training loop applies to the model output
            (``None`` only for optimizers that need no second-order quantity).
        defaults: per-group hyperparameters (``torch.optim`` convention).
        params: parameters or parameter groups (``[{"params": ..., "lr": ...}]``) of
            ``model``; default: ``[p for p in model.parameters() if p.requires_grad]``.
        track: extra quantities to compute every step (every :attr:`track_every` steps)
            and store in ``state[p]``: ``"all"`` (all ten) or a list of extension
            instances/classes/names.  Default: only what the update needs.
        seed: seed of the private MC streams.

    Subclasses implement ``_extensions_for_step(step)`` and
    ``_update(step, stats, loss, closure, tx)``; optionally ``_only(exts)``,
    ``_choose_curvature(output)``, ``_engine_attached()``, ``_params_added(params)``,
    ``_extra_state()``, ``_check_extra_state(extra)``, ``_load_extra_state(extra)``.
    """

    def __init__(
        self,
        model: nn.Module,
        loss_fn: nn.Module | None,
        defaults: dict,
        *,
        params=None,
        track: Any = (),
        seed: int | None = None,
    ):
        if not isinstance(model, nn.Module):
            raise TypeError(
                f"{type(self).__name__}(model, loss_fn, ...): model must be an nn.Module, got "
                f"{type(model).__name__}; pass parameter groups as params=[...]"
            )
        self.model = model  # add_param_group (called by torch's __init__) checks membership
        self.loss_fn = loss_fn
        self._collector = None
        self._closed = True
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        self.track = parse_track(track)
        self._global_step = 0
        # step() calls so far, taken or skipped: the tracking schedule counts them, so that
        # it stays aligned with the training loop's iterations after a skipped step
        self._calls = 0
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self._mc_seed = int(seed)
        self._generators: dict[str, torch.Generator] = {}
        self._rng_pending: dict[str, Tensor] = {}  # loaded states of streams not created yet
        self._rng_snapshot: dict[str, Tensor] | None = None  # streams before this backward's draws
        self._last_loss: Tensor | None = None
        self._batch_size: int | None = None
        self._dist_loss_bad = False
        # The loss normalizer z (the 'mean' denominator) of the backward passes since the
        # last step, as the engine normalizes the batch's statistics with it; tracked only
        # for updates that need it (`_needs_normalizer`).
        self._pending_z: Tensor | None = None  # of the last loss call, until its backward
        self._batch_z: Tensor | float = 0.0  # summed over this batch's backward passes
        self._step_z: Tensor | float = 0.0  # the batch's, during step()
        self._in_backward = False
        self._coupling_noted: set[str] = set()
        self._superseded_by: str | None = None
        self._trainable: tuple = ()
        #: ``"auto"``: average the gradients over ranks in ``step()`` unless the model is
        #: ``DistributedDataParallel`` (which does); ``True``/``False``: always/never.
        self.sync_gradients: bool | str = "auto"
        self._track_every = 1
        self._take_over()
        self._closed = False
        self._handles = [
            model.register_forward_pre_hook(_weak_method(self, "_model_pre_hook"),
                                            with_kwargs=True),
            model.register_forward_hook(_weak_method(self, "_model_hook")),
        ]
        if isinstance(loss_fn, nn.Module):
            self._handles += [
                loss_fn.register_forward_hook(_weak_method(self, "_loss_check_hook"),
                                              prepend=True),
                loss_fn.register_forward_hook(_weak_method(self, "_loss_hook")),
            ]
        self._attach()
        self._schedule()

    # ------------------------------------------------------------------- life cycle
    def _take_over(self) -> None:
        ref = _HOLDERS.get(self.model)
        old = ref() if ref is not None else None
        if old is not None and old is not self and not old._closed:
            warnings.warn(
                f"{type(self).__name__}: this model is still driven by a {type(old).__name__} "
                "(a notebook cell run twice, or an LR scheduler holding the old optimizer); the "
                "new optimizer takes it over and the old one raises if stepped again. Call "
                ".close() on an optimizer you replace to release the model without this warning.",
                RuntimeWarning,
                stacklevel=4,
            )
            old.close()
            old._superseded_by = type(self).__name__

    def _attach(self) -> None:
        """(Re-)attach a fresh engine: new hooks for the current trainable parameters."""
        if self._collector is not None:
            self._collector.detach()
        # Statistics describe the loss module whatever GradScaler or `loss / k` multiply it
        # by; the backward passes between two steps are micro-batches of one batch; layers
        # that mix samples (train-mode BatchNorm) are read row by row (the K-FAC practice).
        col = Collector(self.model, self.loss_fn, extensions=(), set_attributes=False,
                        loss_scaling="unscale", accumulate=True, batch_coupling="rows")
        col.mc_generator = _weak_method(self, "_generator")
        col.attach()
        _HOLDERS[self.model] = weakref.ref(self)
        self._collector = col
        self._consumed_results = col.results
        self._trainable = self._trainable_signature()
        self._engine_attached()

    def _trainable_signature(self) -> tuple:
        return tuple(p.requires_grad for g in self.param_groups for p in g["params"])

    def _engine_attached(self) -> None:
        """Called after every (re-)attach of the engine (the set of trainable parameters changed)."""

    def close(self) -> None:
        """Remove every hook from the model and the loss; the optimizer cannot step after."""
        for h in getattr(self, "_handles", ()):
            h.remove()
        self._handles = []
        if not self._closed and self._collector is not None:
            self._collector.detach()
        self._closed = True
        ref = _HOLDERS.get(self.model)
        if ref is not None and ref() is self:
            del _HOLDERS[self.model]

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown, half-built object
            pass

    def _check_usable(self) -> None:
        if not self._closed:
            return
        name = type(self).__name__
        if self._superseded_by is not None:
            raise CollectError(
                f"{name}.step(): a newer {self._superseded_by} was created on the same model "
                "and took it over, so this optimizer was closed. Step the new optimizer (and "
                "build LR schedulers on it), or close() the new one and create this one again."
            )
        raise CollectError(f"{name}.step() after close(): create a new optimizer for the model.")

    def add_param_group(self, param_group: dict) -> None:
        """Add a parameter group (``torch.optim``'s contract); its parameters come under the engine.

        The parameters must belong to the model.  For progressive unfreezing set
        ``requires_grad=True`` and add them here; the engine's hooks are re-attached
        before the next forward pass.
        """
        group = dict(param_group)
        ps = group.get("params")
        if isinstance(ps, Tensor):
            ps = [ps]
        elif ps is not None and not isinstance(ps, set):
            ps = list(ps)
        group["params"] = ps
        if isinstance(ps, list):
            owned = {id(p) for p in self.model.parameters()}
            foreign = [tuple(p.shape) for p in ps if id(p) not in owned]
            if foreign:
                raise OptimizerError(
                    f"{type(self).__name__}: {len(foreign)} parameter(s) of shape(s) {foreign} are "
                    "not parameters of the model the optimizer was built on, and the engine "
                    "computes statistics only for the model's parameters. Register them in the "
                    "model (as part of a submodule) first, or use a separate torch.optim optimizer."
                )
        super().add_param_group(group)
        if self._collector is not None and not self._closed:
            self._params_added(ps)
            self._attach()
            self._schedule()

    def _params_added(self, params: list[Tensor]) -> None:
        """Called when ``add_param_group`` added ``params`` after construction."""

    # ------------------------------------------------------------------ MC streams
    def _generator(self, device) -> torch.Generator:
        """The private MC stream for ``device`` (the engine's ``mc_generator``)."""
        if self._rng_snapshot is None:  # first draw of this backward: remember for an undo
            self._rng_snapshot = self._rng_states()
        key = _rng_key(device)
        gen = self._generators.get(key)
        if gen is None:
            gen = torch.Generator(device=key)
            state = self._rng_pending.pop(key, None)
            if state is None:
                gen.manual_seed(self._mc_seed + D.rank())  # rank r: seed + r
            else:
                gen.set_state(state)
            self._generators[key] = gen
        return gen

    def _rng_states(self) -> dict[str, Tensor]:
        return {**self._rng_pending, **{k: g.get_state() for k, g in self._generators.items()}}

    def _undo_draws(self) -> None:
        """Give back the MC draws of the last backward (a skipped or failed step)."""
        if self._rng_snapshot is not None:
            self._generators.clear()
            self._rng_pending = self._rng_snapshot
        self._rng_snapshot = None

    # ----------------------------------------------------------------------- hooks
    def _model_pre_hook(self, module, args, kwargs):
        if self._in_backward:
            self._recover()
        x = _first_tensor(args, kwargs)
        if x is not None and torch.is_grad_enabled() and not _functorch_wrapped(x):
            self._batch_size = int(x.shape[0])

    def _model_hook(self, module, args, output):
        out = _first_tensor((output,) if isinstance(output, Tensor) else output, {}) \
            if isinstance(output, (Tensor, tuple, list)) else None
        if out is not None and out.requires_grad and not _functorch_wrapped(out):
            out.register_hook(_weak_method(self, "_backward_reached_model"))

    def _loss_check_hook(self, module, args, output):
        # Runs before the engine's loss hook: it may still change what the engine computes.
        if not (torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad):
            return
        if args and isinstance(args[0], Tensor) and self._choose_curvature(args[0]):
            self._schedule()
        if not any(e.needs_loss for e in self._collector.extensions):
            return
        # A non-finite loss would make the engine's second-order backward fail (MC sampling
        # from NaN probabilities) or return NaN statistics: switch the engine off for this
        # pass; step() then skips the step.  Under torch.distributed the ranks agree first
        # (the engine's reductions are collectives: all ranks must run them, or none).
        bad = not bool(torch.isfinite(output).all())
        if D.active():
            bad = self._dist_loss_bad = D.allreduce_flag(bad, output.device)
        if bad:
            self._collector.extensions = ()

    def _loss_hook(self, module, args, output):
        if torch.is_grad_enabled() and isinstance(output, Tensor) and output.requires_grad:
            self._last_loss = output.detach()
            output.register_hook(_weak_method(self, "_backward_started"))
            if self._needs_normalizer and len(args) >= 2 and isinstance(args[1], Tensor):
                self._pending_z = losses.of(module).normalizer(args[0], args[1]).double()

    def _backward_started(self, g: Tensor) -> None:
        # The loss output is where every backward through the loss begins: before the
        # engine's loss-input hook draws MC samples.
        self._rng_snapshot = None
        if self._pending_z is not None:  # this backward's batch joins the step's batch
            self._batch_z = self._batch_z + self._pending_z
            self._pending_z = None
        self._backward_reached_model(g)

    #: whether the update needs :meth:`_normalizer` (the loss's normalizer of the batch)
    _needs_normalizer = False

    def _normalizer(self) -> Tensor | float:
        """:math:`z = 1/f` of the step's batch on this rank, as the engine normalizes the
        statistics: the sum of the backward passes' ``'mean'`` denominators (micro-batches);
        1 for a ``'sum'`` loss.  Under ``torch.distributed`` the global batch's is the sum
        over ranks (for a ``'mean'`` loss)."""
        if getattr(self.loss_fn, "reduction", "mean") == "sum":
            return 1.0
        return self._step_z

    def _backward_reached_model(self, g: Tensor) -> None:
        """A backward is running; a callback at its end says it finished (else: _recover)."""
        if not self._in_backward:
            self._in_backward = True
            torch.autograd.Variable._execution_engine.queue_callback(
                _weak_method(self, "_backward_finished")
            )

    def _backward_finished(self) -> None:
        self._in_backward = False

    def zero_grad(self, set_to_none: bool = True) -> None:
        """``torch.optim``'s ``zero_grad``; also starts a new batch of statistics (a pass
        whose step was skipped, by GradScaler say, is not carried into the next step)."""
        super().zero_grad(set_to_none=set_to_none)
        if self._collector is not None:
            self._collector.reset()
        self._batch_z = 0.0

    def _note_coupling(self) -> None:
        """Say once which layers couple the samples (train-mode BatchNorm) and how they are read."""
        new = self._collector.coupled_layers - self._coupling_noted
        if new:
            self._coupling_noted |= new
            warnings.warn(
                f"{type(self).__name__}: layer(s) {', '.join(sorted(new))} normalize with the "
                "statistics of the batch (BatchNorm in train mode), which couples its samples; "
                "curvopt reads the rows of what flows back as samples (the K-FAC practice, "
                "batch_coupling='rows').",
                CurvatureChoiceWarning,
                stacklevel=4,
            )

    def _recover(self) -> None:
        """The last backward did not finish (an exception or interrupt inside it).

        Its MC draws are given back; the engine forgets the half-done pass itself at
        the next forward (``Collector._recover``), so the next iteration is an ordinary one.
        """
        self._in_backward = False
        self._undo_draws()

    # -------------------------------------------------------------------- schedule
    def _extensions_for_step(self, step: int) -> tuple[Extension, ...]:
        """The quantities the update of (1-based) ``step`` needs."""
        raise NotImplementedError

    def _only(self, extensions: tuple[Extension, ...]) -> dict | None:
        """``collector.only`` for ``extensions`` (``None``: every quantity for every parameter)."""
        return None

    def _choose_curvature(self, output: Tensor) -> bool:
        """Called with the loss input before the engine sees it; ``True`` if the choice changed."""
        return False

    def _schedule(self) -> None:
        if self._closed:
            return
        if self._trainable_signature() != self._trainable:
            self._attach()  # parameters were (un)frozen: hook what is trainable now
        step = self._global_step + 1
        track = self.track if (self._calls + 1) % self._track_every == 0 else ()
        exts = _merge(self._extensions_for_step(step), track)
        self._collector.extensions = exts
        self._collector.only = self._only(exts)

    @property
    def track_every(self) -> int:
        """``track`` is computed on the ``t``-th call of :meth:`step` (1-based, skipped
        steps counted: the loop's iteration) with ``t % track_every == 0`` only: a training
        loop that logs every k iterations need not pay for them in between."""
        return self._track_every

    @track_every.setter
    def track_every(self, k: int) -> None:
        if int(k) != k or k < 1:
            raise ValueError(f"track_every must be a positive integer, got {k}")
        self._track_every = int(k)
        self._schedule()

    @property
    def collector(self):
        """The :class:`curvopt.Collector` this optimizer holds (read-only use)."""
        return self._collector

    # ------------------------------------------------------------------------ step
    def _params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _fresh_stats(self) -> dict[Tensor, dict] | None:
        """Statistics of the backward since the last step, or ``None`` if there was none."""
        if not self._collector.extensions:
            return None
        if self._collector.results is self._consumed_results:
            return None
        return {
            p: _plain(self._collector.param_results(p))
            for g in self.param_groups for p in g["params"]
        }

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step (see the module docstring); returns the closure's loss."""
        self._check_usable()
        if self._in_backward:
            self._recover()
        loss = None
        if closure is not None:
            self._schedule()
            with torch.enable_grad():
                loss = closure()
        try:
            # small parameters: every operation of the step is small (see curvopt._threads)
            with one_thread(is_small(p for g in self.param_groups for p in g["params"])):
                self._step(loss, closure)
        except BaseException:
            self._undo_draws()  # the failed step used nothing: its samples are drawn again
            raise
        finally:
            self._rng_snapshot = None
            self._last_loss = None
            self._calls += 1
            self._schedule()
        return loss

    def _step(self, loss, closure) -> None:
        params = self._params_with_grad()
        stats = self._fresh_stats()
        bad = self._non_finite(params, stats, loss)
        if stats is not None:
            self._consumed_results = self._collector.results
        self._collector.reset()  # the next backward starts the next step's batch
        self._step_z, self._batch_z = self._batch_z, 0.0
        self._note_coupling()
        if bad is not None:
            warnings.warn(
                f"{type(self).__name__}: non-finite {bad} at step {self._global_step + 1}; "
                "the step is skipped and the optimizer state left unchanged.",
                RuntimeWarning,
                stacklevel=4,
            )
            self._undo_draws()  # the skipped pass drew no samples
            return
        tx = Transaction(self.state)
        for p, res in (stats or {}).items():
            if res:
                tx[p].update(res)
        step = self._global_step + 1
        taken = self._update(step, stats, loss, closure, tx)
        tx.commit()
        if taken is not False:
            self._global_step = step

    def _non_finite(self, params, stats, loss) -> str | None:
        """What is not finite (``"loss"``, ``"gradient"``, ``"curvature statistic"``), or ``None``."""
        checked = loss if isinstance(loss, Tensor) else self._last_loss
        loss_bad = checked is not None and not bool(torch.isfinite(checked).all())
        loss_bad = self._sync(params, loss_bad or self._dist_loss_bad)
        self._dist_loss_bad = False
        if loss_bad:
            return "loss"
        if not _grads_finite([p.grad for p in params]):
            return "gradient"
        if stats is not None and not _all_finite(list(stats.values())):
            return "curvature statistic"
        return None

    def _update(self, step: int, stats: dict | None, loss, closure, tx: Transaction) -> bool | None:
        """Stage the update in ``tx``; return ``False`` to mark the step as not taken."""
        raise NotImplementedError

    def _nothing_moved(self, what: str) -> bool:
        """No parameter had what its update needs: the step is not taken (a warning at step 1)."""
        if self._global_step == 0:
            warnings.warn(f"{type(self).__name__}: {what}; step skipped.", RuntimeWarning,
                          stacklevel=5)
        return False

    def _sync(self, params: list[Tensor], loss_bad: bool) -> bool:
        """Under ``torch.distributed``: average the gradients (if due); agree on ``loss_bad``."""
        if not D.active():
            return loss_bad
        sync = self.sync_gradients
        if sync == "auto":
            sync = not isinstance(self.model, nn.parallel.DistributedDataParallel)
        if sync:
            mean = getattr(self.loss_fn, "reduction", "mean") != "sum"
            return D.average_gradients([p.grad for p in params], self._batch_size, mean,
                                       loss_bad)
        dev = params[0].device if params else None
        if dev is None:
            dev = next(iter(self.model.parameters())).device
        return D.allreduce_flag(loss_bad, dev)

    # ------------------------------------------------------------------ state dict
    def _param_names(self) -> dict[int, str]:
        return {id(p): n for n, p in reversed(list(self.model.named_parameters()))}

    def _extra_state(self) -> dict:
        return {}

    def _check_extra_state(self, extra: dict) -> str | None:
        """Why ``extra`` (the ``"curvopt"`` entry) cannot be loaded, or ``None``."""
        return None

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """``torch.optim``'s state dict plus a ``"curvopt"`` entry (class, step count, MC streams).

        Tensors, numbers, strings and plain containers only: ``torch.load`` reads it with
        ``weights_only=True``.
        """
        sd = super().state_dict()
        sd["curvopt"] = {
            "optimizer": type(self).__name__,
            "global_step": self._global_step,
            "mc_seed": self._mc_seed,
            "mc_rng": self._rng_states(),
            "mc_rng_rank": D.rank(),
            **self._extra_state(),
        }
        return sd

    def _state_dict_problem(self, sd: Any) -> str | None:
        """Why ``sd`` cannot be loaded into this optimizer, or ``None``."""
        if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
            return "this is not an optimizer state dict (it needs 'state' and 'param_groups')"
        extra = sd.get("curvopt")
        saved_cls = extra.get("optimizer") if isinstance(extra, dict) else None
        if saved_cls is not None and saved_cls != type(self).__name__:
            return f"the state dict was saved by a {saved_cls}"
        groups = sd["param_groups"]
        if len(groups) != len(self.param_groups):
            return f"it has {len(groups)} parameter group(s), this optimizer {len(self.param_groups)}"
        for i, (saved, own) in enumerate(zip(groups, self.param_groups, strict=True)):
            missing = sorted(set(self.defaults) - set(saved))
            if missing:
                return (f"parameter group {i} lacks the hyperparameter(s) {missing} (saved by "
                        f"another optimizer class than {type(self).__name__}?)")
            if len(saved["params"]) != len(own["params"]):
                return (f"parameter group {i} has {len(saved['params'])} parameters, this "
                        f"optimizer's {len(own['params'])} (another model?)")
        names = self._param_names()
        saved_ids = chain.from_iterable(g["params"] for g in groups)
        own_params = chain.from_iterable(g["params"] for g in self.param_groups)
        for idx, p in zip(saved_ids, own_params, strict=True):
            for key, value in sd["state"].get(idx, {}).items():
                why = _shape_problem(key, value, p)
                if why is not None:
                    return (f"state '{key}' of parameter '{names.get(id(p), '?')}' (shape "
                            f"{tuple(p.shape)}): {why} (saved for another architecture?)")
        if isinstance(extra, dict):
            return self._check_extra_state(extra)
        return None

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; every tensor keeps the dtype it was saved with.

        Raises:
            OptimizerError: the state dict is of another optimizer class, lacks
                hyperparameters, or does not fit the parameters (checked before anything
                changes).
        """
        why = self._state_dict_problem(state_dict)
        if why is not None:
            raise OptimizerError(
                f"{type(self).__name__}.load_state_dict: {why}; nothing was loaded."
            )
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvopt", None)
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        if extra is not None:
            self._load_extra_state(extra)  # first: a base optimizer validates its own part
        super().load_state_dict(state_dict)
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for idx, p in zip(saved_ids, params, strict=True):
            if idx in saved_state:
                self.state[p] = _copy_to(saved_state[idx], p.device)
        if extra is not None:
            self._global_step = int(extra["global_step"])
            self._mc_seed = int(extra["mc_seed"])
            states = {k: v.clone() for k, v in extra["mc_rng"].items()}
            if int(extra.get("mc_rng_rank", 0)) != D.rank():
                states = _derived_streams(states, D.rank())
            self._generators.clear()
            self._rng_pending = states
        self._consumed_results = self._collector.results
        self._rng_snapshot = None
        self._schedule()


def _shape_problem(key: str, value: Any, p: Tensor) -> str | None:
    """Why the saved state entry ``key`` does not fit parameter ``p``, or ``None``."""
    if isinstance(value, Tensor):
        if key in _PARAM_SHAPED and value.shape != p.shape:
            return f"saved shape {tuple(value.shape)}"
        if key == "grad_batch" and value.shape[1:] != p.shape:
            return f"saved shape {tuple(value.shape)}"
    elif key in _FACTOR_LISTS and isinstance(value, (list, tuple)) and value:
        try:
            F.kronecker_dims(p.shape, value)
        except ValueError as err:
            return str(err)
    return None

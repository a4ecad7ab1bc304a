"""The thin adapter shared by curvopt's optimizers: engine, schedule, state, checks.

:class:`CurvatureOptimizer` is a ``torch.optim.Optimizer`` that holds a
:class:`curvopt.Collector` on the model (the same hooks as
:func:`curvopt.collect`), so the user writes the ordinary loop::

    opt.zero_grad(); loss_fn(model(X), y).backward(); opt.step()

Per step it

1. before the forward (at the end of the previous ``step()``, or before
   calling a closure) sets ``collector.extensions`` to what the update of
   the *next* step needs (``_extensions_for_step``) plus the tracked
   quantities; an idle step gets ``()`` and the hooks cost nothing;
2. in ``step()`` checks the loss (recorded by a forward hook on the loss
   module, or returned by the closure), the gradients and the fresh
   statistics for finiteness -- a non-finite value skips the step with a
   warning and leaves every state untouched;
3. stores every statistic the backward computed in ``self.state[p]`` under
   its savefield (raw, as the engine gives it), and calls the subclass's
   ``_update`` (pure functions of :mod:`curvopt.optim.functional`).

Monte-Carlo sampling and bit-exact resume
-----------------------------------------
The engine draws MC targets (``KFAC``, ``DiagGGNMC``) from torch's global RNG
in a tensor hook on the loss input at the start of backward.  The optimizer
brackets exactly that hook with two hooks of its own (registered before and
after the engine's on the same tensor): the first swaps in the optimizer's
*private* RNG state, the second saves it and restores the user's.  Hence

* MC sampling never consumes the user's global RNG (data order and dropout
  are the same as with any other optimizer), and
* the private state is part of ``state_dict()`` (``"curvopt"`` entry), so a
  resumed run draws the same samples: it continues bit-exactly.

The private stream is seeded with ``seed`` (default: one draw from torch's
global RNG at construction, so ``torch.manual_seed`` before constructing makes
runs reproducible).

``load_state_dict`` restores every state tensor with the dtype it was saved
with (``torch.optim`` would cast float64 caches of a float32 model to float32).

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
* rank ``r``'s private MC stream is seeded with ``seed + r``: the ranks draw
  different samples, deterministically.  ``state_dict()`` holds the stream of
  the rank that saved it (``"mc_rng_rank"``); loaded on that rank (rank 0 of
  a checkpoint written by rank 0, or a single process) it continues
  bit-exactly; any other rank derives a fresh stream from the saved state and
  its rank.  Everything else in the state dict is the same on every rank, so a
  checkpoint of rank 0 loads on any world size.  Tracked per-sample
  quantities (``grad_batch``, ``batch_l2``) are the saving rank's own.
"""

from __future__ import annotations

import hashlib
import warnings
import weakref
from collections.abc import Iterable
from itertools import chain
from typing import Any

import torch
from torch import Tensor, nn

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

__all__ = ["CurvatureOptimizer", "parse_track", "ALL_EXTENSIONS"]

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
_MC = (KFAC, DiagGGNMC)


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


def _merge(required: Iterable[Extension], tracked: Iterable[Extension]) -> tuple[Extension, ...]:
    """Required extensions first; a tracked one with the same savefield is dropped."""
    out, seen = [], set()
    for e in chain(required, tracked):
        if e.savefield not in seen:
            seen.add(e.savefield)
            out.append(e)
    return tuple(out)


def _rng_key(device: torch.device) -> str:
    return "cpu" if device.type == "cpu" else str(device)


def _get_rng(device: torch.device) -> Tensor:
    if device.type == "cpu":
        return torch.get_rng_state()
    return torch.cuda.get_rng_state(device)


def _set_rng(device: torch.device, state: Tensor) -> None:
    if device.type == "cpu":
        torch.set_rng_state(state)
    else:
        torch.cuda.set_rng_state(state, device)


def _copy_to(value: Any, device: torch.device) -> Any:
    """Deep copy of a state value, tensors moved to ``device`` with their dtype kept."""
    if isinstance(value, Tensor):
        return value.detach().clone().to(device)
    if isinstance(value, dict):
        return {k: _copy_to(v, device) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_copy_to(v, device) for v in value)
    return value


def _sums(value: Any, out: list) -> list:
    """Append one scalar per floating tensor in ``value`` (NaN/inf propagate through a sum)."""
    if isinstance(value, Tensor):
        if value.is_floating_point():
            out.append(value.detach().sum().to(torch.float64))
    elif isinstance(value, (list, tuple)):
        for v in value:
            _sums(v, out)
    elif isinstance(value, dict):
        for v in value.values():
            _sums(v, out)
    return out


def _all_finite(value: Any) -> bool:
    """Whether every floating tensor in ``value`` is finite (one device sync for all of them)."""
    sums = _sums(value, [])
    if not sums:
        return True
    return bool(torch.isfinite(torch.stack(sums)).all())


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


class CurvatureOptimizer(torch.optim.Optimizer):
    """Base class: a ``torch.optim.Optimizer`` holding a :class:`curvopt.Collector`.

    Args:
        model: the model whose trainable parameters are optimised.
        loss_fn: the loss *module* the training loop applies to the model output
            (``None`` only for optimizers that need no second-order quantity).
        defaults: per-group hyperparameters (``torch.optim`` convention).
        params: parameters or parameter groups (``[{"params": ..., "lr": ...}]``);
            default: ``[p for p in model.parameters() if p.requires_grad]``.
        track: extra quantities to compute every step and store in
            ``state[p]``: ``"all"`` (all ten) or a list of extension
            instances/classes/names.  Default: only what the update needs.
        seed: seed of the private RNG stream used for MC sampling.

    Subclasses implement ``_extensions_for_step(step)`` and
    ``_update(step, stats)``.
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
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        super().__init__(params, defaults)
        from ..engine import Collector  # late import: the engine may import curvopt.optim lazily

        self.model = model
        self.loss_fn = loss_fn
        self.track = parse_track(track)
        self._global_step = 0
        if seed is None:
            seed = int(torch.randint(0, 2**62, (), dtype=torch.int64))
        self._mc_seed = int(seed)
        self._mc_rng: dict[str, Tensor] = {}
        self._mc_rng_before: dict[str, Tensor] | None = None  # for undoing a skipped step
        self._saved_user_rng: tuple[torch.device, Tensor] | None = None
        self._mc_scheduled = False
        self._last_loss: Tensor | None = None
        self._batch_size: int | None = None
        self._consumed_results = None
        self._dist_loss_bad = False
        #: ``"auto"``: average the gradients over ranks in ``step()`` unless the model is
        #: ``DistributedDataParallel`` (which does); ``True``/``False``: always/never.
        self.sync_gradients: bool | str = "auto"
        self._collector = Collector(model, loss_fn, extensions=(), set_attributes=False)
        self._collector.attach()
        self._consumed_results = self._collector.results
        self._handles = []
        ref = weakref.ref(self)

        def call(name):
            def hook(*args, **kwargs):
                obj = ref()
                if obj is not None:
                    return getattr(obj, name)(*args, **kwargs)
                return None

            return hook

        self._handles.append(model.register_forward_pre_hook(call("_model_pre_hook")))
        if isinstance(loss_fn, nn.Module):
            self._handles.append(loss_fn.register_forward_hook(call("_rng_in_hook"), prepend=True))
            self._handles.append(loss_fn.register_forward_hook(call("_loss_hook")))
        self._schedule()

    # --------------------------------------------------------------------------- hooks
    def _model_pre_hook(self, module, args):
        if args and isinstance(args[0], Tensor) and args[0].dim() > 0 and torch.is_grad_enabled():
            self._batch_size = int(args[0].shape[0])

    def _rng_in_hook(self, module, args, output):
        # Runs before the engine's loss hook.  A non-finite loss would make the engine's
        # second-order backward fail (MC sampling from NaN probabilities) or return NaN
        # statistics: switch the engine off for this pass; step() then skips the step.
        # Under torch.distributed the ranks agree first (the engine's reductions are
        # collectives: all ranks must run them, or none).
        second = any(e.needs_loss for e in self._collector.extensions)
        if (
            second
            and D.active()
            and torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
        ):
            self._dist_loss_bad = D.allreduce_flag(
                not bool(torch.isfinite(output).all()), output.device
            )
            if self._dist_loss_bad:
                self._collector.extensions = ()
                self._mc_scheduled = False
                return
        elif (
            torch.is_grad_enabled()
            and isinstance(output, Tensor)
            and output.requires_grad
            and second
            and not bool(torch.isfinite(output).all())
        ):
            self._collector.extensions = ()
            self._mc_scheduled = False
            return
        if self._mc_scheduled and torch.is_grad_enabled() and args:
            o = args[0]
            if isinstance(o, Tensor) and o.requires_grad:
                ref = weakref.ref(self)
                dev = o.device

                def swap_in(g):
                    obj = ref()
                    if obj is not None:
                        obj._swap_in_rng(dev)

                o.register_hook(swap_in)

    def _loss_hook(self, module, args, output):
        if not torch.is_grad_enabled() or not isinstance(output, Tensor):
            return
        if output.requires_grad:
            self._last_loss = output.detach()
        if self._mc_scheduled and args:
            o = args[0]
            if isinstance(o, Tensor) and o.requires_grad:
                ref = weakref.ref(self)

                def swap_out(g):
                    obj = ref()
                    if obj is not None:
                        obj._swap_out_rng()

                o.register_hook(swap_out)

    def _swap_in_rng(self, device: torch.device) -> None:
        if self._saved_user_rng is not None:
            return
        if self._mc_rng_before is None:
            self._mc_rng_before = dict(self._mc_rng)
        key = _rng_key(device)
        state = self._mc_rng.get(key)
        if state is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self._mc_seed + D.rank())  # rank r: seed + r
            state = gen.get_state()
        self._saved_user_rng = (device, _get_rng(device))
        _set_rng(device, state)

    def _swap_out_rng(self) -> None:
        if self._saved_user_rng is None:
            return
        device, user = self._saved_user_rng
        self._mc_rng[_rng_key(device)] = _get_rng(device)
        _set_rng(device, user)
        self._saved_user_rng = None

    def close(self) -> None:
        """Remove every hook from the model and the loss (the optimizer cannot step after)."""
        self._swap_out_rng()
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._collector.detach()

    def __del__(self):
        try:
            self.close()
        except Exception:  # pragma: no cover - interpreter shutdown
            pass

    # ------------------------------------------------------------------------ schedule
    def _extensions_for_step(self, step: int) -> tuple[Extension, ...]:
        """The quantities the update of (1-based) ``step`` needs."""
        raise NotImplementedError

    def _schedule(self) -> None:
        exts = _merge(self._extensions_for_step(self._global_step + 1), self.track)
        self._collector.extensions = exts
        self._mc_scheduled = any(isinstance(e, _MC) for e in exts)

    @property
    def collector(self):
        """The :class:`curvopt.Collector` this optimizer holds (read-only use)."""
        return self._collector

    # ---------------------------------------------------------------------------- step
    def _params_with_grad(self) -> list[Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    def _fresh_stats(self) -> dict[Tensor, dict] | None:
        """Statistics of the backward since the last step, or ``None`` if there was none."""
        if not self._collector.extensions:
            return None
        results = self._collector.results
        if results is self._consumed_results:
            return None
        return {p: self._collector.param_results(p) for g in self.param_groups for p in g["params"]}

    @torch.no_grad()
    def step(self, closure=None):
        """One optimisation step (see the class docstring); returns the closure's loss."""
        loss = None
        if closure is not None:
            self._schedule()
            with torch.enable_grad():
                loss = closure()
        self._swap_out_rng()  # safety: the engine raised between the two RNG hooks
        params = self._params_with_grad()
        stats = self._fresh_stats()
        checked_loss = loss if isinstance(loss, Tensor) else self._last_loss
        loss_bad = checked_loss is not None and not bool(torch.isfinite(checked_loss).all())
        loss_bad = self._sync(params, loss_bad or self._dist_loss_bad)
        self._dist_loss_bad = False
        bad = None
        if loss_bad:
            bad = "loss"
        elif not _all_finite([p.grad for p in params]):
            bad = "gradient"
        elif stats is not None and not _all_finite(list(stats.values())):
            bad = "curvature statistic"
        if bad is not None:
            warnings.warn(
                f"{type(self).__name__}: non-finite {bad} at step {self._global_step + 1}; "
                "the step is skipped and the optimizer state left unchanged.",
                RuntimeWarning,
                stacklevel=2,
            )
            if stats is not None:
                self._consumed_results = self._collector.results
            if self._mc_rng_before is not None:  # the skipped pass drew no samples
                self._mc_rng = self._mc_rng_before
            self._mc_rng_before = None
            self._last_loss = None
            self._schedule()
            return loss
        if stats is not None:
            self._consumed_results = self._collector.results
            for p, res in stats.items():
                if res:
                    self.state[p].update(res)
        step = self._global_step + 1
        if self._update(step, stats, loss, closure) is not False:
            self._global_step = step
        self._mc_rng_before = None
        self._last_loss = None
        self._schedule()
        return loss

    def _update(self, step: int, stats: dict | None, loss, closure) -> bool | None:
        """Apply the update; return ``False`` to mark the step as not taken."""
        raise NotImplementedError

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

    def _param_state(self, p: Tensor) -> dict:
        st = self.state[p]
        if "step" not in st:
            st["step"] = torch.tensor(0.0)
        return st

    # ---------------------------------------------------------------------- state dict
    def _extra_state(self) -> dict:
        return {}

    def _load_extra_state(self, extra: dict) -> None:
        pass

    def state_dict(self) -> dict:
        """``torch.optim``'s state dict plus a ``"curvopt"`` entry (step count, MC RNG, ...)."""
        sd = super().state_dict()
        sd["curvopt"] = {
            "global_step": self._global_step,
            "mc_seed": self._mc_seed,
            "mc_rng": {k: v.clone() for k, v in self._mc_rng.items()},
            "mc_rng_rank": D.rank(),
            **self._extra_state(),
        }
        return sd

    def load_state_dict(self, state_dict: dict) -> None:
        """Restore a :meth:`state_dict`; every tensor keeps the dtype it was saved with."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("curvopt", None)
        saved_state = state_dict["state"]
        saved_ids = list(chain.from_iterable(g["params"] for g in state_dict["param_groups"]))
        super().load_state_dict(state_dict)
        params = list(chain.from_iterable(g["params"] for g in self.param_groups))
        for idx, p in zip(saved_ids, params, strict=True):
            if idx in saved_state:
                self.state[p] = _copy_to(saved_state[idx], p.device)
        if extra is not None:
            self._global_step = int(extra["global_step"])
            self._mc_seed = int(extra["mc_seed"])
            self._mc_rng = {k: v.clone() for k, v in extra["mc_rng"].items()}
            if int(extra.get("mc_rng_rank", 0)) != D.rank():
                self._mc_rng = _derived_streams(self._mc_rng, D.rank())
            self._load_extra_state(extra)
        self._consumed_results = self._collector.results
        self._mc_rng_before = None
        self._schedule()

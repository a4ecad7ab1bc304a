"""Which curvature block each parameter gets, and why (KFACOptimizer's estimator).

kfac-jax users report parameters silently left out of the curvature ("orphaned",
kfac-jax #270, #344).  Here every parameter gets a block, by a plan read off
the model before training:

* **Kronecker** where the layer's rule says its ``kfac``/``kflr`` are Kronecker
  factors (:meth:`curvopt.rules.Rule.kronecker`: Linear, Conv, Embedding, ...)
  and both sides stay at most :data:`~curvopt.rules.layout.MAX_DENSE_BLOCK`;
* **diagonal** (the damped running GGN diagonal) for everything else: norm-layer
  affine parameters (by default; ``norm_blocks="dense"`` gives them their exact
  dense GGN block instead, up to the same size), parameters of modules without
  a Kronecker rule (the generic ``torch.func`` rule, a grouped convolution's
  weight, weight-normed layers), parameters shared by several modules (tied
  embeddings), and layers whose factors would be too large.

The plan mirrors how :meth:`curvopt.Collector.attach` assigns rules
(:func:`curvopt.rules.hooked`; a module on the generic rule, a parametrized one
included, covers its whole subtree).
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

from torch import Tensor, nn

from ..rules import walk
from ..rules.fallback import FallbackRule
from ..rules.layout import MAX_DENSE_BLOCK

__all__ = ["Block", "plan_blocks", "summary", "table", "NORM_BLOCKS"]

KRONECKER, DIAGONAL = "kronecker", "diagonal"
NORM_BLOCKS = ("diagonal", "dense")
_NORMS = tuple(t for t in (nn.modules.batchnorm._NormBase, nn.LayerNorm, nn.GroupNorm,
                           getattr(nn, "RMSNorm", None)) if t is not None)

# Reasons (the categories of the start-up summary).
NORM = "norm affine"
NO_RULE = "no Kronecker rule"
CONTAINER = "used by its container itself"
SHARED = "shared by several modules"
TOO_LARGE = f"Kronecker factor above {MAX_DENSE_BLOCK}"
NO_FACTORS = "no factors from the engine"
FROZEN = "not trainable when planned"


@dataclass(frozen=True)
class Block:
    """The block of one parameter: ``kind`` (``"kronecker"``/``"diagonal"``) and why."""

    kind: str
    reason: str  #: the category (the layer type for Kronecker blocks)
    detail: str = ""  #: module name and type, or what would be too large


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, _NORMS) or type(module).__name__.endswith("Norm")


def plan_blocks(model: nn.Module, params: list[Tensor], norm_blocks: str = "diagonal"
                ) -> dict[int, Block]:
    """The block of each of ``params`` (keyed by ``id``), as the engine will see the model."""
    owners: dict[int, list] = {}  # id(p) -> [(module name, module, parameter name, kronecker)]
    for site in walk(model):  # the engine's own view of the model
        if site.role == "container":  # read at the operation broadcasting it: a diagonal
            for n, p in site.params:
                owners.setdefault(id(p), []).append((site.name, site.module, n, CONTAINER))
        elif site.role == "layer":
            generic = isinstance(site.rule, FallbackRule)
            kron = site.rule.kronecker(site.module)
            for n, p in site.params:
                owners.setdefault(id(p), []).append(
                    (site.name, site.module, n, None if generic else n in kron))
    return {id(p): _block(p, owners.get(id(p), []), norm_blocks) for p in params}


def _block(p: Tensor, owners: list, norm_blocks: str) -> Block:
    if not owners:
        return Block(DIAGONAL, FROZEN, "no hooked module owns it (requires_grad=False?)")
    where = ", ".join(f"{m or '<model>'} ({type(mod).__name__})" for m, mod, _, _ in owners)
    if len({id(mod) for _, mod, _, _ in owners}) > 1:
        return Block(DIAGONAL, SHARED, where)
    mname, module, pname, kron = owners[0]
    if kron is None:
        return Block(DIAGONAL, NO_RULE, f"{where}: the generic per-sample rule")
    if kron == CONTAINER:
        return Block(DIAGONAL, CONTAINER, f"{where}.{pname}")
    if _is_norm(module):
        if norm_blocks == "dense" and p.numel() <= MAX_DENSE_BLOCK:
            return Block(KRONECKER, type(module).__name__, f"{where}: dense GGN block")
        return Block(DIAGONAL, NORM, where)
    if not kron:
        return Block(DIAGONAL, NO_RULE, f"{where}.{pname}")
    sides = (p.shape[0], p.numel() // p.shape[0]) if p.dim() else (1, 1)
    if max(sides) > MAX_DENSE_BLOCK:
        return Block(DIAGONAL, TOO_LARGE, f"{where}: factor sides {sides}")
    return Block(KRONECKER, type(module).__name__, where)


def summary(name: str, blocks: list[Block]) -> str:
    """One line: ``"KFACOptimizer: 24 Kronecker, 10 diagonal (norm affine: 8; ...)"``."""
    kinds = Counter(b.kind for b in blocks)
    why = Counter(b.reason for b in blocks if b.kind == DIAGONAL)
    detail = "; ".join(f"{r}: {c}" for r, c in why.most_common())
    return (f"{name}: {kinds[KRONECKER]} Kronecker, {kinds[DIAGONAL]} diagonal"
            + (f" ({detail})" if detail else ""))


def table(rows: list[tuple[str, tuple, Block]]) -> str:
    """A fixed-width table: parameter, shape, block, reason, where."""
    head = ("parameter", "shape", "block", "reason", "where")
    body = [(n, str(tuple(s)), b.kind, b.reason, b.detail) for n, s, b in rows]
    widths = [max(len(r[i]) for r in [head, *body]) for i in range(4)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r[:4], widths)) + "  " + r[4]
             for r in [head, *body]]
    return "\n".join(line.rstrip() for line in lines)

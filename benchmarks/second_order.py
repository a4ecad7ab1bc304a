#!/usr/bin/env python
"""Second-order quantities: cost relative to a plain forward+backward.

Rows: plain forward+backward (the unit), DiagGGNExact, DiagGGNMC, KFAC, KFLR,
KFRA, DiagHessian, all ten (the four first-order ones too).
Models: ReLU MLP (all rows), Sigmoid MLP (DiagHessian only unless --rows is
given: smooth activations make BackPACK's DiagHessian ~200x), 3c3d CNN.
Columns: curvopt (ratio, peak memory), torch.func (DiagGGNExact via per-class
vmap(grad) of the loss-Hessian square root; DiagGGNMC via vmap(grad) with
sampled labels; nothing else), BackPACK 1.7.1 (ratio, peak memory) under the
peer interpreter (default /tmp/bpvenv/bin/python).

BackPACK's KFRA on the CNN keeps a dense (C·H·W)² matrix per layer (~16 GiB);
it and "all ten" on the CNN are skipped with a note unless
--force-peer-kfra-cnn is given, in which case the run is killed at
--mem-budget-gib.  Every configuration has a time budget (--budget) and is
reported as "did not finish" past it.

Usage (from the repository root)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/second_order.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/second_order.py --quick --models mlp,cnn
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/second_order.py \
        --models sigmoid-mlp --rows KFAC,DiagHessian
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _driver as D  # noqa: E402
import _impls as I  # noqa: E402

ROWS = {
    I.PLAIN_LABEL: I.PLAIN,
    "DiagGGNExact": ("DiagGGNExact",),
    "DiagGGNMC": ("DiagGGNMC",),
    "KFAC": ("KFAC",),
    "KFLR": ("KFLR",),
    "KFRA": ("KFRA",),
    "DiagHessian": ("DiagHessian",),
    "all ten": I.ALL_TEN,
}

COLUMNS = [
    D.Column("curvopt", "curvopt", peer=False, show_mem=True),
    D.Column("torchfunc", "torch.func", peer=False, show_mem=True),
    D.Column("backpack", "BackPACK 1.7.1", peer=True, show_mem=True),
]

TORCHFUNC_ROWS = {"DiagGGNExact", "DiagGGNMC"}


def default_rows(model: str) -> list:
    if model == "sigmoid-mlp":
        return [I.PLAIN_LABEL, "DiagHessian"]
    return list(ROWS)


def skip(impl: str, model: str, row: str, args) -> str | None:
    """Cells not run: a note string, D.SILENT (cell shows "—"), or None (run it)."""
    if impl == "torchfunc" and row not in TORCHFUNC_ROWS:
        return D.SILENT
    if (
        impl == "backpack"
        and model == "cnn"
        and row in ("KFRA", "all ten")
        and not args.force_peer_kfra_cnn
    ):
        return (
            "BackPACK 1.7.1's KFRA keeps a dense (C·H·W)×(C·H·W) matrix per layer on the 3c3d "
            "CNN (about 16 GiB; out of memory in the reference measurement, 'all ten' does not "
            "finish); "
            "skipped rather than exhausting the shared machine. --force-peer-kfra-cnn tries it, "
            "killed at --mem-budget-gib."
        )
    return None


SPEC = D.Spec(
    title="curvopt benchmark: second-order quantities "
    "(cost as a multiple of a plain forward+backward)",
    script=os.path.abspath(__file__),
    rows=ROWS,
    columns=COLUMNS,
    default_models="mlp,sigmoid-mlp,cnn",
    default_rows=default_rows,
    skip=skip,
)

if __name__ == "__main__":
    sys.exit(D.main(SPEC))

#!/usr/bin/env python
"""First-order quantities: cost relative to a plain forward+backward.

Rows: plain forward+backward (the unit), hooks attached with nothing asked,
BatchGrad, SumGradSquared, Variance, BatchL2Grad, all four.
Columns: curvopt (ratio, peak memory), torch.func per-sample gradients
(``vmap(grad)``, the other quantities reduced from them), BackPACK 1.7.1
(ratio, peak memory) and Opacus (BatchGrad only); BackPACK and Opacus run
under the peer interpreter (default /tmp/bpvenv/bin/python) in subprocesses.

Usage (from the repository root)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/first_order.py
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/first_order.py --quick --models mlp
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/first_order.py --repeats 20 --json fo.json

Internal worker mode (what the driver runs, one configuration per process)::

    /tmp/bpvenv/bin/python benchmarks/first_order.py --peer backpack --model mlp --row BatchGrad
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _driver as D  # noqa: E402
import _impls as I  # noqa: E402

ROWS = {
    I.PLAIN_LABEL: I.PLAIN,
    I.HOOKS_LABEL: I.HOOKS,
    "BatchGrad": ("BatchGrad",),
    "SumGradSquared": ("SumGradSquared",),
    "Variance": ("Variance",),
    "BatchL2Grad": ("BatchL2Grad",),
    "all four": I.FIRST_ORDER,
}

COLUMNS = [
    D.Column("curvopt", "curvopt", peer=False, show_mem=True),
    D.Column("torchfunc", "torch.func vmap(grad)", peer=False, show_mem=True),
    D.Column("backpack", "BackPACK 1.7.1", peer=True, show_mem=True),
    D.Column("opacus", "Opacus", peer=True, show_mem=False),
]


def default_rows(model: str) -> list:
    return list(ROWS)


def skip(impl: str, model: str, row: str, args) -> str | None:
    """Cells not run: a note string, D.SILENT (cell shows "—"), or None (run it)."""
    if impl == "opacus" and row != "BatchGrad":
        return D.SILENT
    if impl == "torchfunc" and ROWS[row] == I.HOOKS:
        return D.SILENT
    return None


SPEC = D.Spec(
    title="curvopt benchmark: first-order quantities "
    "(cost as a multiple of a plain forward+backward)",
    script=os.path.abspath(__file__),
    rows=ROWS,
    columns=COLUMNS,
    default_models="mlp,cnn",
    default_rows=default_rows,
    skip=skip,
)

if __name__ == "__main__":
    sys.exit(D.main(SPEC))

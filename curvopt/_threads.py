"""Small CPU work on one thread when the thread pool sleeps between operations.

torch runs every CPU operation on its intra-op (OpenMP) thread pool.  With
``OMP_WAIT_POLICY=PASSIVE`` (what one sets on shared machines, where spin-waiting
threads make 2-thread torch 50-100x slower under load) idle threads sleep, and waking
them for each of curvopt's many small operations (per-layer factor products,
factorizations, updates of small parameters) costs more than the arithmetic.
Measured on 2 cores (torch 2.13), a ``[d, 128] @ [128, d]`` product with PASSIVE: 27 µs
on one thread, 105 µs on two at d = 128; 408 against 292 µs at d = 512; ``eigh`` of a
128 x 128 float64 matrix 0.8 ms against 9.4 ms.  With the default (spinning) policy the
two threads cost nothing to wake (24 against 17 µs at d = 128, ``eigh`` 0.8 against
0.8 ms), and one thread left a K-FAC step on the digits MLP as fast relative to Adam's
(1.31x either way), so nothing is switched then.  Under PASSIVE, work whose largest
operand has at most :data:`SMALL_NUMEL` entries (factorizations: side
:data:`SMALL_SIDE`) runs on one thread; larger work keeps the pool.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterable, Iterator

import torch

#: whether idle OpenMP threads sleep (read once: OpenMP reads it at start-up too)
SLEEPING_POOL = os.environ.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"

#: Largest tensor (entries) of work that runs on one CPU thread: 128 x 128.
SMALL_NUMEL = 1 << 14
#: Largest side of a matrix whose factorization (Cholesky, eigendecomposition) runs on
#: one thread: measured (float64, MKL, PASSIVE), side 128: Cholesky + inverse 0.21 ms on
#: one thread, 0.6 ms on two; side 1024: ``eigh`` 150 ms on one, 213 ms on two (83 ms on
#: two with the default policy).
SMALL_SIDE = 256


def is_small(tensors: Iterable[torch.Tensor], limit: int = SMALL_NUMEL) -> bool:
    """Whether every tensor is on the CPU and has at most ``limit`` entries."""
    return all(t.device.type == "cpu" and t.numel() <= limit for t in tensors)


@contextlib.contextmanager
def one_thread(enabled: bool = True) -> Iterator[None]:
    """Run the block on one intra-op thread (restored after), if ``enabled`` and the pool
    sleeps between operations (:data:`SLEEPING_POOL`)."""
    threads = torch.get_num_threads() if enabled and SLEEPING_POOL else 1
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)

"""curvopt._threads: small CPU work on one thread only where the pool sleeps."""

from __future__ import annotations

import pytest
import torch

from curvopt import _threads


@pytest.fixture
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_one_thread_inside_and_restored_after_also_on_error(two_threads, monkeypatch):
    monkeypatch.setattr(_threads, "SLEEPING_POOL", True)
    with _threads.one_thread():
        assert torch.get_num_threads() == 1
    assert torch.get_num_threads() == 2
    with pytest.raises(RuntimeError), _threads.one_thread():
        raise RuntimeError("boom")
    assert torch.get_num_threads() == 2
    with _threads.one_thread(enabled=False):
        assert torch.get_num_threads() == 2


def test_nothing_switched_with_a_spinning_pool(two_threads, monkeypatch):
    monkeypatch.setattr(_threads, "SLEEPING_POOL", False)
    with _threads.one_thread():
        assert torch.get_num_threads() == 2


def test_is_small():
    assert _threads.is_small([torch.zeros(128, 128), torch.zeros(3)])
    assert not _threads.is_small([torch.zeros(129, 128)])
    assert _threads.is_small([])

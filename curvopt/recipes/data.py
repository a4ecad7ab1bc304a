"""The recipes' data: scikit-learn's bundled digits and a synthetic regression problem.

Nothing is downloaded: ``load_digits`` reads a file that ships inside scikit-learn.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from curvopt.recipes._extras import need
from curvopt.recipes.schema import DataConfig

__all__ = ["Data", "make_data", "data_shapes", "check_data"]

_DIGITS = ("sklearn.datasets", "the digits data (data.name = 'digits')")


@dataclass(frozen=True)
class Data:
    """A train/test split held in memory.

    Attributes:
        x_train: inputs ``[N_train, *in_shape]`` (``[N, 64]``, ``[N, 1, 8, 8]`` or ``[N, D]``).
        y_train: class indices ``[N_train]`` (int64) or targets ``[N_train, D_out]``.
        x_test: inputs of the test set.
        y_test: targets of the test set.
        task: ``"classification"`` or ``"regression"``.
        out_features: number of classes, or the target dimension.
    """

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    task: str
    out_features: int

    @property
    def in_shape(self) -> tuple[int, ...]:
        """Shape of one input."""
        return tuple(self.x_train.shape[1:])

    def batches(self, batch_size: int,
                generator: torch.Generator) -> Iterator[tuple[float, torch.Tensor, torch.Tensor]]:
        """Endless ``(epoch, x, y)`` minibatches, reshuffled every epoch with ``generator``.

        ``epoch`` counts the epochs done once this batch is used (``1.0`` after the last
        batch of the first epoch).  The last, short batch of an epoch is dropped (unless the
        set is smaller than a batch), so every step sees ``batch_size`` samples.
        """
        n = self.x_train.shape[0]
        size = min(batch_size, n)
        per_epoch = n // size
        epoch = 0
        while True:
            order = torch.randperm(n, generator=generator)
            for i in range(per_epoch):
                idx = order[i * size : (i + 1) * size]
                yield epoch + (i + 1) / per_epoch, self.x_train[idx], self.y_train[idx]
            epoch += 1


def _split(n: int, test_fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    n_test = max(1, round(n * test_fraction))
    return order[n_test:], order[:n_test]


def _digits(config: DataConfig, images: bool) -> Data:
    bunch = need(*_DIGITS).load_digits()
    x = torch.as_tensor(bunch.data, dtype=torch.float32) / 16.0
    y = torch.as_tensor(bunch.target, dtype=torch.int64)
    if images:
        x = x.reshape(-1, 1, 8, 8)
    train, test = _split(x.shape[0], config.test_fraction, config.split_seed)
    return Data(x[train], y[train], x[test], y[test], "classification", 10)


def _regression(config: DataConfig) -> Data:
    """A random two-layer tanh teacher plus Gaussian noise; targets standardised."""
    g = torch.Generator().manual_seed(config.split_seed)
    d, k, hidden = config.n_features, config.n_outputs, 32
    x = torch.randn(config.n_samples, d, generator=g)
    w1 = torch.randn(d, hidden, generator=g) / d**0.5
    w2 = torch.randn(hidden, k, generator=g) / hidden**0.5
    y = torch.tanh(x @ w1) @ w2 + 0.1 * (x @ torch.randn(d, k, generator=g)) / d**0.5
    y = (y - y.mean(0)) / y.std(0).clamp_min(1e-8)
    y = y + config.noise * torch.randn(y.shape, generator=g)
    train, test = _split(x.shape[0], config.test_fraction, config.split_seed)
    return Data(x[train], y[train], x[test], y[test], "regression", k)


def check_data(config: DataConfig) -> None:
    """Raise :class:`~curvopt.recipes._extras.MissingExtraError` now if loading the data
    would need a package that is missing."""
    if config.name == "digits":
        need(*_DIGITS)


def data_shapes(config: DataConfig, images: bool = False) -> tuple[tuple[int, ...], int]:
    """``(shape of one input, out_features)`` of the data, without loading it."""
    if config.name == "digits":
        return ((1, 8, 8) if images else (64,)), 10
    return (config.n_features,), config.n_outputs


def make_data(config: DataConfig, images: bool = False) -> Data:
    """Load or generate the data of ``config``; ``images``: digits as ``[N, 1, 8, 8]``."""
    if config.name == "digits":
        return _digits(config, images)
    return _regression(config)

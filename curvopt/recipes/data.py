"""The recipes' data: scikit-learn's bundled digits, a synthetic regression problem, and
character-level text from the installed ``torch`` package's own Python sources.

Nothing is downloaded: ``load_digits`` reads a file that ships inside scikit-learn, and the
text is read from ``torch``'s installation folder.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from curvopt.recipes._extras import need
from curvopt.recipes.schema import DataConfig, RecipeError

__all__ = ["Data", "TextData", "TextFiles", "VOCAB_SIZE", "make_data", "data_shapes",
           "check_data", "text_files", "encode"]

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

    @property
    def n_train(self) -> int:
        """Training samples (one epoch)."""
        return self.x_train.shape[0]

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


# ------------------------------------------------------------------------------------ text
#: Byte ids 0-127 (ASCII) and ``UNKNOWN`` for every other byte (UTF-8 continuation bytes).
VOCAB_SIZE = 129
UNKNOWN = 128


@dataclass(frozen=True)
class TextFiles:
    """The files of ``torch_source`` data, relative to ``root`` (the ``torch`` package).

    Attributes:
        root: the installed package's folder.
        train: files of the training text, sorted.
        test: files of the validation text, sorted.
        sizes: bytes of every file.
    """

    root: Path
    train: tuple[str, ...]
    test: tuple[str, ...]
    sizes: dict[str, int]

    def n_bytes(self, files: tuple[str, ...]) -> int:
        return sum(self.sizes[f] for f in files)


def text_files(config: DataConfig) -> TextFiles:
    """Select and split the files of ``torch_source`` data from their names and sizes only
    (cheap: the loader checks a recipe with it, before any training).

    The ``.py`` files under ``source_dirs`` are taken in sorted order while their total stays
    within ``max_bytes``; then, in an order drawn from ``split_seed``, whole files go to
    validation until they hold ``test_fraction`` of the bytes (at least one file each side).

    Raises:
        RecipeError: a folder that is not in the package, or too little text for a window of
            ``block_size + 1`` characters on either side.
    """
    root = Path(torch.__file__).resolve().parent
    found: set[Path] = set()
    for name in config.source_dirs:
        folder = (root / name).resolve()
        if not folder.is_relative_to(root) or not folder.is_dir():
            raise RecipeError(f"data.source_dirs: {name!r} is not a folder of the installed "
                              f"torch package ({root}); e.g. 'optim' or 'nn/modules'")
        found.update(folder.rglob("*.py"))
    sizes: dict[str, int] = {}
    for rel in sorted(p.relative_to(root).as_posix() for p in found):
        size = (root / rel).stat().st_size
        if sum(sizes.values()) + size > config.max_bytes:
            break
        sizes[rel] = size
    if len(sizes) < 2:
        raise RecipeError(
            f"data: {len(sizes)} file(s) of data.source_dirs {list(config.source_dirs)} fit in "
            f"data.max_bytes = {config.max_bytes}; at least 2 are needed (train and "
            "validation): raise max_bytes or add folders")
    names = list(sizes)
    order = torch.randperm(len(names), generator=torch.Generator().manual_seed(config.split_seed))
    want, test = config.test_fraction * sum(sizes.values()), []
    for i in order.tolist()[:-1]:
        if sum(sizes[f] for f in test) >= want:
            break
        test.append(names[i])
    files = TextFiles(root, tuple(f for f in names if f not in test), tuple(sorted(test)), sizes)
    for side, part in (("training", files.train), ("validation", files.test)):
        if files.n_bytes(part) <= config.block_size:
            raise RecipeError(
                f"data.block_size: the {side} text has {files.n_bytes(part)} characters, "
                f"fewer than a window of {config.block_size} + 1; lower block_size or raise "
                "max_bytes")
    return files


def encode(raw: bytes) -> torch.Tensor:
    """Byte ids of ``raw``: ``[len(raw)]`` uint8, ASCII as is, any other byte ``UNKNOWN``."""
    ids = torch.frombuffer(bytearray(raw), dtype=torch.uint8)
    return torch.where(ids < UNKNOWN, ids, torch.full_like(ids, UNKNOWN))


@dataclass(frozen=True)
class TextData:
    """Character-level text: a training stream sampled in random windows, and fixed
    validation windows.  Same interface as :class:`Data` (``x_test``, ``batches``, ...).

    Attributes:
        train_ids: the training files' byte ids, concatenated: ``[L]`` uint8.
        x_test: validation windows ``[eval_windows, T]`` (int64 ids).
        y_test: the same windows shifted by one character ``[eval_windows, T]``.
        files: which files are training and which validation text.
        task: ``"language_model"``.
        out_features: the vocabulary size, :data:`VOCAB_SIZE`.
    """

    train_ids: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    files: TextFiles
    task: str = "language_model"
    out_features: int = VOCAB_SIZE

    @property
    def in_shape(self) -> tuple[int, ...]:
        """``(T,)``: one window of ids."""
        return (self.x_test.shape[1],)

    @property
    def n_train(self) -> int:
        """Windows in one epoch: the training characters over ``T``."""
        return self.train_ids.shape[0] // self.in_shape[0]

    def batches(self, batch_size: int,
                generator: torch.Generator) -> Iterator[tuple[float, torch.Tensor, torch.Tensor]]:
        """Endless ``(epoch, x, y)``: ``batch_size`` windows ``[B, T]`` at start positions
        drawn uniformly with ``generator``, targets ``y`` the next characters; ``epoch``
        counts the windows drawn over :attr:`n_train`."""
        t = self.in_shape[0]
        offsets = torch.arange(t + 1)
        drawn = 0
        while True:
            start = torch.randint(0, self.train_ids.shape[0] - t, (batch_size,),
                                  generator=generator)
            window = self.train_ids[start[:, None] + offsets].long()
            drawn += batch_size
            yield drawn / self.n_train, window[:, :-1], window[:, 1:]


def _torch_source(config: DataConfig) -> TextData:
    files = text_files(config)

    def read(part: tuple[str, ...]) -> torch.Tensor:
        return encode(b"".join((files.root / f).read_bytes() for f in part))

    train, test, t = read(files.train), read(files.test), config.block_size
    # evenly spaced over all validation files, so every one counts, and the same every run
    start = torch.linspace(0, test.shape[0] - t - 1, config.eval_windows).round().long()
    window = test[start[:, None] + torch.arange(t + 1)].long()
    return TextData(train, window[:, :-1], window[:, 1:], files)


def check_data(config: DataConfig) -> None:
    """Raise :class:`~curvopt.recipes._extras.MissingExtraError` now if loading the data
    would need a package that is missing."""
    if config.name == "digits":
        need(*_DIGITS)


def data_shapes(config: DataConfig, images: bool = False) -> tuple[tuple[int, ...], int]:
    """``(shape of one input, out_features)`` of the data, without loading it."""
    if config.name == "digits":
        return ((1, 8, 8) if images else (64,)), 10
    if config.name == "torch_source":
        return (config.block_size,), VOCAB_SIZE
    return (config.n_features,), config.n_outputs


def make_data(config: DataConfig, images: bool = False) -> Data | TextData:
    """Load or generate the data of ``config``; ``images``: digits as ``[N, 1, 8, 8]``."""
    if config.name == "digits":
        return _digits(config, images)
    if config.name == "torch_source":
        return _torch_source(config)
    return _regression(config)

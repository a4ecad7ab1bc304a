"""The language-model recipes: torch's own sources as text (deterministic, split by file), the
GPT-style model, the recipes' validation, and a few training steps of each optimizer."""

from __future__ import annotations

import importlib.util
import itertools
import math
from pathlib import Path

import pytest
import torch

from curvopt import recipes
from curvopt.recipes import RecipeError
from curvopt.recipes.builder import build_model
from curvopt.recipes.data import UNKNOWN, VOCAB_SIZE, encode, make_data, text_files
from curvopt.recipes.schema import DataConfig, ModelConfig

ROOT = Path(__file__).resolve().parents[2]
LM_RECIPES = sorted((ROOT / "recipes").glob("charlm_*.toml"))
# a model and data small enough for a few steps in well under a second each
TINY = ["model.d_model=16", "model.n_layers=1", "model.n_heads=2", "model.mlp_ratio=2",
        "data.max_bytes=50000", "data.block_size=16", "data.eval_windows=4",
        "train.batch_size=4", "train.steps=3", "train.eval_every=3"]
SMALL_TEXT = DataConfig(name="torch_source", max_bytes=50_000, block_size=16, eval_windows=4)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "r.toml"
    path.write_text(text)
    return path


# ------------------------------------------------------------------------------------ data
def test_files_are_a_sorted_prefix_split_by_file():
    files = text_files(SMALL_TEXT)
    chosen = list(files.sizes)
    assert chosen == sorted(chosen) and all(f.startswith("optim/") for f in chosen)
    assert sum(files.sizes.values()) <= SMALL_TEXT.max_bytes
    assert set(files.train).isdisjoint(files.test)
    assert sorted(files.train + files.test) == chosen
    assert files.train and files.test
    # whole files go to validation until they hold test_fraction of the bytes
    held = files.n_bytes(files.test)
    assert held >= SMALL_TEXT.test_fraction * sum(files.sizes.values())
    assert held - max(files.sizes[f] for f in files.test) < (
        SMALL_TEXT.test_fraction * sum(files.sizes.values()))


def test_text_is_deterministic_and_read_from_the_split_files():
    a, b = make_data(SMALL_TEXT), make_data(SMALL_TEXT)
    assert a.files == b.files
    assert torch.equal(a.train_ids, b.train_ids) and torch.equal(a.x_test, b.x_test)
    root = a.files.root
    train_text = b"".join((root / f).read_bytes() for f in a.files.train)
    test_ids = encode(b"".join((root / f).read_bytes() for f in a.files.test))
    assert torch.equal(a.train_ids, encode(train_text))
    # every validation window is a piece of the validation files, targets shifted by one
    stream = "".join(map(chr, test_ids.tolist()))
    for x, y in zip(a.x_test, a.y_test, strict=True):
        assert "".join(map(chr, x.tolist())) in stream
        assert torch.equal(x[1:], y[:-1])
    assert a.x_test.shape == (4, 16) and a.x_test.dtype == torch.int64
    assert a.in_shape == (16,) and a.out_features == VOCAB_SIZE
    assert a.n_train == a.train_ids.shape[0] // 16


def test_another_split_seed_gives_another_split():
    other = text_files(DataConfig(**{**SMALL_TEXT.__dict__, "split_seed": 1}))
    assert other.test != text_files(SMALL_TEXT).test


def test_batches_are_seeded_windows_of_the_training_text():
    data = make_data(SMALL_TEXT)

    def first(seed):  # three (epoch, x, y) batches of 5 windows
        return list(itertools.islice(data.batches(5, torch.Generator().manual_seed(seed)), 3))

    a, b, c = first(0), first(0), first(1)
    for (_, xa, ya), (_, xb, yb) in zip(a, b, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
        assert xa.shape == ya.shape == (5, 16) and torch.equal(xa[:, 1:], ya[:, :-1])
    assert not torch.equal(a[0][1], c[0][1])
    assert a[2][0] == pytest.approx(15 / data.n_train)  # epochs: windows drawn / per epoch
    stream = "".join(map(chr, data.train_ids.tolist()))
    assert all("".join(map(chr, row.tolist())) in stream for row in a[0][1])


def test_vocabulary_is_ascii_plus_unknown():
    ids = encode("aZ\n\t é".encode())
    assert ids.tolist()[:5] == [97, 90, 10, 9, 32]
    assert ids.tolist()[5:] == [UNKNOWN, UNKNOWN]  # the two UTF-8 bytes of 'é'


# ----------------------------------------------------------------------------------- model
def test_gpt_is_causal_and_returns_class_dimension_second():
    torch.manual_seed(0)
    config = ModelConfig(kind="gpt", d_model=16, n_layers=2, n_heads=2, activation="gelu")
    model = build_model(config, (12,), VOCAB_SIZE)
    ids = torch.randint(0, 128, (3, 12))
    out = model(ids)
    assert out.shape == (3, VOCAB_SIZE, 12)
    later = ids.clone()
    later[:, 7:] = (later[:, 7:] + 1) % 128  # change the future: the past must not see it
    out2 = model(later)
    assert torch.allclose(out[..., :7], out2[..., :7], atol=1e-6)
    assert not torch.allclose(out[..., 7:], out2[..., 7:])
    # shorter inputs than the context work (positions 0..T-1)
    assert model(ids[:, :5]).shape == (3, VOCAB_SIZE, 5)


# --------------------------------------------------------------------------------- recipes
def test_the_lm_recipes_are_there_and_load():
    assert {p.stem for p in LM_RECIPES} >= {"charlm_kfac", "charlm_adamw", "charlm_adahessian"}
    for path in LM_RECIPES:
        config = recipes.load(path)
        assert config.model.kind == "gpt" and config.data.name == "torch_source"
        assert config.train.target_test_loss is not None


BAD = [  # (recipe text, words the one error message must contain)
    ('[data]\nname = "torch_source"\nblock_sise = 8\n',
     ["unknown key 'data.block_sise' in [data]", "did you mean 'block_size'",
      "source_dirs, max_bytes, block_size, eval_windows"]),
    ('[model]\nkind = "gpt"\nd_modle = 8\n',
     ["unknown key 'model.d_modle'", "did you mean 'd_model'", "n_layers, n_heads, mlp_ratio"]),
    ('[data]\nname = "torch_text"\n',
     ["data.name", "did you mean 'torch_source'", "valid choices: digits, regression, "
      "torch_source"]),
    ('[model]\nkind = "gtp"\n', ["model.kind", "did you mean 'gpt'", "mlp, cnn, gpt, hf_gpt2"]),
    ('[model]\nkind = "gpt"\n', ["model.kind 'gpt' does not fit data.name 'digits'",
                                 "torch_source"]),
    ('[model]\nkind = "mlp"\n[data]\nname = "torch_source"\n',
     ["model.kind 'mlp' does not fit data.name 'torch_source'"]),
    ('[model]\nkind = "gpt"\nd_model = 10\nn_heads = 4\n[data]\nname = "torch_source"\n',
     ["model.n_heads", "must divide model.d_model = 10"]),
    ('[model]\nkind = "gpt"\nactivation = ["gelu"]\n[data]\nname = "torch_source"\n',
     ["model.activation", "one name"]),
    ('[model]\nkind = "gpt"\nn_layers = 0\n[data]\nname = "torch_source"\n',
     ["model.n_layers", "positive"]),
    ('[model]\nkind = "gpt"\n[data]\nname = "torch_source"\nsource_dirs = ["../.."]\n',
     ["data.source_dirs", "'../..'", "not a folder of the installed torch package"]),
    ('[model]\nkind = "gpt"\n[data]\nname = "torch_source"\nmax_bytes = 100\n',
     ["data.max_bytes = 100", "at least 2"]),
    ('[model]\nkind = "gpt"\n[data]\nname = "torch_source"\nblock_size = 10000000\n',
     ["data.block_size", "fewer than a window"]),
    ('[model]\nkind = "gpt"\n[data]\nname = "torch_source"\n[loss]\nname = "mse"\n',
     ["loss.name", "'mse' does not fit data.name 'torch_source'", "'cross_entropy'"]),
]


@pytest.mark.parametrize("text, words", BAD, ids=[t.split("\n")[-2] for t, _ in BAD])
def test_bad_lm_recipes_give_one_clear_error(tmp_path, text, words):
    with pytest.raises(RecipeError) as info:
        recipes.load(write(tmp_path, text))
    for word in words:
        assert word in str(info.value)


# -------------------------------------------------------------------------------- training
@pytest.mark.parametrize("path", LM_RECIPES, ids=lambda p: p.stem)
def test_three_steps_of_each_optimizer_on_a_tiny_model(path):
    config = recipes.load(path, TINY)
    result = recipes.train(config, progress=False, echo=None)
    losses = [r["train_loss"] for r in result.records[1:]]
    assert len(losses) == 3 and all(math.isfinite(v) for v in losses)
    final = result.records[-1]
    assert final["test_acc"] is None and math.isfinite(final["test_loss"])
    assert final["test_loss"] < math.log(VOCAB_SIZE) + 1.0  # nothing blew up
    assert not result.summary["diverged"]


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None,
                    reason="transformers is not installed")
@pytest.mark.parametrize("name", ["charlm_kfac", "charlm_adamw"])
def test_hf_gpt2_variant_trains(name):
    config = recipes.load(ROOT / "recipes" / f"{name}.toml", [*TINY, "model.kind=hf_gpt2"])
    result = recipes.train(config, progress=False, echo=None)
    assert result.records[-1]["test_loss"] < math.log(VOCAB_SIZE) + 1.0
    assert all(math.isfinite(r["train_loss"]) for r in result.records[1:])

"""Recipe files: every one loads; bad ones give one clear error naming the key and the choices."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from curvopt import recipes
from curvopt.recipes import RecipeError
from curvopt.recipes.builder import OPTIMIZERS
from curvopt.recipes.loader import parse_override
from curvopt.recipes.output import to_toml
from curvopt.recipes.schema import to_dict

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


def _has(cls_name: str) -> bool:
    try:
        import curvopt.optim

        return hasattr(curvopt.optim, cls_name)
    except ImportError:
        return False


HAS_KFAC = _has("KFACOptimizer")


def write(tmp_path: Path, text: str, name: str = "r.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def error_of(tmp_path: Path, text: str, overrides=()) -> str:
    with pytest.raises(RecipeError) as info:
        recipes.load(write(tmp_path, text), overrides)
    return str(info.value)


def test_the_recipes_are_there():
    names = {p.stem for p in RECIPES}
    for problem in ("digits_mlp", "digits_cnn", "regression_mlp"):
        for opt in ("sgd", "adam", "adahessian", "kfac", "kflr", "diag_ggn_adam",
                    "variance_adaptive_sgd"):
            assert f"{problem}_{opt}" in names


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_loads(path, tmp_path):
    config = recipes.load(path)
    assert config.name == path.stem
    assert config.optimizer.name in OPTIMIZERS
    assert config.description
    # the resolved form written into an output folder loads back to the same config
    assert recipes.load(write(tmp_path, to_toml(to_dict(config)), f"{path.stem}.toml")) == config


def test_kflr_recipe_selects_kflr_curvature():
    config = recipes.load(ROOT / "recipes" / "digits_mlp_kflr.toml")
    assert config.optimizer.name == "kfac"
    assert config.optimizer.params["curvature"] == "kflr"


# ------------------------------------------------------------------------------ bad keys
def test_unknown_top_level_key(tmp_path):
    msg = error_of(tmp_path, 'nmae = "x"\n')
    assert "'nmae'" in msg and "did you mean 'name'" in msg
    assert "valid keys: name, description, model, data" in msg


BAD = [  # (recipe text, words the one error message must contain)
    # unknown keys and tables, with the valid keys and the closest one
    ("[model]\nhiden = [4]\n",
     ["unknown key 'model.hiden' in [model]", "did you mean 'hidden'",
      "valid keys: kind, hidden, channels"]),
    ("[trian]\nsteps = 3\n", ["'trian'", "did you mean 'train'"]),
    # wrong types
    ('[train]\nsteps = "10"\n', ["train.steps", "expected int", "string '10'"]),
    ("[model]\nhidden = 32\n", ["model.hidden", "list of int"]),
    ("[model]\nhidden = [32, 1.5]\n", ["model.hidden[1]"]),
    ("[model]\nbias = 1\n", ["model.bias", "bool"]),
    # unknown optimizer, layer and quantity names, with the valid choices
    ('[optimizer]\nname = "adamm"\n',
     ["optimizer.name", "'adamm'", "did you mean 'adam'", *OPTIMIZERS]),
    ('[model]\nactivation = "relu6"\n',
     ["model.activation", "valid choices: relu, tanh, sigmoid"]),
    ('[model]\nkind = "transformer"\n', ["model.kind", "valid choices: mlp, cnn"]),
    ('[model]\nhidden = [4, 4]\nactivation = ["relu", "sine"]\n',
     ["model.activation[1]", "'sine'"]),
    ('[track]\nquantities = ["kfac", "hessian"]\n', ["track.quantities[1]", "diag_ggn_exact"]),
    # optimizer hyperparameters, checked against the constructor's signature
    ('[optimizer]\nname = "sgd"\nmomentun = 0.9\n',
     ["unknown key 'optimizer.momentun'", "did you mean 'momentum'", "nesterov",
      "weight_decay"]),
    ('[optimizer]\nname = "sgd"\nmomentum = "high"\n', ["optimizer.momentum", "'high'"]),
    ('[optimizer]\nname = "adam"\namsgrad = 1\n', ["optimizer.amsgrad", "bool"]),
    ('[optimizer]\nname = "adahessian"\nhessian_pow = 1\n', ["hessian_power"]),
    # the registry's own arguments are not recipe keys
    ('[optimizer]\nname = "sgd"\nparams = 1\n', ["unknown key 'optimizer.params'"]),
]


@pytest.mark.parametrize("text, words", BAD, ids=[t.split("\n")[-2] for t, _ in BAD])
def test_bad_recipes_give_one_clear_error(tmp_path, text, words):
    msg = error_of(tmp_path, text)
    for word in words:
        assert word in msg


def test_float_fields_take_integers(tmp_path):
    config = recipes.load(write(tmp_path, "[optimizer]\nlr = 1\n"))
    assert config.optimizer.lr == 1.0 and isinstance(config.optimizer.lr, float)


def test_optimizer_hyperparameters_are_converted(tmp_path):
    config = recipes.load(write(tmp_path, '[optimizer]\nname = "adam"\nbetas = [0.8, 0.9]\n'
                                          "weight_decay = 0\n"))
    assert config.optimizer.params == {"betas": (0.8, 0.9), "weight_decay": 0.0}


@pytest.mark.skipif(not HAS_KFAC, reason="curvopt.optim.KFACOptimizer not available yet")
def test_kfac_hyperparameters_are_checked(tmp_path):
    msg = error_of(tmp_path, '[optimizer]\nname = "kfac"\ndampnig = 0.1\n')
    assert "did you mean 'damping'" in msg and "inverse_update_freq" in msg
    assert "curvopt.optim" in msg
    msg = error_of(tmp_path, '[optimizer]\nname = "kfac"\ninverse_update_freq = 2.5\n')
    assert "optimizer.inverse_update_freq" in msg


def test_combinations_that_cannot_work(tmp_path):
    msg = error_of(tmp_path, '[model]\nkind = "cnn"\n[data]\nname = "regression"\n'
                             '[loss]\nname = "mse"\n')
    assert "model.kind" in msg and "image" in msg
    assert "loss.name" in error_of(tmp_path, '[loss]\nname = "mse"\n')
    assert "not both" in error_of(tmp_path, "[train]\nsteps = 3\nepochs = 1\n")
    msg = error_of(tmp_path, '[model]\nhidden = [4, 4]\nactivation = ["relu"]\n')
    assert "one name per hidden layer (2)" in msg
    assert "train.batch_size" in error_of(tmp_path, "[train]\nbatch_size = 0\n")
    assert "data.test_fraction" in error_of(tmp_path, "[data]\ntest_fraction = 1.5\n")
    assert "model.kernel_size" in error_of(tmp_path, '[model]\nkind = "cnn"\nkernel_size = 2\n')


def test_bad_files(tmp_path):
    assert "not valid TOML" in error_of(tmp_path, "[model\n")
    with pytest.raises(RecipeError, match="not found"):
        recipes.load(tmp_path / "nope.toml")


# --------------------------------------------------------------------------- precedence
def test_precedence_cli_over_file_over_defaults(tmp_path):
    path = write(tmp_path, '[optimizer]\nname = "sgd"\nlr = 0.5\nmomentum = 0.9\n'
                           "[train]\nsteps = 7\n")
    config = recipes.load(path)
    assert config.optimizer.lr == 0.5 and config.train.steps == 7  # file
    assert config.train.batch_size == 64  # default
    config = recipes.load(path, ["optimizer.lr=0.05", "train.batch_size=8",
                                 "model.hidden=[3, 5]", "schedule.name=cosine", "name=x"])
    assert config.optimizer.lr == 0.05 and config.optimizer.params == {"momentum": 0.9}
    assert config.train.batch_size == 8 and config.train.steps == 7
    assert config.model.hidden == (3, 5) and config.schedule.name == "cosine"
    assert config.name == "x"
    config = recipes.load(path, {"optimizer.lr": 0.01})
    assert config.optimizer.lr == 0.01


def test_overrides_are_validated_too(tmp_path):
    path = write(tmp_path, "")
    with pytest.raises(RecipeError, match="unknown key 'optimizer.lrr'"):
        recipes.load(path, ["optimizer.lrr=0.1"])
    with pytest.raises(RecipeError, match="train.steps"):
        recipes.load(path, ["train.steps=many"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        recipes.load(path, ["optimizer.lr"])
    with pytest.raises(RecipeError, match="table.key"):
        recipes.load(path, ["a.b.c=1"])


def test_parse_override_values():
    assert parse_override("optimizer.lr=0.05") == (["optimizer", "lr"], 0.05)
    assert parse_override("model.hidden=[8,8]") == (["model", "hidden"], [8, 8])
    assert parse_override("model.bias=false") == (["model", "bias"], False)
    assert parse_override("optimizer.name=adam") == (["optimizer", "name"], "adam")
    assert parse_override('optimizer.name="adam"') == (["optimizer", "name"], "adam")


def test_extends_merges_and_a_new_variant_replaces_the_table(tmp_path):
    write(tmp_path, '[optimizer]\nname = "sgd"\nlr = 0.5\nmomentum = 0.9\n'
                    "[train]\nsteps = 7\nseed = 3\n", "base.toml")
    child = write(tmp_path, 'extends = "base.toml"\n[optimizer]\nname = "adam"\n'
                            "[train]\nsteps = 9\n", "child.toml")
    config = recipes.load(child)
    assert config.name == "child"
    assert config.optimizer.name == "adam" and config.optimizer.lr is None
    assert config.optimizer.params == {}  # sgd's momentum did not leak into adam
    assert config.train.steps == 9 and config.train.seed == 3
    same = write(tmp_path, 'extends = "base.toml"\n[optimizer]\nlr = 0.1\n', "same.toml")
    config = recipes.load(same)
    assert config.optimizer.lr == 0.1 and config.optimizer.params == {"momentum": 0.9}


def test_extends_cycle(tmp_path):
    write(tmp_path, 'extends = "b.toml"\n', "a.toml")
    write(tmp_path, 'extends = "a.toml"\n', "b.toml")
    with pytest.raises(RecipeError, match="cycle"):
        recipes.load(tmp_path / "a.toml")


def test_configs_are_frozen(tmp_path):
    config = recipes.load(write(tmp_path, ""))
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.train.steps = 3


def test_the_constructors_own_checks_fail_at_load(tmp_path):
    msg = error_of(tmp_path, '[optimizer]\nname = "adam"\nbetas = [0.9, 1.5]\n')
    assert "Adam rejects the recipe's [optimizer] table" in msg and "beta" in msg
    msg = error_of(tmp_path, '[optimizer]\nname = "adam"\nbetas = [0.9]\n')
    assert "optimizer.betas" in msg and "2 values" in msg


@pytest.mark.skipif(not HAS_KFAC, reason="curvopt.optim.KFACOptimizer not available yet")
def test_kfac_curvature_choice_fails_at_load(tmp_path):
    msg = error_of(tmp_path, '[optimizer]\nname = "kfac"\ncurvature = "kfca"\n')
    assert "KFACOptimizer" in msg and "kfca" in msg

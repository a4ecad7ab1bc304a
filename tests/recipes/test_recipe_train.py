"""Building and training recipes: every recipe runs; runs are reproducible; targets."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import pytest
import torch

from curvopt import recipes
from curvopt.recipes.builder import OPTIMIZERS, schedule_factor
from curvopt.recipes.runner import Target, reach, steps_to_target, summarize_run
from curvopt.recipes.schema import ScheduleConfig

ROOT = Path(__file__).resolve().parents[2]
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))
FEW_STEPS = ["train.steps=4", "train.eval_every=2", "track.every=2"]


def _available(name: str) -> bool:
    try:
        OPTIMIZERS[name].resolve()
        return True
    except recipes.RecipeError:
        return False


def _has_engine() -> bool:
    try:
        import curvopt

        return callable(curvopt.collect)
    except (ImportError, AttributeError):
        return False


def load_few_steps(path, *more):
    config = recipes.load(path, [*FEW_STEPS, *more])
    if not _available(config.optimizer.name):
        pytest.skip(f"optimizer {config.optimizer.name!r} (curvopt.optim) not available yet")
    if config.track.quantities and not _has_engine():
        config = dataclasses.replace(config, track=dataclasses.replace(config.track, quantities=()))
    return config


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: str(p.relative_to(ROOT / "recipes")))
def test_every_recipe_runs_a_few_steps(path):
    config = load_few_steps(path)
    result = recipes.train(config, progress=False, echo=None)
    records = result.records
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all(math.isfinite(r["train_loss"]) for r in records[1:])
    evals = [r for r in records if r["test_loss"] is not None]
    assert [r["step"] for r in evals] == [0, 2, 4]
    if config.data.name == "digits":
        assert all(0.0 <= r["test_acc"] <= 1.0 for r in evals)
    else:
        assert all(r["test_acc"] is None for r in evals)
    for rec in records[1:]:
        assert set(rec) >= {"step", "epoch", "train_loss", "test_loss", "test_acc", "lr",
                            "step_time", "train_time"}
    times = [r["train_time"] for r in records]  # cumulative step times, evaluations excluded
    assert times[0] == 0.0
    assert times[1:] == pytest.approx(
        [sum(r["step_time"] for r in records[1:i + 1]) for i in range(1, len(records))])
    assert result.summary["train_time_s"] == times[-1] < result.summary["wall_time_s"]
    for name in config.track.quantities:  # tracked every 2 steps, a finite summary each time
        values = [r["stats"][name] for r in records if "stats" in r]
        assert len(values) == 2 and all(v is not None and math.isfinite(v) for v in values)
    assert result.warnings == []
    assert result.summary["steps"] == 4 and not result.summary["diverged"]


def test_build_returns_model_loss_optimizer_data():
    config = recipes.load(ROOT / "recipes" / "digits_cnn_adam.toml")
    built = recipes.build(config)
    model, loss_fn, optimizer, data = built
    assert isinstance(loss_fn, torch.nn.CrossEntropyLoss)
    assert isinstance(optimizer, torch.optim.Adam)
    assert optimizer.param_groups[0]["lr"] == 0.003
    assert data.x_train.shape[1:] == (1, 8, 8)
    assert data.x_train.shape[0] + data.x_test.shape[0] == 1797
    assert 0.0 <= float(data.x_train.min()) and float(data.x_train.max()) <= 1.0
    assert model(data.x_test[:5]).shape == (5, 10)
    assert [type(m).__name__ for m in model] == [
        "Conv2d", "ReLU", "Conv2d", "ReLU", "MaxPool2d", "Flatten", "Linear", "ReLU", "Linear"]
    assert built.total_steps == 300 and not built.create_graph


def test_build_mlp_and_regression_data():
    config = recipes.load(ROOT / "recipes" / "regression_mlp_sgd.toml",
                          ["model.activation=['tanh', 'relu']", "data.n_outputs=2"])
    model, loss_fn, optimizer, data = recipes.build(config)
    assert isinstance(loss_fn, torch.nn.MSELoss)
    assert data.task == "regression" and data.y_train.shape[1] == 2
    assert data.x_train.shape == (768, 16) and data.x_test.shape == (256, 16)
    assert [type(m).__name__ for m in model] == ["Flatten", "Linear", "Tanh", "Linear", "ReLU",
                                                 "Linear"]
    assert optimizer.param_groups[0]["momentum"] == 0.9
    # the split and the synthetic data depend on data.split_seed only
    other = recipes.build(dataclasses.replace(
        config, train=dataclasses.replace(config.train, seed=5))).data
    assert torch.equal(other.x_test, data.x_test) and torch.equal(other.y_test, data.y_test)


def test_adahessian_gets_create_graph():
    built = recipes.build(recipes.load(ROOT / "recipes" / "digits_mlp_adahessian.toml"))
    assert built.create_graph


def test_epochs():
    config = recipes.load(ROOT / "recipes" / "digits_mlp_sgd.toml",
                          ["train.steps=1", "train.batch_size=512"])
    config = dataclasses.replace(config, train=dataclasses.replace(config.train, steps=None,
                                                                   epochs=2))
    result = recipes.train(config, progress=False, echo=None)
    assert result.summary["steps"] == 4  # 1348 training samples: 2 full batches per epoch
    assert [r["epoch"] for r in result.records] == [0.0, 0.5, 1.0, 1.5, 2.0]


def test_same_recipe_and_seed_give_the_same_metrics():
    def metrics(*overrides):
        config = recipes.load(ROOT / "recipes" / "digits_mlp_sgd.toml",
                              ["train.steps=6", "train.eval_every=3", *overrides])
        records = recipes.train(config, progress=False, echo=None).records
        return [{k: v for k, v in r.items() if k not in ("step_time", "train_time")} for r in records]

    first = metrics()
    assert metrics() == first
    assert metrics("train.seed=1") != first


@pytest.mark.skipif(not _available("kfac"), reason="curvopt.optim.KFACOptimizer not available yet")
def test_kfac_recipe_is_reproducible():
    def metrics():
        config = recipes.load(ROOT / "recipes" / "digits_mlp_kfac.toml",
                              ["train.steps=4", "train.eval_every=2", "track.every=2"])
        records = recipes.train(config, progress=False, echo=None).records
        return [{k: v for k, v in r.items() if k not in ("step_time", "train_time")} for r in records]

    assert metrics() == metrics()


def test_learning_rate_schedule_is_applied():
    config = recipes.load(ROOT / "recipes" / "digits_mlp_sgd.toml",
                          ["train.steps=5", "schedule.name=step", "schedule.step_size=2",
                           "schedule.gamma=0.5", "optimizer.lr=0.4"])
    lrs = [r["lr"] for r in recipes.train(config, progress=False, echo=None).records[1:]]
    assert lrs == pytest.approx([0.4, 0.4, 0.2, 0.2, 0.1])


def test_schedule_factors():
    cos = schedule_factor(ScheduleConfig(name="cosine", min_factor=0.1), 11)
    assert cos(0) == pytest.approx(1.0) and cos(10) == pytest.approx(0.1)
    assert cos(5) == pytest.approx(0.55)
    warm = schedule_factor(ScheduleConfig(name="linear", warmup_steps=4), 14)
    assert [warm(t) for t in range(4)] == pytest.approx([0.25, 0.5, 0.75, 1.0])
    assert warm(4) == pytest.approx(1.0) and warm(13) == pytest.approx(0.0)
    exp = schedule_factor(ScheduleConfig(name="exponential", gamma=0.5), 10)
    assert exp(3) == pytest.approx(0.125)
    assert schedule_factor(ScheduleConfig(), 10)(7) == 1.0


def test_divergence_stops_the_run():
    config = recipes.load(ROOT / "recipes" / "regression_mlp_sgd.toml",
                          ["optimizer.lr=1e4", "train.steps=50", "track.quantities=[]"])
    lines = []
    result = recipes.train(config, progress=False, echo=lines.append)
    assert result.summary["diverged"] and result.summary["steps"] < 50
    assert "stopped" in lines[-1]


def test_periodic_lines_without_a_progress_bar():
    config = recipes.load(ROOT / "recipes" / "digits_mlp_sgd.toml",
                          ["train.steps=20", "track.quantities=[]"])
    lines = []
    recipes.train(config, progress=False, echo=lines.append)
    assert len(lines) == 10 and lines[-1].startswith("[digits_mlp_sgd] step    20/20  loss")
    assert "test_acc" in lines[-1] and "ms/step" in lines[-1]


def test_steps_to_target():
    records = [{"step": 0, "test_acc": 0.1, "test_loss": 2.0},
               {"step": 5, "test_acc": None, "test_loss": None},
               {"step": 10, "test_acc": 0.96, "test_loss": 0.3}]
    assert steps_to_target(records, target_acc=0.95) == 10
    assert steps_to_target(records, target_acc=0.99) is None
    assert steps_to_target(records, target_loss=1.0) == 10
    assert steps_to_target(records) is None


def test_time_to_each_target():
    records = [{"step": 0, "train_loss": None, "test_acc": 0.1, "test_loss": 2.0,
                "train_time": 0.0}]
    losses = [0.9, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1, 0.1]
    for step, loss in enumerate(losses, 1):
        evaluated = step % 4 == 0
        records.append({"step": step, "train_loss": loss, "train_time": 0.5 * step,
                        "test_acc": 0.9 + 0.01 * step if evaluated else None,
                        "test_loss": 1.0 / step if evaluated else None})
    assert reach(records, Target("test_acc", 0.95)) == {"step": 8, "time_s": 4.0}
    assert reach(records, Target("test_loss", 0.2)) == {"step": 8, "time_s": 4.0}
    assert reach(records, Target("test_acc", 1.1)) is None
    # the training loss is averaged over the last ten minibatches: 0.9 leaves the window at 11
    assert reach(records, Target("train_loss", 0.15)) == {"step": 11, "time_s": 5.5}
    assert reach(records, Target("train_loss", 0.185)) == {"step": 10, "time_s": 5.0}
    config = recipes.load(ROOT / "recipes" / "digits_mlp_sgd.toml")
    records = [{**r, "lr": 0.1, "step_time": 0.5 if r["step"] else None} for r in records]
    summary = summarize_run(config, records, wall=9.0)  # the recipe's target: test_acc 0.95
    assert summary["target"] == {"test_acc": 0.95}
    assert (summary["steps_to_target"], summary["time_to_target_s"]) == (8, 4.0)
    assert summary["train_time_s"] == 6.0 and summary["wall_time_s"] == 9.0
    both = summarize_run(config, records, 9.0, targets=[Target("train_loss", 0.15),
                                                       Target("test_acc", 1.1)])
    assert both["target"] == {"train_loss": 0.15} and both["time_to_target_s"] == 5.5
    assert [(t["target"], t["step"], t["time_s"]) for t in both["targets"]] == [
        ("train_loss <= 0.15", 11, 5.5), ("test_acc >= 1.1", None, None)]


def test_curvopt_optimizer_computes_tracked_statistics_only_on_tracking_steps():
    """``track.every`` reaches the optimizer: statistics are not computed (inside the timed
    step) on the steps the runner does not record."""
    config = load_few_steps(ROOT / "recipes" / "digits_mlp_kfac.toml", "track.every=3",
                            "train.steps=6")
    if not config.track.quantities:
        pytest.skip("no engine")
    built = recipes.build(config)
    assert built.optimizer.track_every == 3
    result = recipes.train(config, progress=False, echo=None)
    assert [r["step"] for r in result.records if r.get("stats")] == [3, 6]

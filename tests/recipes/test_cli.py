"""The ``curvopt`` command end to end, in temporary folders, with plain argv lists."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from curvopt.cli import main
from curvopt.recipes.output import MARKER

ROOT = Path(__file__).resolve().parents[2]
R = ROOT / "recipes"
FAST = ["--set", "train.steps=6", "--set", "train.eval_every=3", "--set", "track.every=3"]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _has_engine() -> bool:
    try:
        import curvopt

        return callable(curvopt.collect)
    except (ImportError, AttributeError):
        return False


def _has_kfac() -> bool:
    try:
        import curvopt.optim

        return hasattr(curvopt.optim, "KFACOptimizer")
    except ImportError:
        return False


NO_TRACK = [] if _has_engine() else ["--set", "track.quantities=[]"]


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC
    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


def test_run_writes_metrics_plot_and_summary(tmp_path, capsys):
    out = tmp_path / "runs" / "adam"
    code = main(["run", str(R / "digits_mlp_adam.toml"), "--out", str(out), "--no-progress",
                 *FAST, *NO_TRACK, "--set", "optimizer.lr=0.02"])
    assert code == 0
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER, "curves.png", "metrics.jsonl", "recipe.toml", "summary.json"]
    assert sorted(p.name for p in out.parent.iterdir()) == ["adam"]  # no temp folder left
    marker = json.loads((out / MARKER).read_text())
    assert marker["complete"] and marker["files"] == [
        "curves.png", "metrics.jsonl", "recipe.toml", "summary.json"]
    assert_png(out / "curves.png")
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(7))
    assert {"step", "epoch", "train_loss", "test_loss", "test_acc", "lr", "step_time",
            "train_time"} <= set(records[-1])
    assert records[-1]["lr"] == 0.02 and records[-1]["test_acc"] is not None
    summary = json.loads((out / "summary.json").read_text())
    assert summary["name"] == "digits_mlp_adam" and summary["steps"] == 6
    assert summary["train_time_s"] == records[-1]["train_time"]
    assert "lr = 0.02" in (out / "recipe.toml").read_text()
    printed = capsys.readouterr().out
    assert "[digits_mlp_adam] step     6/6" in printed  # periodic lines without a bar
    assert "final_test_acc" in printed and "digits_mlp_adam  adam" in printed
    assert "time to test_acc >= 0.95: " in printed
    assert f"wrote {out}" in printed
    # the written recipe reproduces the run
    again = tmp_path / "again"
    assert main(["run", str(out / "recipe.toml"), "--out", str(again), "-q"]) == 0
    timing = {"step_time", "train_time"}
    first = [{k: v for k, v in r.items() if k not in timing} for r in records]
    second = [{k: v for k, v in json.loads(line).items() if k not in timing}
              for line in (again / "metrics.jsonl").read_text().splitlines()]
    assert second == first


def test_run_regression_plot_has_no_accuracy_panel(tmp_path):
    out = tmp_path / "reg"
    assert main(["run", str(R / "regression_mlp_sgd.toml"), "--out", str(out), "-q",
                 *FAST, *NO_TRACK]) == 0
    assert_png(out / "curves.png")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["final_test_acc"] is None and summary["target"] == {"test_loss": 0.06}


def test_compare_overlays_runs_in_one_plot_and_table(tmp_path, capsys):
    out = tmp_path / "cmp"
    recipes_ = [R / "digits_mlp_sgd.toml", R / "digits_mlp_adam.toml"]
    if _has_kfac():
        recipes_.append(R / "digits_mlp_kfac.toml")
    code = main(["compare", *map(str, recipes_), "--out", str(out), "-q", *FAST, *NO_TRACK,
                 "--target-acc", "0.5"])
    assert code == 0
    names = [p.stem for p in recipes_]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        [MARKER, "compare.png", "summary.csv", "summary.json", *names])
    assert_png(out / "compare.png")
    for name in names:
        assert (out / name / "metrics.jsonl").exists() and (out / name / "curves.png").exists()
    with open(out / "summary.csv") as fh:
        rows = list(csv.DictReader(fh))
    assert sorted(r["name"] for r in rows) == sorted(names)
    assert {"rank", "final_train_loss", "final_test_acc", "wall_time_s", "train_time_s",
            "steps_to_target", "time_to_target_s"} <= set(rows[0])
    # ranked by training time to the target; runs that never reach it come last, unranked
    reached = [r for r in rows if r["time_to_target_s"]]
    assert [r["rank"] for r in rows] == [str(i + 1) for i in range(len(reached))] + [""] * (
        len(rows) - len(reached))
    assert [float(r["time_to_target_s"]) for r in reached] == sorted(
        float(r["time_to_target_s"]) for r in reached)
    summaries = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in summaries] == [r["name"] for r in rows]
    for s in summaries:
        metrics = [json.loads(line) for line in (out / s["name"] / "metrics.jsonl").open()]
        hit = next((r for r in metrics if r["test_acc"] is not None and r["test_acc"] >= 0.5),
                   None)
        assert s["targets"] == [{"target": "test_acc >= 0.5", "metric": "test_acc", "value": 0.5,
                                 "step": hit and hit["step"], "time_s": hit and hit["train_time"]}]
    printed = capsys.readouterr().out
    assert all(name in printed for name in names)
    assert "time to test_acc >= 0.5: " in printed


def test_compare_the_same_recipe_twice_gets_distinct_folders(tmp_path):
    out = tmp_path / "twice"
    path = str(R / "digits_mlp_sgd.toml")
    assert main(["compare", path, path, "--out", str(out), "-q", "--set", "train.steps=2",
                 *NO_TRACK]) == 0
    assert (out / "digits_mlp_sgd").is_dir() and (out / "digits_mlp_sgd-2").is_dir()


@pytest.mark.skipif(not _has_engine(), reason="curvopt.collect not available yet")
def test_stats_prints_per_layer_statistics(capsys):
    code = main(["stats", str(R / "digits_mlp_kflr.toml" if _has_kfac() else
                              R / "digits_mlp_sgd.toml"), "--step", "2",
                 "--quantities", "batch_l2,diag_ggn_exact,kflr"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "per-layer statistics at step 2" in printed
    for word in ("param", "cond", "1.weight", "5.bias", "batch_l2", "diag_ggn_exact", "kflr"):
        assert word in printed
    lines = [line.split() for line in printed.splitlines()]
    kflr_rows = [line for line in lines if len(line) > 2 and line[1] == "kflr"]
    assert {row[2] for row in kflr_rows} == {"G", "A"}  # the two Kronecker factors


def test_stats_rejects_unknown_quantity(capsys):
    assert main(["stats", str(R / "digits_mlp_sgd.toml"), "--quantities", "kfac,hessian"]) == 2
    err = capsys.readouterr().err
    assert "'hessian'" in err and "diag_ggn_exact" in err


@pytest.mark.parametrize("bad, words", [
    ("[model]\nactivation = 'swish'\n", ["model.activation", "relu, tanh"]),
    ("[optimizer]\nname = 'lbfgs'\n", ["optimizer.name", "sgd, adam"]),
    ("[train]\nstpes = 3\n", ["train.stpes", "did you mean 'steps'"]),
    ("[train]\nsteps = 2.5\n", ["train.steps", "expected int"]),
])
def test_bad_recipes_exit_2_before_training(tmp_path, capsys, bad, words):
    recipe = tmp_path / "bad.toml"
    recipe.write_text(bad)
    out = tmp_path / "out"
    assert main(["run", str(recipe), "--out", str(out)]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # nothing trained, nothing printed
    assert captured.err.startswith("curvopt run: error: ")
    assert all(w in captured.err for w in words)
    assert "Traceback" not in captured.err
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["bad.toml"]


def test_compare_validates_every_recipe_first(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text("[optimizer]\nname = 'adamm'\n")
    code = main(["compare", str(R / "digits_mlp_sgd.toml"), str(bad), "--out",
                 str(tmp_path / "out")])
    assert code == 2
    captured = capsys.readouterr()
    assert "did you mean 'adam'" in captured.err and "step" not in captured.out


def test_bad_override_exits_2(tmp_path, capsys):
    assert main(["run", str(R / "digits_mlp_sgd.toml"), "--set", "optimizer.lrr=1",
                 "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "unknown key 'optimizer.lrr'" in err and "did you mean 'lr'" in err


def test_check_prints_resolved_recipes(capsys):
    assert main(["check", str(R / "digits_cnn_kfac.toml"), "--set", "optimizer.lr=0.2"]) == 0
    printed = capsys.readouterr().out
    assert "digits_cnn_kfac.toml: ok" in printed and "lr = 0.2" in printed
    assert 'kind = "cnn"' in printed


def test_usage_errors_return_2(capsys):
    assert main([]) == 2
    assert main(["run"]) == 2
    assert main(["--help"]) == 0
    assert "run" in capsys.readouterr().out


def test_python_dash_m_curvopt():
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "curvopt", "check", str(R / "digits_mlp_adam.toml")]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "digits_mlp_adam.toml: ok" in proc.stdout

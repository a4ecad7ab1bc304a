"""``--out`` never loses a user's files; a stopped run keeps its streamed metrics."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

import curvopt.recipes.runner as runner
from curvopt.cli import main
from curvopt.recipes.output import MARKER

ROOT = Path(__file__).resolve().parents[2]
SGD = str(ROOT / "recipes" / "digits_mlp_sgd.toml")
FAST = ["-q", "--set", "train.steps=6", "--set", "train.eval_every=3",
        "--set", "track.quantities=[]"]


def _listing(folder: Path) -> dict[str, str]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file()}


@pytest.fixture
def no_training(monkeypatch):
    """Fail the test if any training starts."""
    def refuse(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(runner, "train", refuse)


def _run(out: Path, *more: str) -> int:
    return main(["run", SGD, "--out", str(out), *FAST, *more])


def _steps(folder: Path) -> list[int]:
    return [json.loads(line)["step"] for line in (folder / "metrics.jsonl").open()]


def test_a_users_folder_is_refused_and_kept(tmp_path, capsys, no_training):
    notes = tmp_path / "notes"
    (notes / "sub").mkdir(parents=True)
    (notes / "ideas.txt").write_text("mine")
    (notes / "sub" / "data.csv").write_text("1,2")
    before = _listing(tmp_path)
    assert _run(notes) == 2
    err = capsys.readouterr().err
    assert f"--out {notes} holds files curvopt did not write (ideas.txt, sub/data.csv)" in err
    assert f"--out {notes / 'digits_mlp_sgd'}" in err  # the suggestion: a new folder inside
    assert _listing(tmp_path) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes"]  # no staging folder left
    for command in (["compare", SGD, SGD], ["run", "--nproc", "2", SGD]):
        assert main([*command, "--out", str(notes), *FAST]) == 2
        assert "curvopt did not write" in capsys.readouterr().err
    assert _listing(tmp_path) == before


def test_a_file_as_out_is_refused(tmp_path, capsys, no_training):
    target = tmp_path / "results.txt"
    target.write_text("precious")
    assert _run(target) == 2
    assert f"--out {target} is a file, not a folder" in capsys.readouterr().err
    assert target.read_text() == "precious"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.txt"]


def test_an_unwritable_out_fails_before_training(tmp_path, capsys, no_training):
    blocker = tmp_path / "afile"
    blocker.write_text("x")
    assert _run(blocker / "run") == 2  # under a regular file: even root cannot write there
    err = capsys.readouterr().err
    assert f"--out {blocker / 'run'}: cannot write there" in err
    assert blocker.read_text() == "x"


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() == 0,
                    reason="root writes into read-only folders")
def test_a_read_only_parent_fails_before_training(tmp_path, capsys, no_training):
    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        assert _run(locked / "run") == 2
    finally:
        locked.chmod(0o700)
    assert "cannot write there" in capsys.readouterr().err


def test_an_earlier_curvopt_run_is_replaced_but_not_a_file_added_to_it(tmp_path, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    assert _run(out, "--set", "train.steps=4") == 0  # curvopt's own folder: replaced whole
    assert _steps(out) == [0, 1, 2, 3, 4]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    (out / "my-notes.md").write_text("keep me")
    capsys.readouterr()
    assert _run(out) == 2
    assert "my-notes.md" in capsys.readouterr().err
    assert (out / "my-notes.md").read_text() == "keep me" and _steps(out) == [0, 1, 2, 3, 4]


def test_an_empty_folder_is_used(tmp_path):
    out = tmp_path / "empty"
    out.mkdir()
    assert _run(out) == 0
    assert _steps(out) == list(range(7))


def test_a_file_put_into_out_while_training_survives(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    step = runner._step

    def step_and_write_a_note(built, *args, **kwargs):
        (out / "note.txt").write_text("written during the run")
        return step(built, *args, **kwargs)

    monkeypatch.setattr(runner, "_step", step_and_write_a_note)
    capsys.readouterr()
    assert _run(out) == 0
    captured = capsys.readouterr()
    assert f"the run went to {out}-2/" in captured.err and f"wrote {out}-2/" in captured.out
    assert (out / "note.txt").read_text() == "written during the run"
    assert _steps(out) == _steps(tmp_path / "run-2") == list(range(7))


def _interrupt_after(monkeypatch, k: int, exc: BaseException) -> None:
    """``runner._step`` raises ``exc`` on its call ``k + 1``: ``k`` steps complete."""
    step, calls = runner._step, []

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) > k:
            raise exc
        return step(*args, **kwargs)

    monkeypatch.setattr(runner, "_step", interrupted)


def test_ctrl_c_keeps_the_metrics_of_the_steps_done(tmp_path, monkeypatch, capsys):
    out, k = tmp_path / "run", 4
    _interrupt_after(monkeypatch, k, KeyboardInterrupt())
    assert _run(out) == 130
    err = capsys.readouterr().err
    assert f"kept in {out}/" in err and "interrupted" in err
    assert _steps(out) == list(range(k + 1))  # step 0 (the evaluation before training), 1..k
    assert not json.loads((out / MARKER).read_text())["complete"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["stopped"] == "KeyboardInterrupt" and summary["steps"] == k
    assert (out / "curves.png").exists() and (out / "recipe.toml").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]
    monkeypatch.undo()
    assert _run(out) == 0  # an interrupted run's folder is curvopt's: the next run replaces it
    assert _steps(out) == list(range(7))


def test_ctrl_c_leaves_an_earlier_run_whole(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    before = _listing(out)
    _interrupt_after(monkeypatch, 2, KeyboardInterrupt())
    assert _run(out) == 130
    assert f"kept in {out}-partial/" in capsys.readouterr().err
    assert _listing(out) == before
    assert _steps(tmp_path / "run-partial") == [0, 1, 2]


def test_an_error_while_training_keeps_the_metrics_and_propagates(tmp_path, monkeypatch, capsys):
    out = tmp_path / "cmp"
    _interrupt_after(monkeypatch, 6 + 3, RuntimeError("boom"))  # the second run's step 4
    with pytest.raises(RuntimeError, match="boom"):
        main(["compare", SGD, SGD, "--out", str(out), *FAST])
    assert "stopped by an error" in capsys.readouterr().err
    assert _steps(out / "digits_mlp_sgd") == list(range(7))  # the first run, complete
    assert _steps(out / "digits_mlp_sgd-2") == [0, 1, 2, 3]
    assert not (out / "compare.png").exists()


def test_a_failure_while_writing_leaves_the_earlier_run_whole(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    assert _run(out) == 0
    before = _listing(out)

    def broken_plot(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(runner, "plot_runs", broken_plot)
    with pytest.raises(RuntimeError, match="disk full"):
        _run(out, "--set", "train.steps=2")
    assert _listing(out) == before
    assert _steps(tmp_path / "run-partial") == [0, 1, 2]  # the new run's metrics survive
    assert f"kept in {out}-partial/" in capsys.readouterr().err

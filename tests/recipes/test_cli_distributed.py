"""``curvopt run --nproc 2``: two gloo processes train the recipe of one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch.distributed as dist

from curvopt import recipes
from curvopt.cli import main
from curvopt.recipes.output import MARKER

ROOT = Path(__file__).resolve().parents[2]
R = ROOT / "recipes"
FAST = ["--set", "train.steps=4", "--set", "train.eval_every=2", "--set", "track.quantities=[]"]

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed missing")


def _cli(args, timeout=120):
    """Run ``python -m curvopt ARGS`` in its own session; kill the whole group on timeout."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    proc = subprocess.Popen([sys.executable, "-m", "curvopt", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"curvopt {' '.join(args)} hung for more than {timeout} s")
    return proc.returncode, out, err


@pytest.mark.parametrize(
    "recipe", ["digits_mlp_kflr", pytest.param("digits_mlp_sgd", marks=pytest.mark.slow)]
)
def test_run_nproc2_writes_outputs_and_matches_one_process(tmp_path, recipe):
    out = tmp_path / "run"
    code, stdout, stderr = _cli(["run", "--nproc", "2", str(R / f"{recipe}.toml"),
                                 "--out", str(out), "-q", *FAST])
    assert code == 0, stderr
    assert sorted(p.name for p in out.iterdir()) == [
        MARKER, "curves.png", "metrics.jsonl", "recipe.toml", "summary.json"]
    assert stdout.count("wrote ") == 1  # rank 0 only
    got = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    config = recipes.load(R / f"{recipe}.toml", [s for s in FAST if s != "--set"])
    ref = recipes.train(config, progress=False, echo=None).records
    assert [r["step"] for r in got] == [r["step"] for r in ref] == list(range(5))
    for a, b in zip(got, ref, strict=True):
        for key in ("train_loss", "test_loss", "train_acc"):
            if b[key] is None:
                assert a[key] is None
            else:  # float32 model: the global batch is summed in another order
                assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-6), (a["step"], key)


def test_run_nproc_refuses_create_graph_optimizers(tmp_path, capsys):
    code = main(["run", "--nproc", "2", str(R / "digits_mlp_adahessian.toml"),
                 "--out", str(tmp_path / "x"), "-q", *FAST])
    assert code == 2
    assert "create_graph" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

"""Packaging: a lean core, the recipes' dependencies in an extra, README and CI in step.

Each import check runs in a fresh interpreter (``sys.modules`` of this one has seen
everything).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - Python 3.10
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]
RECIPES_EXTRA = ("sklearn", "matplotlib", "tqdm", "torch_optimizer")
NEVER_IN_CORE = (*RECIPES_EXTRA, "transformers", "hypothesis", "pytest")

def _python(code: str, blocked: tuple[str, ...] = ()) -> subprocess.CompletedProcess:
    # A None entry in sys.modules makes a module look not installed: importing it raises
    # ModuleNotFoundError, importlib.util.find_spec returns None.
    prelude = f"import sys\nsys.modules.update(dict.fromkeys({list(blocked)!r}))\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-c", prelude + textwrap.dedent(code)], cwd=ROOT,
                          env=env, capture_output=True, text=True, timeout=300)


CORE_USE = """
    import sys
    import torch
    before = set(sys.modules)
    import curvopt
    from curvopt.extensions import BatchGrad, KFLR
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Tanh(), torch.nn.Linear(3, 2))
    loss_fn = torch.nn.CrossEntropyLoss()
    X, y = torch.randn(8, 4), torch.randint(0, 2, (8,))
    with curvopt.collect(model, loss_fn, BatchGrad(), KFLR()):
        loss_fn(model(X), y).backward()
    for name in ("KFACOptimizer", "DiagGGNAdam", "VarianceAdaptiveSGD"):
        opt = getattr(curvopt, name)(model, loss_fn)
        opt.zero_grad()
        loss_fn(model(X), y).backward()
        opt.step()
        opt.close()
    loaded = sorted({m.split(".")[0] for m in set(sys.modules) - before})
    print("LOADED", " ".join(loaded))
"""


def test_core_works_without_the_extras():
    """The engine and the three optimizers run with every optional package missing."""
    proc = _python(CORE_USE, blocked=NEVER_IN_CORE)
    assert proc.returncode == 0, proc.stderr
    assert "LOADED" in proc.stdout


def test_core_loads_none_of_the_extras():
    """With everything installed, curvopt itself imports none of them (torch may: torch.hub
    imports tqdm when it is there, so what ``import torch`` loads does not count)."""
    proc = _python(CORE_USE)
    assert proc.returncode == 0, proc.stderr
    loaded = proc.stdout.split("LOADED", 1)[1].split()
    assert not set(loaded) & set(NEVER_IN_CORE), loaded
    assert "curvopt" in loaded


def test_a_missing_extra_is_named_before_training(tmp_path):
    """The command says which package is missing and which extra brings it; nothing runs."""
    cases = [("matplotlib", "digits_mlp_sgd"), ("sklearn", "digits_mlp_sgd"),
             ("tqdm", "digits_mlp_sgd"), ("torch_optimizer", "digits_mlp_adahessian")]
    for module, recipe in cases:
        out = tmp_path / module
        code = f"""
            import sys
            from curvopt.cli import main
            sys.exit(main(["run", "recipes/{recipe}.toml", "--out", {str(out)!r}, "-q",
                           "--set", "train.steps=2"]))
        """
        proc = _python(code, blocked=(module,))
        assert proc.returncode == 1, (module, proc.stdout, proc.stderr)
        pip_name = {"sklearn": "scikit-learn", "torch_optimizer": "torch-optimizer"}.get(module,
                                                                                       module)
        assert f"needs {pip_name}, which is not installed" in proc.stderr, proc.stderr
        assert "pip install 'curvopt-torch[recipes]'" in proc.stderr
        assert "Traceback" not in proc.stderr and "step" not in proc.stdout
        assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def _pyproject() -> dict:
    with open(ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["project"]


def _requirement_names(reqs: list[str]) -> set[str]:
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in reqs}


def test_distribution_metadata():
    project = _pyproject()
    # `curvopt` on the package index is an unrelated project
    assert project["name"] == "curvopt-torch"
    assert _requirement_names(project["dependencies"]) == {"torch", "numpy"}
    extras = project["optional-dependencies"]
    assert _requirement_names(extras["recipes"]) == {
        "scikit-learn", "matplotlib", "tqdm", "torch-optimizer", "tomli"}
    assert "curvopt-torch[recipes]" in extras["test"]  # the suite tests the recipes
    assert {"pytest", "hypothesis", "transformers"} <= _requirement_names(extras["test"])
    assert "curvopt-torch[test]" in extras["dev"] and "ruff" in _requirement_names(extras["dev"])
    assert project["scripts"] == {"curvopt": "curvopt.cli:main"}


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    setup = readme.split("## Set-up", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)\n```", setup, flags=re.S)


def test_readme_commands_install_what_they_need_and_ci_runs_the_test_command():
    main_job, tests = _readme_commands()
    assert "pip install torch==2.13.0 && " in main_job and "pip install -e '.[recipes]'" in main_job
    assert "curvopt compare recipes/digits_mlp_kfac.toml recipes/digits_mlp_adam.toml" in main_job
    assert "pip install torch==2.13.0 && " in tests and "pip install -e '.[test]'" in tests
    assert tests.endswith("python -m pytest")
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert tests in ci  # CI installs exactly as README says

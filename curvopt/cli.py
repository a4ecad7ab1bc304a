"""The ``curvopt`` command: run, compare and inspect recipes.

::

    curvopt run recipes/digits_mlp_kfac.toml --out runs/kfac --set optimizer.lr=0.05
    curvopt compare recipes/digits_mlp_kfac.toml recipes/digits_mlp_adam.toml
    curvopt stats recipes/digits_mlp_kflr.toml --step 20
    curvopt check recipes/*.toml
    curvopt run --nproc 2 recipes/digits_mlp_kfac.toml     # 2 processes on this machine
    torchrun --nproc-per-node 2 -m curvopt run recipes/digits_mlp_kfac.toml

``run --nproc N`` starts N worker processes (``python -m curvopt`` with the
``torchrun`` environment: ``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT``);
a ``curvopt run`` that finds ``WORLD_SIZE > 1`` in its environment joins that
process group (gloo for CPU tensors, nccl for CUDA tensors when CUDA is
available), trains on its shard of every batch, and rank 0 writes the outputs.

Every recipe (and every ``--set``) is validated before any training starts; an
invalid one exits with status 2 and one message naming the key at fault.  So is
``--out``: curvopt writes only into a new folder, an empty one, or one it made
itself (marked by a ``.curvopt-run`` file) that holds nothing else, and checks
that it can write there before training.  ``metrics.jsonl`` is written while
training, so a run stopped with Ctrl-C keeps its steps (a line says where).

The command needs the ``[recipes]`` extra (scikit-learn, matplotlib, tqdm,
torch-optimizer); without it, it says which package is missing and how to
install it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

__all__ = ["main", "make_parser"]


def make_parser() -> argparse.ArgumentParser:
    """The argument parser of ``curvopt``."""
    parser = argparse.ArgumentParser(
        prog="curvopt",
        description="Train, compare and inspect curvopt's hyperparameter recipes (TOML).",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def common(p: argparse.ArgumentParser) -> None:
        p.add_argument("--set", dest="overrides", action="append", default=[],
                       metavar="KEY=VALUE",
                       help="override a recipe value, e.g. optimizer.lr=0.05 (repeatable; "
                            "wins over the file)")

    def training(p: argparse.ArgumentParser) -> None:
        common(p)
        p.add_argument("--out", metavar="DIR",
                       help="output folder (default: runs/<name>); must be new, empty or an "
                            "earlier curvopt output (then replaced once the run is done)")
        bar = p.add_mutually_exclusive_group()
        bar.add_argument("--progress", dest="progress", action="store_true", default=None,
                         help="always show the progress bar")
        bar.add_argument("--no-progress", dest="progress", action="store_false",
                         help="never show the progress bar (print periodic lines instead)")
        p.add_argument("-q", "--quiet", action="store_true",
                       help="no periodic lines; only the summary")

    p = sub.add_parser("run", help="train one recipe; write metrics, plot and summary")
    p.add_argument("recipe", help="a recipe file (TOML)")
    training(p)
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="train with N processes (torch.distributed, each on 1/N of every "
                        "batch; default 1)")

    p = sub.add_parser("compare", help="train several recipes; overlay them in one plot and table")
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe files (TOML)")
    training(p)
    p.add_argument("--target-acc", type=float, metavar="X",
                   help="report time and steps until test accuracy >= X (default: each "
                        "recipe's train.target_test_acc / target_test_loss); runs are ranked "
                        "by the time to the first target given")
    p.add_argument("--target-loss", type=float, metavar="X",
                   help="report time and steps until test loss <= X")
    p.add_argument("--target-train-loss", type=float, metavar="X",
                   help="report time and steps until the training loss (mean of the last 10 "
                        "minibatches) <= X")

    p = sub.add_parser("stats", help="per-layer statistics of the ten quantities at a step")
    p.add_argument("recipe", help="a recipe file (TOML)")
    p.add_argument("--step", type=int, default=0, metavar="K",
                   help="train K steps first (default 0: at initialisation)")
    p.add_argument("--quantities", metavar="A,B,...",
                   help="comma-separated savefields (default: all ten)")
    common(p)

    p = sub.add_parser("check", help="validate recipes and print them resolved")
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe files (TOML)")
    common(p)
    return parser


def _env_world() -> int:
    try:
        return int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:
        return 1


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(nproc: int, argv: list[str]) -> int:
    """Start ``nproc`` ranks of ``python -m curvopt ARGV``; the first failure stops the rest."""
    import subprocess
    import time

    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()),
                WORLD_SIZE=str(nproc), LOCAL_WORLD_SIZE=str(nproc))
    base.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    procs = []
    for rank in range(nproc):
        env = dict(base, RANK=str(rank), LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, "-m", "curvopt", *argv], env=env,
                                      stdout=None if rank == 0 else subprocess.DEVNULL))
    code = 0
    try:
        while procs:
            for p in list(procs):
                rc = p.poll()
                if rc is None:
                    continue
                procs.remove(p)
                if rc != 0 and code == 0:
                    code = rc
                    for q in procs:  # the others would wait for it in a collective
                        q.terminate()
            time.sleep(0.05)
    except KeyboardInterrupt:
        for p in procs:
            p.terminate()
        raise
    finally:
        for p in procs:
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
    return code


def _init_distributed() -> bool:
    """Join the process group the environment describes (``torchrun``); ``True`` if joined."""
    if _env_world() <= 1:
        return False
    import torch
    import torch.distributed as dist

    if dist.is_initialized():
        return False
    backend = "gloo"
    if torch.cuda.is_available() and dist.is_nccl_available():
        backend = "cpu:gloo,cuda:nccl"
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, init_method="env://")
    return True


def _run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from curvopt import recipes
    from curvopt.recipes.output import check_out
    from curvopt.recipes.runner import check_distributable, check_extras, default_out, summary_table

    config = recipes.load(args.recipe, args.overrides)
    if args.nproc < 1:
        raise recipes.RecipeError(f"--nproc must be at least 1, got {args.nproc}")
    if args.nproc > 1 and _env_world() <= 1:
        check_distributable(config)
        check_out(Path(args.out) if args.out else default_out([config.name]), config.name)
        check_extras(config)
        return _launch(args.nproc, args.argv)
    joined = _init_distributed()
    try:
        from curvopt.recipes.runner import dist_rank_world

        rank = dist_rank_world()[0]
        echo = None if args.quiet or rank != 0 else print
        result, out = recipes.run(config, out=args.out, progress=args.progress, echo=echo)
        if rank != 0:
            return 0
        print(summary_table([result]))
        for warning in result.warnings:
            print(f"warning: {warning}", file=sys.stderr)
        print(f"wrote {out}/ (metrics.jsonl, curves.png against steps and time, summary.json, "
              "recipe.toml)")
        return 0
    finally:
        if joined:
            import torch.distributed as dist

            if sys.exc_info()[0] is None:
                # Tear down together: a rank leaving while its peers' gloo threads still
                # talk to it aborts the process.
                dist.barrier()
            dist.destroy_process_group()


def _compare(args: argparse.Namespace) -> int:
    from curvopt import recipes
    from curvopt.recipes.runner import summary_table

    configs = [recipes.load(path, args.overrides) for path in args.recipes]
    echo = None if args.quiet else print
    results, out = recipes.compare(configs, out=args.out, progress=args.progress, echo=echo,
                                   target_acc=args.target_acc, target_loss=args.target_loss,
                                   target_train_loss=args.target_train_loss)
    print(summary_table(results))
    for result in results:
        for warning in result.warnings:
            print(f"warning: {result.summary['name']}: {warning}", file=sys.stderr)
    print(f"wrote {out}/ (compare.png against steps and time, summary.csv, summary.json, "
          "one folder per run)")
    return 0


def _stats(args: argparse.Namespace) -> int:
    from curvopt import recipes
    from curvopt.recipes.stats import format_stats, layer_stats

    config = recipes.load(args.recipe, args.overrides)
    quantities = ([q.strip() for q in args.quantities.split(",") if q.strip()]
                  if args.quantities else recipes.SAVEFIELDS)
    rows, info = layer_stats(config, args.step, quantities)
    print(format_stats(config, rows, info))
    return 0


def _check(args: argparse.Namespace) -> int:
    from curvopt import recipes
    from curvopt.recipes.output import to_toml
    from curvopt.recipes.schema import to_dict

    configs = [recipes.load(path, args.overrides) for path in args.recipes]
    for path, config in zip(args.recipes, configs, strict=True):
        print(f"# {path}: ok")
        print(to_toml(to_dict(config)))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``curvopt`` console script; returns the exit status.

    0: done; 1: a package of the ``[recipes]`` extra is missing (the message says what to
    install); 2: a bad command line, recipe or ``--out`` (one message on stderr, nothing
    trained); 130: interrupted (the steps done are kept; a line on stderr says where).
    """
    from curvopt.recipes._extras import MissingExtraError
    from curvopt.recipes.schema import RecipeError

    try:
        argv = sys.argv[1:] if argv is None else list(argv)
        args = make_parser().parse_args(argv)
        args.argv = argv
    except SystemExit as exit_:  # --help, or a bad command line (argparse printed why)
        return exit_.code if isinstance(exit_.code, int) else 2
    handler = {"run": _run, "compare": _compare, "stats": _stats, "check": _check}[args.command]
    try:
        return handler(args)
    except RecipeError as err:
        print(f"curvopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except MissingExtraError as err:
        print(f"curvopt {args.command}: error: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("curvopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `curvopt stats ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

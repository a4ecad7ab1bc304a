"""The ``curvopt`` command: run, compare and inspect recipes.

::

    curvopt run recipes/digits_mlp_kfac.toml --out runs/kfac --set optimizer.lr=0.05
    curvopt compare recipes/digits_mlp_kfac.toml recipes/digits_mlp_adam.toml
    curvopt stats recipes/digits_mlp_kflr.toml --step 20
    curvopt check recipes/*.toml

Every recipe (and every ``--set``) is validated before any training starts; an
invalid one exits with status 2 and one message naming the key at fault.
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
                       help="output folder (default: runs/<name>); replaced atomically")
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

    p = sub.add_parser("compare", help="train several recipes; overlay them in one plot and table")
    p.add_argument("recipes", nargs="+", metavar="RECIPE", help="recipe files (TOML)")
    training(p)
    target = p.add_mutually_exclusive_group()
    target.add_argument("--target-acc", type=float, metavar="X",
                        help="report steps until test accuracy >= X (default: each recipe's "
                             "train.target_test_acc)")
    target.add_argument("--target-loss", type=float, metavar="X",
                        help="report steps until test loss <= X")

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


def _run(args: argparse.Namespace) -> int:
    from curvopt import recipes
    from curvopt.recipes.runner import summary_table

    config = recipes.load(args.recipe, args.overrides)
    echo = None if args.quiet else print
    result, out = recipes.run(config, out=args.out, progress=args.progress, echo=echo)
    print(summary_table([result]))
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    print(f"wrote {out}/ (metrics.jsonl, curves.png, summary.json, recipe.toml)")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from curvopt import recipes
    from curvopt.recipes.runner import summary_table

    configs = [recipes.load(path, args.overrides) for path in args.recipes]
    echo = None if args.quiet else print
    results, out = recipes.compare(configs, out=args.out, progress=args.progress, echo=echo,
                                   target_acc=args.target_acc, target_loss=args.target_loss)
    print(summary_table(results))
    for result in results:
        for warning in result.warnings:
            print(f"warning: {result.summary['name']}: {warning}", file=sys.stderr)
    print(f"wrote {out}/ (compare.png, summary.csv, summary.json, one folder per run)")
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

    0: done; 2: a bad command line or recipe (one message on stderr, nothing trained);
    130: interrupted (no output folder left behind).
    """
    from curvopt.recipes.schema import RecipeError

    try:
        args = make_parser().parse_args(None if argv is None else list(argv))
    except SystemExit as exit_:  # --help, or a bad command line (argparse printed why)
        return exit_.code if isinstance(exit_.code, int) else 2
    handler = {"run": _run, "compare": _compare, "stats": _stats, "check": _check}[args.command]
    try:
        return handler(args)
    except RecipeError as err:
        print(f"curvopt {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("curvopt: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `curvopt stats ... | head`: stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

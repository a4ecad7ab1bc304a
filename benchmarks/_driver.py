"""Driver shared by first_order.py and second_order.py.

``main()`` either runs ONE configuration (worker mode, ``--peer IMPL --model M
--row R``; prints one tagged JSON line) or drives all configurations, each in
its own subprocess under the right interpreter, and prints markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import _common as C

SILENT = "__silent__"  # skip() result: leave the cell as "—" without a footnote


@dataclass
class Column:
    impl: str  # key of _impls.BUILDERS
    title: str
    peer: bool  # runs under the peer (BackPACK) interpreter
    show_mem: bool


@dataclass
class Spec:
    title: str
    script: str
    rows: dict  # label -> tuple of extension names, or _impls.PLAIN / _impls.HOOKS
    columns: list
    default_models: str
    default_rows: Callable[[str], list]  # model -> row labels run by default
    skip: Callable[
        [str, str, str, argparse.Namespace], str | None
    ]  # (impl, model, row, args) -> note


def _worker(spec: Spec, args) -> int:
    import _impls as I
    import torch  # noqa: F401

    try:
        if args.row not in spec.rows:
            raise ValueError(f"unknown row {args.row!r}")
        names = spec.rows[args.row]
        problem = C.make_problem(args.model, seed=args.seed)
        plain = C.plain_step(problem, C.clone_model(problem.model))  # hook-free copy, same weights
        if names == I.PLAIN:
            fn = C.plain_step(problem, C.clone_model(problem.model))
        else:
            fn = I.BUILDERS[args.peer](problem, names)
        res = C.measure_config(plain, fn, repeats=args.repeats, warmup=args.warmup)
        res.update(impl=args.peer, model=args.model, row=args.row)
        C.emit_result(res)
    except I.Unsupported as e:
        C.emit_result({"error": f"n/a ({e})"})
    except Exception as e:  # report, don't crash the table
        traceback.print_exc()
        first_line = str(e).splitlines()[0][:160] if str(e) else ""
        C.emit_result({"error": f"error: {type(e).__name__}: {first_line}"})
    return 0


def main(spec: Spec, argv=None) -> int:
    ap = argparse.ArgumentParser(description=spec.title)
    C.add_common_args(ap, spec.default_models)
    ap.add_argument(
        "--force-peer-kfra-cnn",
        action="store_true",
        help="try BackPACK's KFRA on the CNN anyway (needs ~16 GiB; killed at --mem-budget-gib)",
    )
    args = ap.parse_args(argv)
    if args.quick:
        args.repeats = min(args.repeats, 3)
        args.warmup = min(args.warmup, 1)
    if args.budget is None:
        args.budget = 120.0 if args.quick else 600.0

    if args.peer:
        return _worker(spec, args)

    import _impls as I

    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in C.MODEL_NAMES:
            ap.error(f"unknown model {m!r}; choose from {', '.join(C.MODEL_NAMES)}")
    wanted_rows = None
    if args.rows:
        wanted_rows = [r.strip() for r in args.rows.split(",") if r.strip()]
        for r in wanted_rows:
            if r not in spec.rows:
                ap.error(f"unknown row {r!r}; choose from {list(spec.rows)}")
    columns = spec.columns
    if args.impls:
        keep = {s.strip() for s in args.impls.split(",")}
        columns = [c for c in columns if c.impl in keep]
    peer_py = C.peer_python(args.peer_python)

    print(f"# {spec.title}\n")
    print(f"- {C.environment_line()}")
    print(
        f"- repeats={args.repeats} interleaved (plain, config) pairs after {args.warmup} warm-up; "
        f"cell = median ratio to plain [quartiles of the pairwise ratios]"
    )
    print(f"- peak memory: {C.MEMORY_METHOD}; MiB")
    print(
        "- the plain row times plain against an identical hook-free copy: its ratio should be "
        "1.00, so its spread gauges the machine's noise; 'unit' is the plain step's median time"
    )
    print(f"- per-configuration budget {args.budget:.0f} s, {args.mem_budget_gib:g} GiB RSS")
    print(f"- peer interpreter: {peer_py or 'not found (BackPACK/Opacus columns skipped)'}")
    print()

    all_results = []
    for model in models:
        labels = wanted_rows or spec.default_rows(model)
        if I.PLAIN_LABEL not in labels:
            labels = [I.PLAIN_LABEL, *labels]
        outcomes: dict = {}
        notes: list[str] = []
        for label in labels:
            for col in columns:
                names = spec.rows[label]
                if names == I.PLAIN and col.impl not in ("curvopt", "backpack"):
                    continue
                note = spec.skip(col.impl, model, label, args)
                if note == SILENT:
                    continue
                if note:
                    if note not in notes:
                        notes.append(note)
                    outcomes[(label, col.impl)] = C.Outcome(
                        False, note=f"skipped ({notes.index(note) + 1})"
                    )
                    continue
                py = peer_py if col.peer else sys.executable
                if py is None:
                    continue
                t0 = time.monotonic()
                print(
                    f"  running {model:12s} {label:32s} {col.impl:10s}",
                    end="",
                    file=sys.stderr,
                    flush=True,
                )
                o = C.run_worker(
                    py,
                    spec.script,
                    [
                        "--peer",
                        col.impl,
                        "--model",
                        model,
                        "--row",
                        label,
                        "--repeats",
                        str(args.repeats),
                        "--warmup",
                        str(args.warmup),
                        "--seed",
                        str(args.seed),
                    ],
                    time_budget=args.budget,
                    mem_budget_gib=args.mem_budget_gib,
                )
                print(
                    f" {time.monotonic() - t0:6.1f}s  {C.fmt_ratio(o, False)}",
                    file=sys.stderr,
                    flush=True,
                )
                if not o.ok and o.note.startswith("error"):
                    if o.note not in notes:
                        notes.append(o.note)
                    o = C.Outcome(False, o.data, note=f"error ({notes.index(o.note) + 1})")
                outcomes[(label, col.impl)] = o
                all_results.append(
                    {
                        "model": model,
                        "row": label,
                        "impl": col.impl,
                        "ok": o.ok,
                        "note": o.note,
                        **o.data,
                    }
                )
        _print_table(spec, model, labels, columns, outcomes, notes)

    if args.json:
        with open(args.json, "w") as fh:
            json.dump(
                {
                    "title": spec.title,
                    "env": C.environment_line(),
                    "repeats": args.repeats,
                    "results": all_results,
                },
                fh,
                indent=1,
            )
        print(f"(results written to {args.json})")
    return 0


def _print_table(spec, model, labels, columns, outcomes, notes):
    import _impls as I

    problem_desc = C.make_problem(model).description
    header = ["quantity"]
    for col in columns:
        header.append(f"{col.title} ×plain")
        if col.show_mem:
            header.append(f"{col.title} peak MiB")
    rows = []
    for label in labels:
        r = [label]
        for col in columns:
            o = outcomes.get((label, col.impl))
            if spec.rows[label] == I.PLAIN and o is not None and o.ok:
                # plain vs an identical plain copy: ideally 1.00, so it gauges the noise
                r.append(f"{C.fmt_ratio(o)}, unit = {o.data['plain_s'] * 1e3:.1f} ms")
            else:
                r.append(C.fmt_ratio(o))
            if col.show_mem:
                r.append(C.fmt_mem(o))
        rows.append(r)
    print(f"## {problem_desc}\n")
    print(C.markdown_table(header, rows))
    for i, n in enumerate(notes, 1):
        print(f"\n({i}) {n}")
    print()

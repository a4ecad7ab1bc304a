#!/usr/bin/env python
"""Real architectures: each quantity as a multiple of a plain forward+backward, each
optimizer's step as a multiple of an SGD step (issue 10's benchmark).

Models (small, but with the layers and calling conventions of the real ones; float32):

* ``resnet``: torchvision's ResNet layout, 2 stages of BasicBlocks (16, 32 channels),
  BatchNorm in **train mode**, ``[32, 3, 32, 32]``;
* ``mobilenet``: torchvision's MobileNetV3 layout, 2 inverted residuals (depthwise convs,
  squeeze-excitation, Hardswish/Hardsigmoid), BatchNorm in **train mode**, ``[32, 3, 32, 32]``;
* ``vit``: torchvision's VisionTransformer, 2 encoder blocks on ``nn.MultiheadAttention``,
  dim 64, 4x4 patches of ``[8, 3, 16, 16]`` (17 tokens with the class token);
* ``convnext``: timm's ConvNeXt, 2 blocks (depthwise 7x7, LayerNorm, Linear MLP, layer
  scale), 32 channels, ``[16, 3, 32, 32]``;
* ``gpt2``, ``bert``, ``llama``: Hugging Face ``transformers`` models from small configs
  (2 layers, 4 heads, dim 64, vocabulary 128), no weights downloaded, eval mode (dropout
  off), next-token/masked-LM cross-entropy over ``[8, 16]`` tokens (logits ``[N, V, T]``).

The vision models are the copies in ``tests/real_models.py`` (torchvision and timm are
not dependencies).  BatchNorm in train mode couples the samples of a batch: the
quantities run under ``curvopt.collect(..., **ROWS_KW)`` (issue 10's opt-in, rows as
samples) when curvopt has it, and plainly otherwise (where they raise).

Method (as ``first_order.py`` and ``optimizers.py``): every (model, row) runs in a
fresh subprocess with 2 threads and ``OMP_WAIT_POLICY=PASSIVE``; a quantity's cell is
the median over interleaved (plain, configured) pairs of their time ratio, the plain
step being a forward+backward of a hook-free copy of the model; an optimizer's cell is
the median ratio of a block of ``--block`` steps (``zero_grad``, forward, backward,
``step``; a multiple of KFACOptimizer's default ``inverse_update_freq=10``) to a block of
``torch.optim.SGD`` steps, at ``lr=1e-5`` so that the parameters (and the cost of a step)
stay put.  A configuration that raises shows its error class in the cell (the messages
are listed under the table); one past its time or memory budget says so.

Usage (from the repository root)::

    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/models.py            # all models
    OMP_WAIT_POLICY=PASSIVE .venv/bin/python benchmarks/models.py --quick    # resnet, vit
    .venv/bin/python benchmarks/models.py --models gpt2,llama --rows KFAC,KFACOptimizer

Targets of issue 10: BatchGrad, SumGradSquared, Variance, BatchL2Grad, DiagGGNMC and KFAC
<= 4x plain on every model; KFACOptimizer's step <= 4x SGD's.
"""

from __future__ import annotations

import argparse
import copy
import inspect
import json
import os
import sys
import time
import traceback
import warnings

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                "tests"))

import _common as C  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402

#: issue 10's opt-in for layers that mix samples (its name may still change: edit here).
ROWS_KW = {"batch_coupling": "rows"}

QUANTITIES = ("BatchGrad", "SumGradSquared", "Variance", "BatchL2Grad", "DiagGGNExact",
              "DiagGGNMC", "KFAC", "KFLR", "KFRA", "DiagHessian")
OPTIMIZERS = ("KFACOptimizer", "DiagGGNAdam", "VarianceAdaptiveSGD")
PLAIN = "plain forward+backward"
SGD = "SGD step"
ROWS = (PLAIN, *QUANTITIES, SGD, *OPTIMIZERS)
MODELS = ("resnet", "mobilenet", "vit", "convnext", "gpt2", "bert", "llama")
QUICK_MODELS = ("resnet", "vit")

DESCRIPTIONS = {
    "resnet": "ResNet (BasicBlock, 2 stages 16/32 ch), BN train mode, [32,3,32,32]",
    "mobilenet": "MobileNetV3 (2 inverted residuals, SE, Hardswish), BN train mode, "
                 "[32,3,32,32]",
    "vit": "ViT (2 encoder blocks, MultiheadAttention, dim 64), [8,3,16,16] = 17 tokens",
    "convnext": "ConvNeXt (2 blocks, depthwise 7x7, layer scale, 32 ch), [16,3,32,32]",
    "gpt2": "GPT-2 (2 layers, 4 heads, dim 64, vocab 128), [8,16] tokens",
    "bert": "BERT masked LM (2 layers, 4 heads, dim 64, vocab 128), [8,16] tokens",
    "llama": "Llama (2 layers, 4 heads, dim 64, vocab 128), [8,16] tokens",
}


# ----------------------------------------------------------------------------- models
class LanguageModel(nn.Module):
    """A Hugging Face causal/masked LM returning logits ``[N, V, T]`` (CrossEntropyLoss's
    ``[N, C, d]`` layout: the loss's samples are the N sequences)."""

    def __init__(self, hf: nn.Module):
        super().__init__()
        self.hf = hf

    def forward(self, ids):
        return self.hf(input_ids=ids).logits.transpose(1, 2)


def _hf_model(name: str) -> nn.Module:
    import transformers as T

    common = dict(vocab_size=128)
    if name == "gpt2":
        cfg = T.GPT2Config(n_layer=2, n_head=4, n_embd=64, n_positions=32, resid_pdrop=0.0,
                           embd_pdrop=0.0, attn_pdrop=0.0, use_cache=False, **common)
        return T.GPT2LMHeadModel(cfg)
    if name == "bert":
        cfg = T.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
                           intermediate_size=128, max_position_embeddings=32,
                           hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, **common)
        return T.BertForMaskedLM(cfg)
    cfg = T.LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=4,
                        max_position_embeddings=32, use_cache=False, **common)
    return T.LlamaForCausalLM(cfg)


def make_problem(name: str, seed: int = 0) -> C.Problem:
    """Model (float32), CrossEntropyLoss (mean) and a fixed batch."""
    import real_models as R

    if name in ("gpt2", "bert", "llama"):
        torch.manual_seed(seed)
        model = LanguageModel(_hf_model(name)).eval()
        g = torch.Generator().manual_seed(seed + 1)
        X = torch.randint(0, 128, (8, 16), generator=g)
        y = torch.randint(0, 128, (8, 16), generator=g)
        return C.Problem(name, DESCRIPTIONS[name], model, nn.CrossEntropyLoss(), X, y)
    sizes = {"resnet": dict(width=16, image=32, N=32), "mobilenet": dict(width=16, image=32, N=32),
             "vit": dict(width=32, image=16, N=8), "convnext": dict(width=32, image=32, N=16)}
    if name not in sizes:
        raise ValueError(f"unknown model {name!r}; choose from {MODELS}")
    p = R.build(name, block=False, dtype=torch.float32, train=name in ("resnet", "mobilenet"),
                seed=seed, classes=10, perturb=False, **sizes[name])
    return C.Problem(name, DESCRIPTIONS[name], p.model, p.loss_fn, p.X, p.y)


def _couples(model: nn.Module) -> bool:
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) and m.training
               for m in model.modules())


# ----------------------------------------------------------------------------- steps
def quantity_step(problem: C.Problem, name: str):
    import curvopt
    import curvopt.extensions as E

    model, loss_fn, X, y = problem.model, problem.loss_fn, problem.X, problem.y
    ext = getattr(E, name)()
    kw = {}
    if _couples(model) and set(ROWS_KW) <= set(inspect.signature(curvopt.collect).parameters):
        kw = ROWS_KW
    params = [p for p in model.parameters() if p.requires_grad]

    def step():
        for p in params:
            p.grad = None
        with curvopt.collect(model, loss_fn, ext, set_attributes=False, **kw):
            loss_fn(model(X), y).backward()

    return step


def optimizer_block(problem: C.Problem, name: str, model: nn.Module, steps: int):
    import curvopt

    X, y, loss_fn = problem.X, problem.y, problem.loss_fn
    if name == SGD:
        opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    else:
        opt = getattr(curvopt, name)(model, loss_fn, lr=1e-5)

    def block():
        for _ in range(steps):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(X), y).backward()
            opt.step()

    block._opt = opt  # keep the optimizer (and its hooks) alive
    return block


def measure_row(model_name: str, row: str, args) -> dict:
    """One configuration: ``measure_config`` of the row against its unit, or its error."""
    try:
        torch.manual_seed(0)
        problem = make_problem(model_name, seed=args.seed)
        pristine = copy.deepcopy(problem.model)
        if row in (SGD, *OPTIMIZERS):
            base = optimizer_block(problem, SGD, copy.deepcopy(pristine), args.block)
            fn = optimizer_block(problem, row, problem.model, args.block)
        else:
            base = C.plain_step(problem, copy.deepcopy(pristine))
            fn = (C.plain_step(problem, copy.deepcopy(pristine)) if row == PLAIN
                  else quantity_step(problem, row))
        res = C.measure_config(base, fn, repeats=args.repeats, warmup=args.warmup)
        if row in (SGD, *OPTIMIZERS):
            res["plain_s"] /= args.block
            res["config_s"] /= args.block
        return res
    except Exception as e:  # report, don't crash the table
        traceback.print_exc()
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        return {"error": type(e).__name__, "message": msg}


def worker(args) -> int:
    """Worker mode: one row (one tagged JSON result), or several rows of one model in this
    process (``--quick``: one JSON ``{"rows": {row: result}}``)."""
    warnings.simplefilter("ignore")
    rows = args.row.split(",")
    if len(rows) == 1:
        C.emit_result(measure_row(args.model, rows[0], args))
    else:
        C.emit_result({"rows": {r: measure_row(args.model, r, args) for r in rows}})
    return 0


# ----------------------------------------------------------------------------- driver
def _cell(o: C.Outcome | None, notes: list) -> str:
    if o is None:
        return "—"
    if o.ok:
        return f"{o.data['ratio']:.1f}"
    if "message" in o.data:  # an exception inside the configuration: its class, a note
        note = f"{o.data['error']}: {o.data['message']}"
        if note not in notes:
            notes.append(note)
        return f"{o.data['error']} ({notes.index(note) + 1})"
    return o.note


def print_tables(models: list, outcomes: dict) -> None:
    notes: list[str] = []
    header = ["", *models]
    rows = []
    for row, unit in ((PLAIN, "ms"), *((q, "") for q in QUANTITIES)):
        if not any((m, row) in outcomes for m in models):
            continue
        r = [row if not unit else f"{row} (ms)"]
        for m in models:
            o = outcomes.get((m, row))
            if unit and o is not None and o.ok:
                r.append(f"{o.data['plain_s'] * 1e3:.1f}")
            else:
                r.append(_cell(o, notes))
        rows.append(r)
    print("## Quantities: time as a multiple of a plain forward+backward\n")
    print(C.markdown_table(header, rows))
    rows = []
    if any((m, r) in outcomes for m in models for r in (SGD, *OPTIMIZERS)):
        r = [f"{SGD} (ms)"]
        for m in models:  # the SGD row's own run, else the SGD blocks of an optimizer row
            done = [outcomes[(m, x)] for x in (SGD, *OPTIMIZERS)
                    if (m, x) in outcomes and outcomes[(m, x)].ok]
            r.append(f"{done[0].data['plain_s'] * 1e3:.1f}" if done else "—")
        rows.append(r)
    for row in OPTIMIZERS:
        if any((m, row) in outcomes for m in models):
            rows.append([row, *(_cell(outcomes.get((m, row)), notes) for m in models)])
    if rows:
        print("\n## Optimizers: time per step as a multiple of an SGD (momentum 0.9) step\n")
        print(C.markdown_table(header, rows))
    print()
    for i, n in enumerate(notes, 1):
        print(f"({i}) {n}")
    print("\nModels: " + "; ".join(f"**{m}** {DESCRIPTIONS[m]}" for m in models))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default=",".join(MODELS), help="comma list of " + ",".join(MODELS))
    ap.add_argument("--rows", default=None, help="comma list of rows (default: all)")
    ap.add_argument("--repeats", type=int, default=7, help="timed interleaved pairs")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--block", type=int, default=10, help="optimizer steps per timed block")
    ap.add_argument("--quick", action="store_true",
                    help=f"a smoke run: models {','.join(QUICK_MODELS)}, 2 repeats, 1 warm-up, "
                         "blocks of 3 steps, no separate SGD row, one process per model")
    ap.add_argument("--budget", type=float, default=None, help="seconds per configuration")
    ap.add_argument("--mem-budget-gib", type=float, default=8.0)
    ap.add_argument("--json", default=None, help="also write the results to this JSON file")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--model", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--row", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        return worker(args)
    if args.quick:
        args.repeats, args.warmup = min(args.repeats, 2), min(args.warmup, 1)
        args.block = min(args.block, 3)
        if args.models == ",".join(MODELS):
            args.models = ",".join(QUICK_MODELS)
    if args.budget is None:
        args.budget = 60.0 if args.quick else 600.0
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in MODELS:
            ap.error(f"unknown model {m!r}; choose from {', '.join(MODELS)}")
    rows = list(ROWS) if args.rows is None else [r.strip() for r in args.rows.split(",")]
    for r in rows:
        if r not in ROWS:
            ap.error(f"unknown row {r!r}; choose from {', '.join(ROWS)}")
    if PLAIN not in rows and any(r in QUANTITIES for r in rows):
        rows.insert(0, PLAIN)  # the unit's time, also where every quantity fails
    if args.quick and SGD in rows:
        rows.remove(SGD)  # the optimizer rows time SGD blocks anyway

    print("# curvopt on real architectures\n")
    print(f"- {C.environment_line()}")
    print(f"- {args.repeats} interleaved pairs after {args.warmup} warm-up; cell = median ratio; "
          f"optimizers timed over blocks of {args.block} steps at lr=1e-5")
    print(f"- per-configuration budget {args.budget:.0f} s, {args.mem_budget_gib:g} GiB RSS\n")
    outcomes: dict = {}
    script = os.path.abspath(__file__)
    # one subprocess per configuration; --quick: one per model (saves ~1 s of start-up per row)
    jobs = [(m, [r]) for m in models for r in rows] if not args.quick else [
        (m, rows) for m in models]
    for m, job_rows in jobs:
        t0 = time.monotonic()
        print(f"  {m:10s} {','.join(job_rows)[:40]:40s}", end="", file=sys.stderr, flush=True)
        o = C.run_worker(sys.executable, script,
                         ["--worker", "--model", m, "--row", ",".join(job_rows), "--repeats",
                          str(args.repeats), "--warmup", str(args.warmup), "--block",
                          str(args.block), "--seed", str(args.seed)],
                         time_budget=args.budget * len(job_rows),
                         mem_budget_gib=args.mem_budget_gib)
        if o.ok and "rows" in o.data:
            found = {r: (C.Outcome(False, d, note=d["error"]) if "error" in d
                         else C.Outcome(True, d)) for r, d in o.data["rows"].items()}
        else:
            found = {r: o for r in job_rows}
        outcomes.update({(m, r): found[r] for r in job_rows})
        shown = ", ".join(f"{f.data['ratio']:.1f}" if f.ok else f.data.get("error", f.note)
                          for f in found.values())
        print(f" {time.monotonic() - t0:6.1f}s  {shown[:80]}", file=sys.stderr, flush=True)
    print_tables(models, outcomes)
    if args.json:
        with open(args.json, "w") as fh:
            json.dump([{"model": m, "row": r, "ok": o.ok, "note": o.note, **o.data}
                       for (m, r), o in outcomes.items()], fh, indent=1)
    return 0


if __name__ == "__main__":
    if os.environ.get("OMP_WAIT_POLICY", "").upper() != "PASSIVE":
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"  # for the workers (run_worker forces it too)
    sys.exit(main())

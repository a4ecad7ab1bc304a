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
import queue
import subprocess
import sys
import tempfile
import threading
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

    common = dict(vocab_size=128, bos_token_id=1, eos_token_id=2, pad_token_id=0)
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


def optimizer_steps(problem: C.Problem, name: str, model: nn.Module):
    """``run(k)``: ``k`` training steps of optimizer ``name`` (or SGD) on ``model``."""
    import curvopt

    X, y, loss_fn = problem.X, problem.y, problem.loss_fn
    if name == SGD:
        opt = torch.optim.SGD(model.parameters(), lr=1e-5, momentum=0.9)
    else:
        opt = getattr(curvopt, name)(model, loss_fn, lr=1e-5)

    def run(k: int = 1):
        for _ in range(k):
            opt.zero_grad(set_to_none=True)
            loss_fn(model(X), y).backward()
            opt.step()

    run._opt = opt  # keep the optimizer (and its hooks) alive
    return run


def measure_row(model_name: str, row: str, args) -> dict:
    """One configuration against its unit (``_common``'s method), or its error.

    The first call is timed alone (and gives the peak memory); when the remaining calls
    would take more than half the row's budget, the result is that one call's ratio to
    the unit (``single_call``: it includes one-off costs, so it overstates a little).
    """
    try:
        torch.manual_seed(0)
        problem = make_problem(model_name, seed=args.seed)
        pristine = copy.deepcopy(problem.model)
        k = args.block if row in (SGD, *OPTIMIZERS) else 1
        if k > 1:
            base = optimizer_steps(problem, SGD, copy.deepcopy(pristine))
            fn = optimizer_steps(problem, row, problem.model)
        else:
            plain = C.plain_step(problem, copy.deepcopy(pristine))
            base = lambda k=1: plain()  # noqa: E731
            one = (C.plain_step(problem, copy.deepcopy(pristine)) if row == PLAIN
                   else quantity_step(problem, row))
            fn = lambda k=1: one()  # noqa: E731
        C.setup_threads()
        base(1)
        t = time.perf_counter()
        base(1)
        unit = time.perf_counter() - t
        before = C.maxrss_mib()
        t = time.perf_counter()
        fn(1)  # optimizers: the first step also builds the state
        first = time.perf_counter() - t
        peak = C.maxrss_mib() - before
        if first * k * (args.repeats + max(args.warmup - 1, 0)) > args.budget / 2:
            return {"ratio": first / unit, "single_call": True, "plain_s": unit,
                    "config_s": first, "peak_mib": peak}
        res = C.time_interleaved(lambda: base(k), lambda: fn(k), repeats=args.repeats,
                                 warmup=max(args.warmup - 1, 0))
        res["plain_s"] /= k
        res["config_s"] /= k
        res["peak_mib"] = peak
        return res
    except Exception as e:  # report, don't crash the table
        traceback.print_exc()
        msg = str(e).splitlines()[0][:200] if str(e) else ""
        return {"error": type(e).__name__, "message": msg}


ROW_TAG = "@@ROW@@ "


def worker(args) -> int:
    """Worker mode: the rows of one model, each announced (ROW_TAG) and then reported (one
    tagged JSON line), so the driver can stop one that overruns and keep the others."""
    warnings.simplefilter("ignore")
    for row in args.row.split(","):
        print(ROW_TAG + row, flush=True)
        C.emit_result({"row": row, **measure_row(args.model, row, args)})
    return 0


# ----------------------------------------------------------------------------- driver
def run_rows(model: str, rows: list, args) -> dict:
    """Run ``rows`` of ``model`` in worker processes: one per row (default), or one for all
    (``--quick``; a row past its budget is killed with its process and the rows after it go
    on in a new one).  Returns ``{row: Outcome}``."""
    out: dict = {}
    todo = list(rows)
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    while todo:
        batch = list(todo if args.quick else todo[:1])
        reported = 0
        cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--model", model, "--row",
               ",".join(batch), "--repeats", str(args.repeats), "--warmup", str(args.warmup),
               "--block", str(args.block), "--seed", str(args.seed), "--budget", str(args.budget)]
        with tempfile.TemporaryFile("w+") as err:
            proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, text=True, env=env)
            lines: queue.Queue = queue.Queue()
            threading.Thread(target=_pump, args=(proc.stdout, lines), daemon=True).start()
            current, deadline = None, time.monotonic() + args.budget
            while True:
                try:
                    line = lines.get(timeout=0.2)
                except queue.Empty:
                    line = ""
                if line is None:
                    break
                if line.startswith(ROW_TAG):
                    current, deadline = line[len(ROW_TAG):].strip(), time.monotonic() + args.budget
                    t0 = time.monotonic()
                    print(f"  {model:10s} {current:24s}", end="", file=sys.stderr, flush=True)
                elif line.startswith(C.RESULT_TAG):
                    d = json.loads(line[len(C.RESULT_TAG):])
                    row = d.pop("row")
                    o = (C.Outcome(False, d, note=d["error"]) if "error" in d else C.Outcome(True, d))
                    _done(out, todo, row, o, t0)
                    current, reported = None, reported + 1
                reason = ""
                if time.monotonic() > deadline:
                    reason = f"did not finish (>{args.budget:.0f} s)"
                elif C._rss_of(proc.pid) > args.mem_budget_gib:
                    reason = f"did not finish (RSS >{args.mem_budget_gib:g} GiB)"
                if reason:
                    proc.kill()
                    if current is None:  # still starting up
                        current, t0 = todo[0], deadline - args.budget
                    _done(out, todo, current, C.Outcome(False, note=reason), t0)
                    reported += 1
                    break
            proc.wait()
            if not reported:  # died before any result: the first row is to blame
                err.seek(0)
                tail = err.read().strip().splitlines()
                _done(out, todo, batch[0], C.Outcome(False, note="failed: " + (
                    tail[-1] if tail else f"exit code {proc.returncode}")), time.monotonic())
    return out


def _pump(stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put(line)
    lines.put(None)


def _done(out, todo, row, o, t0):
    out[row] = o
    if row in todo:
        todo.remove(row)
    shown = f"{o.data['ratio']:.2f}" if o.ok else o.data.get("error", o.note)
    print(f" {time.monotonic() - t0:6.1f}s  {shown}", file=sys.stderr, flush=True)


def _cell(o: C.Outcome | None, notes: list) -> str:
    if o is None:
        return "—"
    if o.ok:
        return f"~{o.data['ratio']:.0f} (first call)" if o.data.get("single_call") \
            else f"{o.data['ratio']:.1f}"
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
    ap.add_argument("--models", default=None,
                    help="comma list of " + ",".join(MODELS) + " (default: all; --quick: "
                         + ",".join(QUICK_MODELS) + ")")
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
    if args.models is None:
        args.models = ",".join(QUICK_MODELS if args.quick else MODELS)
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
    for m in models:
        outcomes.update({(m, r): o for r, o in run_rows(m, rows, args).items()})
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

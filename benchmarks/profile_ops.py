"""Where the time of a CPU train step and of a sampling network call goes, per op category.

    python benchmarks/profile_ops.py --config quick [--config fashion_mnist_20min] [--steps 20]
        [--what train|sample|both] [--sample-batch 64] [--warmup 3] [--top 12] [--out-dir DIR] [key=value ...]

Training runs the Trainer's compiled step (forward, backward, Adam, EMA; ``Trainer.train_step``,
which also draws the step's timesteps and noise on the host and reads the step's statistics) on a
synthetic batch of the config's ``batch_size``. Sampling runs the compiled U-Net call of the
samplers (``make_eps_fn``) at ``--sample-batch`` images (default: the config's ``num_samples``, 64
for the packaged configs) and a fixed timestep; the samplers' own arithmetic is not included.

Method: ``--warmup`` calls first (the first compiles the graph), then ``--steps`` calls timed
without the profiler, then ``--steps`` calls timed with MindSpore 2.10's profiler
(``mindspore.profiler.profile(activities=[ProfilerActivity.CPU])``, started after the warm-up).
On CPU it writes, under ``<run>/FRAMEWORK/``, ``cpu_op_execute_timestamp_0.txt`` (per op node: full
scope name and the start (ns) and duration (ms) of every execution) and ``cpu_framework_0.txt``
(one line per execution, in execution order: op type, short name, input shapes); these two files
are what this script reads (there is no ``op_statistic`` on CPU; ``cpu_op_type_info_0.csv`` only
has per-type totals). The profiler's analysis also leaves a Chrome/Perfetto trace,
``ASCEND_PROFILER_OUTPUT/trace_view.json``, kept with ``--out-dir``.

Custom aot ops (ddpm_ms/models/kernels) all have the op type "Custom" and the profiler does not
record their kernel (func) name, so each is identified from its input shapes, which differ per
kernel (see ``_ops.py``): e.g. 3 inputs [N, G, C/G, HW], [C], [C] is group_norm_fwd; a "Gradients/"
scope tells backward from forward. The layer named in a backward op's scope is not reliable (the
conv gradients of every layer appear under the first conv's scope), so scopes are used only for
built-in ops, and only the cell class (an ``*Attention*`` cell, the ``Update``/``Adam``/``EMA`` cells,
a ``GroupNorm``/``SiLU``/``GELU`` cell). The attention blocks' projections count as convolutions
(1x1 conv kernels) or dense (MatMul) ops, the time-embedding add (plane_add) as elementwise.
Op durations are the profiler's host timestamps around each kernel launch.

Reported per step: op time by category (sum of op durations), share, ops executed; the wall
time with and without the profiler; the time covered by ops (union of their intervals); and the
gap = profiled wall - covered time: launch/dispatch overhead between ops and host work.
"""

import argparse
import collections
import glob
import json
import os
import shutil
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import ddpm_ms  # noqa: E402,F401  (sets ONEDNN_MAX_CPU_ISA before MindSpore loads)
import numpy as np
import mindspore as ms
from mindspore import Tensor
from mindspore.profiler import ProfilerActivity, tensorboard_trace_handler

from ddpm_ms.config import load_config
from ddpm_ms.diffusion.generation import make_eps_fn
from ddpm_ms.factory import create_model
from ddpm_ms.models import kernels
from ddpm_ms.training.trainer import Trainer
from ddpm_ms.utils.device import setup_device

CONV, NORM, ATTN, DENSE, OTHER, OPTIM = ("convolutions", "norm/activation", "attention", "dense (MatMul)",
                                         "elementwise/other", "optimizer/EMA")
CATEGORIES = (CONV, NORM, ATTN, DENSE, OTHER, OPTIM)
NORM_ACT_TYPES = {"GroupNorm", "GroupNormGrad", "SiLU", "SiLUGrad", "GeLU", "GeLUGrad", "Sigmoid", "SigmoidGrad",
                  "Erf", "LayerNorm", "LayerNormGrad", "BatchNorm", "BatchNormGrad"}
OPTIM_TYPES = {"Adam", "ApplyAdam", "AdamWeightDecay", "Assign", "AssignAdd"}


def read_events(out_dir):
    """[(start ns, duration ms, full op name, input shapes or None)] of one profiler run, in execution order."""
    found = glob.glob(os.path.join(out_dir, "*", "FRAMEWORK", "cpu_op_execute_timestamp_*.txt"))
    if not found:
        raise RuntimeError(f"the profiler wrote no cpu_op_execute_timestamp file under {out_dir}")
    stamp_file = max(found, key=os.path.getmtime)  # this run's (an --out-dir may hold earlier ones)
    events = []
    with open(stamp_file) as f:
        for line in f:
            if line.strip():
                name, _, times = line.strip().split(";")
                for t in times.split():
                    start, dur, _tid = t.split(",")
                    events.append([int(start), float(dur), name, None])
    events.sort(key=lambda e: e[0])
    frames = []
    for path in glob.glob(os.path.join(os.path.dirname(stamp_file), "cpu_framework_*.txt")):
        with open(path) as f:
            frames = [line.strip().split(";") for line in f if line.strip()]
    if len(frames) == len(events) and all(e[2].rsplit("/", 1)[-1] == fr[1] for e, fr in zip(events, frames)):
        for e, fr in zip(events, frames):  # input_1:[8, 32, 28, 28] ... (else NoShape, TupleShape(...))
            values = [field.split(":", 1)[1] for field in fr[3:] if field.startswith("input_")]
            e[3] = [json.loads(v) if v.startswith("[") else None for v in values]
    else:
        print("note: cpu_framework does not line up with the op timestamps; Custom ops are not told apart")
    return events


def custom_kernel(name, shapes, act):
    """(kernel, category) of a Custom op, from its input shapes (signatures in ddpm_ms/models/kernels/_ops.py)."""
    if shapes is None:
        return "ddpm_ms kernels", OTHER
    n, half = len(shapes), len(shapes) // 2
    if n > 5:  # ema_update(decay, *shadows, *params) or all_finite(*grads)
        return ("ema_update", OPTIM) if n % 2 and shapes[1:1 + half] == shapes[1 + half:] else ("all_finite", OPTIM)
    if any(s is None for s in shapes):
        return "ddpm_ms kernels", OTHER
    ranks = [len(s) for s in shapes]
    if ranks[0] == 5:
        return ("attention fwd", ATTN) if n == 1 else ("attention bwd", ATTN)
    if n == 5:
        return "group_norm bwd", NORM
    if n in (3, 4) and ranks[:2] == [4, 1]:
        return "group_norm fwd", NORM
    if n == 1 and name.startswith("Gradients/"):  # one 4-d input in the backward pass (scopes unreliable there)
        return "plane_sum / bias_grad / upsample2x bwd", OTHER
    if n == 1:  # forward scopes name the cell
        return ("upsample2x fwd", OTHER) if "NearestUpsample2x" in name else (f"{act} fwd", NORM)
    if ranks == [4, 2]:  # x [N, C, H, W] + b [N, C]: the time embedding added per channel
        return "plane_add", OTHER
    if ranks == [4, 1]:  # x [N, C, H, W] + b [C]: a convolution's bias
        return "bias_add", OTHER
    if n == 2 and shapes[0] == shapes[1]:
        return f"{act} bwd", NORM
    w, pass_ = shapes[-1], "bwd_input" if name.startswith("Gradients/") else "fwd"
    conv = "dwconv" if ranks[-1] == 4 and w[1] == 1 and w[0] == shapes[0][1] == shapes[-2][1] else "conv"
    if ranks == [4, 4]:
        return f"{conv} {pass_}", CONV
    if ranks == [4, 4, 4]:
        return f"{conv} bwd_filter", CONV
    return "unidentified", OTHER


def classify(name, shapes, act):
    """(kind, category) of one op execution: kind is the op type, or Custom:<kernel> for ddpm_ms kernels."""
    op_type = name.rsplit("/", 1)[-1].rsplit("-op", 1)[0]
    cells = [part.rsplit("-", 1)[-1] for part in name.split("/")[:-1] if "-" in part]  # scope cell classes
    if op_type == "Custom":
        kernel, category = custom_kernel(name, shapes, act)
        return f"Custom:{kernel}", category
    if op_type in OPTIM_TYPES or any(c in ("Update", "Adam", "EMA") for c in cells):
        return op_type, OPTIM
    if any("Attention" in c for c in cells) or op_type.startswith("Softmax"):
        return op_type, ATTN
    if op_type.startswith(("Conv", "DepthwiseConv", "Deconv")):
        return op_type, CONV
    if op_type in NORM_ACT_TYPES or (cells and cells[-1] in ("GroupNorm", "SiLU", "GELU")):
        return op_type, NORM
    if op_type in ("MatMul", "BatchMatMul"):
        return op_type, DENSE
    return op_type, OTHER


def covered_ms(events):
    """Milliseconds covered by the union of the op intervals (ops may overlap if run in parallel)."""
    total, end = 0.0, None
    for start, dur, *_ in events:
        stop = start + dur * 1e6
        if end is None or start >= end:
            total += dur * 1e6
            end = stop
        elif stop > end:
            total += stop - end
            end = stop
    return total / 1e6


def timed(fn, steps):
    t0 = time.perf_counter()
    for _ in range(steps):
        fn()
    return (time.perf_counter() - t0) / steps * 1e3


def profile(fn, steps, out_dir):
    """(wall ms per call without the profiler, wall ms per call with it, op events of the profiled calls)."""
    plain = timed(fn, steps)
    prof = ms.profiler.profile(activities=[ProfilerActivity.CPU], start_profile=False,
                               on_trace_ready=tensorboard_trace_handler(out_dir))
    prof.start()
    profiled = timed(fn, steps)
    prof.stop()  # writes the raw files and runs the analysis (trace_view.json)
    return plain, profiled, read_events(out_dir)


def report(title, events, steps, plain, profiled, act, top):
    by_cat = collections.defaultdict(lambda: [0.0, 0])
    by_kind = collections.defaultdict(lambda: [0.0, 0])
    for _, dur, name, shapes in events:
        kind, cat = classify(name, shapes, act)
        for table, key in ((by_cat, cat), (by_kind, (kind, cat))):
            table[key][0] += dur
            table[key][1] += 1
    total = sum(v[0] for v in by_cat.values())
    lines = [f"### {title}", "", "| category | ms / step | share of op time | ops / step |", "|---|---:|---:|---:|"]
    for cat in CATEGORIES:
        ms_, count = by_cat.get(cat, (0.0, 0))
        lines.append(f"| {cat} | {ms_ / steps:.1f} | {100 * ms_ / total:.1f}% | {count / steps:.0f} |")
    lines.append(f"| **all ops** | **{total / steps:.1f}** | 100% | **{len(events) / steps:.0f}** |")
    busy = covered_ms(events) / steps
    lines += ["", f"- wall ms/step: {profiled:.1f} with the profiler, {plain:.1f} without",
              f"- summed op ms/step: {total / steps:.1f} (time covered by ops: {busy:.1f})",
              f"- gap (wall with profiler - covered): {profiled - busy:.1f} ms/step "
              f"({100 * (profiled - busy) / profiled:.0f}% of the wall time: dispatch between ops, host work)",
              "", f"Top {top} op kinds:", "", "| op kind | category | ms / step | share | count / step |",
              "|---|---|---:|---:|---:|"]
    for (kind, cat), (ms_, count) in sorted(by_kind.items(), key=lambda kv: -kv[1][0])[:top]:
        lines.append(f"| {kind} | {cat} | {ms_ / steps:.2f} | {100 * ms_ / total:.1f}% | {count / steps:.0f} |")
    return "\n".join(lines)


def workloads(cfg, backend, what, sample_batch):
    """[(name, detail, fn)]: one training step of the Trainer, and/or one sampling network call."""
    rng = np.random.default_rng(0)
    shape = (cfg["channels"], cfg["image_size"], cfg["image_size"])
    classes = cfg["num_classes"]
    runs = []
    if what in ("train", "both"):
        batch = cfg["batch_size"]
        trainer = Trainer(cfg, backend, steps_per_epoch=10 ** 6)
        x = Tensor(rng.uniform(-1, 1, (batch,) + shape).astype(np.float32))
        y = np.arange(batch) % classes if classes else None
        runs.append(("train", f"batch {batch}", lambda: trainer.train_step(x, y)))
    if what in ("sample", "both"):
        model = create_model(cfg)
        model.set_train(False)
        eps_fn = make_eps_fn(model)
        xs = Tensor(rng.standard_normal((sample_batch,) + shape).astype(np.float32))
        ts = Tensor(np.full((sample_batch,), cfg["timesteps"] // 2, np.int32))
        ys = Tensor((np.arange(sample_batch) % classes).astype(np.int32)) if classes else None
        runs.append(("sample", f"batch {sample_batch}, network call", lambda: eps_fn(xs, ts, ys).asnumpy()))
    return runs


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", action="append", help="config name or file (repeatable; default quick)")
    parser.add_argument("--steps", type=int, default=20, help="steps (and sampling calls) timed and profiled")
    parser.add_argument("--what", choices=("train", "sample", "both"), default="both")
    parser.add_argument("--sample-batch", type=int, default=None, help="images per sampling call (default: "
                        "the config's num_samples)")
    parser.add_argument("--warmup", type=int, default=3, help="untimed calls first (the first compiles)")
    parser.add_argument("--top", type=int, default=12, help="rows of the per-op-kind table")
    parser.add_argument("--out-dir", default=None, help="keep the profiler output (and report.md) here")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value")
    args = parser.parse_args()
    out_root = args.out_dir or tempfile.mkdtemp(prefix="ddpm_ms_profile_")
    reports = []
    try:
        for name in args.config or ["quick"]:
            cfg = load_config(name, args.overrides)
            backend = setup_device(cfg["device"], cfg["mode"], seed=0)
            tag = os.path.splitext(os.path.basename(name))[0]
            print(f"config {name}: backend {backend}, {os.cpu_count()} CPUs, kernels: {kernels.status()}", flush=True)
            runs = workloads(cfg, backend, args.what, args.sample_batch or cfg["num_samples"])
            for what, detail, fn in runs:
                t0 = time.perf_counter()
                for _ in range(args.warmup):
                    fn()
                print(f"  {what}: {args.warmup} warm-up calls {time.perf_counter() - t0:.1f} s (incl. compilation)",
                      flush=True)
                plain, profiled, events = profile(fn, args.steps, os.path.join(out_root, f"{tag}_{what}"))
                title = f"{tag}: {what} ({detail}, {args.steps} steps)"
                reports.append(report(title, events, args.steps, plain, profiled, cfg["act"], args.top))
                print("\n" + reports[-1] + "\n", flush=True)
        if args.out_dir:
            with open(os.path.join(out_root, "report.md"), "w") as f:
                f.write("\n\n".join(reports) + "\n")
            print(f"profiler output, traces (*/ASCEND_PROFILER_OUTPUT/trace_view.json) and report.md in {out_root}")
    finally:
        if not args.out_dir:
            shutil.rmtree(out_root, ignore_errors=True)


if __name__ == "__main__":
    main()

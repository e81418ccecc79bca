"""Export time, file size, parity and call time of MindIR and ONNX exports of a config's model.

    python benchmarks/bench_export.py --config quick [--checkpoint CKPT] [--batch 64] [--repeats 5]

Without --checkpoint the model is built untrained (seed 0) and saved to a temporary checkpoint
(the sizes and times do not depend on training). For each format: seconds of ``export`` (load,
trace, compile, write), the file size, the largest deviation of the exported graph's output from
the checkpoint model on built-in ops (relative to the output's max |value|) on random x at
spread timesteps, and the median seconds per call of each (the model on built-in ops, the fast
CPU kernels, MindIR via GraphCell, ONNX via onnxruntime). Printed as a Markdown table.
"""

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout
import ddpm_ms  # noqa: E402,F401  (sets ONEDNN_MAX_CPU_ISA before MindSpore loads)

import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Tensor  # noqa: E402

from ddpm_ms.utils import checkpoint as ckpt  # noqa: E402
from ddpm_ms.config import load_config  # noqa: E402
from ddpm_ms.utils.device import setup_device  # noqa: E402
from ddpm_ms.export import export  # noqa: E402
from ddpm_ms.interop.exported import load_exported  # noqa: E402
from ddpm_ms.factory import create_model  # noqa: E402
from ddpm_ms.diffusion.generation import guided_eps_fn, make_eps_fn
from ddpm_ms.pipeline import load


def timed(fn, repeats):
    fn()  # compile / warm up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="quick")
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--guidance", type=float, default=3.0, help="w for class-conditional models")
    args = parser.parse_args()
    setup_device("CPU", "graph")
    tmp = tempfile.mkdtemp(prefix="bench_export_")
    path = args.checkpoint
    if path is None:
        ms.set_seed(0)
        cfg = load_config(args.config)
        params = ckpt.named_params(create_model(cfg, fast_kernels=False))
        path = ckpt.save(os.path.join(tmp, "untrained.ckpt"), {"model": params, "ema": params},
                         {"config": cfg, "step": 0})

    rng = np.random.default_rng(0)
    ref, sched, cfg = load(path, fast_kernels=False)[:3]
    shape = (args.batch, cfg["channels"], cfg["image_size"], cfg["image_size"])
    x = Tensor(rng.standard_normal(shape, dtype=np.float32))
    t = Tensor(np.linspace(0, sched.num_timesteps - 1, args.batch).round().astype(np.int32))
    labels = None if cfg["num_classes"] is None else np.arange(args.batch) % cfg["num_classes"]

    def eps_of(model):
        fn = make_eps_fn(model)
        return fn if labels is None else guided_eps_fn(fn, labels, args.guidance, cfg["num_classes"])

    ref_fn = eps_of(ref)
    want = ref_fn(x, t).asnumpy()
    fast_fn = eps_of(load(path).model)
    rows = [("checkpoint, built-in ops", "", "", "", timed(lambda: ref_fn(x, t).asnumpy(), args.repeats)),
            ("checkpoint, fast CPU kernels", "", "",
             f"{np.abs(fast_fn(x, t).asnumpy() - want).max() / np.abs(want).max():.1e}",
             timed(lambda: fast_fn(x, t).asnumpy(), args.repeats))]
    for fmt in ("mindir", "onnx"):
        out = os.path.join(tmp, f"model.{fmt}")
        start = time.perf_counter()
        export(path, fmt, args.batch, out)
        seconds = time.perf_counter() - start
        fn = load_exported(out).make_eps_fn(args.batch, labels, args.guidance)
        err = np.abs(fn(x, t).asnumpy() - want).max() / np.abs(want).max()
        rows.append((fmt, f"{seconds:.1f}", f"{os.path.getsize(out) / 2**20:.2f}", f"{err:.1e}",
                     timed(lambda fn=fn: fn(x, t).asnumpy(), args.repeats)))
    print(f"{args.config}, batch {args.batch}{'' if labels is None else f', guided w={args.guidance}'}, "
          f"{sum(p.size for p in ref.get_parameters()) / 1e6:.2f} M params")
    print("| network | export s | file MB | max error / max abs | s per call |\n|---|---:|---:|---:|---:|")
    for name, secs, size, err, call in rows:
        print(f"| {name} | {secs} | {size} | {err} | {call:.3f} |")
    shutil.rmtree(tmp)


if __name__ == "__main__":
    main()

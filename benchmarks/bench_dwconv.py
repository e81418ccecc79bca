"""Time the depthwise convolution kernels (forward, input gradient, filter gradient) of the
current source against a git revision's, side by side, for the tutorial U-Net's shapes.

    python benchmarks/bench_dwconv.py [--base REV] [--batch 16 64] [--repeats 9] [--inner 5]
        [--shapes 18x28 28x28 ...] [-k 7]

The current library is the one ``ddpm_ms.models.kernels`` builds (its cache); the baseline is
``cpu_kernels.cc`` + ``common.h`` of ``--base`` (default: the merge base with ``main``)
compiled with the same flags into a temporary directory. Both are called through
``ops.Custom(func_type="aot")`` in graph mode, with the same inputs. Each number is the
median over ``--repeats`` timings of ``--inner`` calls (ms per call); old and new are
interleaved repeat by repeat so that a machine busy with other work slows both alike.
The outputs of old and new are compared too (max relative difference).
"""

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
import ddpm_ms  # noqa: E402,F401  (sets ONEDNN_MAX_CPU_ISA before MindSpore loads)
import numpy as np  # noqa: E402
import mindspore as ms  # noqa: E402
from mindspore import Tensor, nn, ops  # noqa: E402

from ddpm_ms.models import kernels  # noqa: E402
from _revision import build_at  # noqa: E402

# (C, H=W) of the depthwise convs in the tutorial U-Net
SHAPES = ((18, 28), (28, 28), (28, 14), (56, 14), (56, 7), (112, 7), (224, 7))
KERNELS = ("dwconv_fwd", "dwconv_bwd_input", "dwconv_bwd_filter")


class _Op(nn.Cell):
    def __init__(self, lib, name):
        super().__init__()
        out_shape = (lambda dy, x, w: w) if name == "dwconv_bwd_filter" else (lambda *s: s[0])
        self.op = ops.Custom(f"{lib}:{name}", out_shape=out_shape, out_dtype=lambda *d: d[0],
                             func_type="aot")

    def construct(self, *args):
        return self.op(*args)


def _time(fn, args, inner):
    t0 = time.perf_counter()
    for _ in range(inner):
        out = fn(*args)
    out.asnumpy()
    return (time.perf_counter() - t0) / inner * 1e3


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", default=None, help="git revision of the baseline (default: merge-base HEAD main)")
    ap.add_argument("--batch", type=int, nargs="+", default=[16, 64])
    ap.add_argument("--shapes", nargs="+", default=[f"{c}x{h}" for c, h in SHAPES], help="CxH (H = W)")
    ap.add_argument("-k", type=int, default=7)
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--inner", type=int, default=5)
    args = ap.parse_args()

    ms.set_context(mode=ms.GRAPH_MODE, device_target="CPU")
    if not kernels.enabled():
        sys.exit(f"fast kernels unavailable: {kernels.status()}")
    new_lib = kernels.build()
    base = args.base or subprocess.run(["git", "-C", ROOT, "merge-base", "HEAD", "main"], check=True,
                                       capture_output=True, text=True).stdout.strip()
    tmp = tempfile.mkdtemp(prefix="bench_dwconv_")
    try:
        old_lib = build_at(base, "cpu_kernels.cc", tmp)
        print(f"old: {base[:12]} ({old_lib})\nnew: working tree ({new_lib})")
        print(f"threads {os.environ.get('DDPM_MS_KERNEL_THREADS') or os.cpu_count()}, K = {args.k}, "
              f"median of {args.repeats} x {args.inner} calls, ms per call\n")
        ops_by_lib = {lib: {n: _Op(lib, n) for n in KERNELS} for lib in (old_lib, new_lib)}
        totals = {(b, n, lib): 0.0 for b in args.batch for n in KERNELS for lib in (old_lib, new_lib)}
        rng = np.random.default_rng(0)
        head = f"{'N':>3} {'C':>4} {'H':>3}  " + "  ".join(f"{n[7:]:>22}" for n in KERNELS)
        print(head + "\n" + f"{'':13}" + "  ".join(f"{'old':>7}{'new':>7}{'x':>7}  " for _ in KERNELS))
        for batch in args.batch:
            for spec in args.shapes:
                c, h = (int(v) for v in spec.split("x"))
                x = Tensor(rng.standard_normal((batch, c, h, h)).astype(np.float32))
                dy = Tensor(rng.standard_normal((batch, c, h, h)).astype(np.float32))
                w = Tensor(rng.standard_normal((c, 1, args.k, args.k)).astype(np.float32))
                inputs = {"dwconv_fwd": (x, w), "dwconv_bwd_input": (dy, w), "dwconv_bwd_filter": (dy, x, w)}
                cells = []
                for name in KERNELS:
                    outs = [ops_by_lib[lib][name](*inputs[name]).asnumpy() for lib in (old_lib, new_lib)]
                    diff = np.abs(outs[0] - outs[1]).max() / max(np.abs(outs[0]).max(), 1e-30)
                    times = {old_lib: [], new_lib: []}
                    for _ in range(args.repeats):
                        for lib in (old_lib, new_lib):
                            times[lib].append(_time(ops_by_lib[lib][name], inputs[name], args.inner))
                    t_old, t_new = (statistics.median(times[lib]) for lib in (old_lib, new_lib))
                    totals[(batch, name, old_lib)] += t_old
                    totals[(batch, name, new_lib)] += t_new
                    flag = "" if diff < 1e-5 else f" (max rel diff {diff:.1e}!)"
                    cells.append(f"{t_old:7.2f}{t_new:7.2f}{t_old / t_new:6.1f}x{flag} ")
                print(f"{batch:>3} {c:>4} {h:>3}  " + "  ".join(cells), flush=True)
            cells = []
            for name in KERNELS:
                t_old, t_new = totals[(batch, name, old_lib)], totals[(batch, name, new_lib)]
                cells.append(f"{t_old:7.2f}{t_new:7.2f}{t_old / t_new:6.1f}x ")
            print(f"{batch:>3} {'sum':>8}  " + "  ".join(cells) + "\n", flush=True)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

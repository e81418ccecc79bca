"""Time the dense convolution kernels of a config's U-Net, layer by layer and pass by pass
(forward, input gradient, filter gradient), for the current source and a git revision's.

    python benchmarks/bench_convs.py [--config configs/fashion_mnist.yaml] [--batch 16]
        [--base REV] [--repeats 21] [--only NAME_PART]

The current library is the one ``ddpm_ms.models.kernels`` builds (its cache); with ``--base`` the
baseline is ``conv_kernels.cc`` + ``common.h`` of that revision, compiled with the same flags
and OpenBLAS into a temporary directory. The kernels are called directly (ctypes, the aot
calling convention), so the numbers hold the kernels alone, without MindSpore's launch cost.
Each number is the minimum over ``--repeats`` calls in ms (the kernels are deterministic, so
the minimum is the least disturbed timing on a shared machine); the libraries are interleaved
call by call. The outputs of the two libraries are compared too (max relative difference).
"""

import argparse
import ctypes
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # run from a checkout
import ddpm_ms  # noqa: E402,F401  (sets ONEDNN_MAX_CPU_ISA before MindSpore loads)
import numpy as np  # noqa: E402
from mindspore import nn  # noqa: E402

from ddpm_ms.models import kernels  # noqa: E402
from ddpm_ms.config import load_config  # noqa: E402
from ddpm_ms.factory import create_model  # noqa: E402
from _revision import build_at  # noqa: E402


def dense_layers(cfg):
    """(name, Ci, Co, K, stride, input resolution, transposed) of every dense conv of the U-Net."""
    net = create_model(cfg)
    res0, levels = cfg["image_size"], len(cfg["dim_mults"])
    out = []
    for name, cell in net.cells_and_names():
        if not isinstance(cell, (nn.Conv2d, nn.Conv2dTranspose)) or cell.group != 1:
            continue
        part = name.split(".")
        if part[0] in ("downs", "down_blocks"):  # tutorial / ResNet U-Net, the paper's U-Net (arch: ddpm)
            res = res0 >> int(part[1])
        elif part[0] == "up_blocks" and part[2] == "upsamplers":  # nearest x2, then this conv
            res = res0 >> (levels - 2 - int(part[1]))
        elif part[0] in ("ups", "up_blocks"):
            res = res0 >> (levels - 1 - int(part[1]))
        elif part[0].startswith("mid"):
            res = res0 >> (levels - 1)
        else:
            res = res0
        out.append((name, cell.in_channels, cell.out_channels, cell.kernel_size[0], cell.stride[0], res,
                    isinstance(cell, nn.Conv2dTranspose)))
    return out


def aot_call(lib, name, arrays):
    """A no-argument function calling kernel ``name`` of ``lib`` on ``arrays`` (inputs then output)."""
    n = len(arrays)
    ptrs = (ctypes.c_void_p * n)(*[a.ctypes.data for a in arrays])
    ndims = (ctypes.c_int * n)(*[a.ndim for a in arrays])
    dims = [(ctypes.c_int64 * a.ndim)(*a.shape) for a in arrays]
    shapes = (ctypes.POINTER(ctypes.c_int64) * n)(*[ctypes.cast(d, ctypes.POINTER(ctypes.c_int64)) for d in dims])
    dtypes = (ctypes.c_char_p * n)(*[b"float32"] * n)
    fn = getattr(lib, name)

    def call():
        if fn(n, ptrs, ndims, shapes, dtypes, None, None) != 0 or dims is None:
            raise RuntimeError(f"{name} rejected its arguments")
    return call


def passes(ci, co, k, s, res, transposed, n, rng):
    """[(pass, kernel name, arrays)] for one layer; the output array is last."""
    x = rng.standard_normal((n, ci, res, res), dtype=np.float32)
    if transposed:  # the up-sampling conv: forward = the stride-2 conv's input gradient
        w = rng.standard_normal((ci, co, k, k), dtype=np.float32)
        y = np.empty((n, co, 2 * res, 2 * res), np.float32)
        return [("fwd", "conv_down_bwd_input", [x, w, y]), ("bwd_input", "conv_down_fwd", [y, w, np.empty_like(x)]),
                ("bwd_filter", "conv_down_bwd_filter", [x, y, w, np.empty_like(w)])]
    geo, ro = ("same", res) if s == 1 else ("down", res // 2)
    w = rng.standard_normal((co, ci, k, k), dtype=np.float32)
    y = rng.standard_normal((n, co, ro, ro), dtype=np.float32)
    return [("fwd", f"conv_{geo}_fwd", [x, w, np.empty_like(y)]),
            ("bwd_input", f"conv_{geo}_bwd_input", [y, w, np.empty_like(x)]),
            ("bwd_filter", f"conv_{geo}_bwd_filter", [y, x, w, np.empty_like(w)])]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default=os.path.join(ROOT, "configs", "fashion_mnist.yaml"))
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--base", default=None, help="git revision of a baseline to time side by side")
    ap.add_argument("--repeats", type=int, default=21)
    ap.add_argument("--only", default="", help="only layers whose name contains this")
    args = ap.parse_args()
    if not kernels.enabled() or not kernels.conv_enabled():
        sys.exit(f"conv kernels unavailable: {kernels.status()}")
    tmp = tempfile.mkdtemp()
    libs = [ctypes.CDLL(kernels.build())]
    if args.base:
        libs.append(ctypes.CDLL(build_at(args.base, "conv_kernels.cc", tmp, kernels._build_plan()[1])))
    label = "new" if args.base else "ms"
    rng = np.random.default_rng(0)
    totals = np.zeros((3, len(libs)))
    flops_total = 0.0
    print(f"batch {args.batch}, {args.config}; ms per call (min of {args.repeats})"
          + (f", {label} / base {args.base}" if args.base else ""))
    for name, ci, co, k, s, res, transposed in dense_layers(load_config(args.config)):
        if args.only not in name:
            continue
        ro = 2 * res if transposed else (res if s == 1 else res // 2)
        flops = 2.0 * args.batch * ci * co * k * k * (res * res if transposed else ro * ro)
        flops_total += flops
        row = []
        for p, (pname, kname, arrays) in enumerate(passes(ci, co, k, s, res, transposed, args.batch, rng)):
            outs = [[a.copy() for a in arrays] for _ in libs]
            calls = [aot_call(lib, kname, o) for lib, o in zip(libs, outs)]
            times = [[] for _ in libs]
            for c in calls:
                c()
            for _ in range(args.repeats):
                for i, c in enumerate(calls):
                    t0 = time.perf_counter()
                    c()
                    times[i].append(time.perf_counter() - t0)
            best = [min(t) * 1e3 for t in times]
            totals[p] += best
            diff = ""
            if len(libs) > 1:
                a, b = outs[0][-1], outs[1][-1]
                diff = f" (d {np.abs(a - b).max() / max(np.abs(b).max(), 1e-30):.0e})"
            row.append(f"{pname} " + "/".join(f"{t:6.2f}" for t in best) + diff)
        print(f"{name[-28:]:28s} {ci:4d}->{co:<4d} k{k} s{s} {res:3d}px  " + "  ".join(row))
    for i in range(len(libs)):
        tag = (label, "base")[i] if args.base else label
        gf = [flops_total / t / 1e6 for t in totals[:, i]]
        print(f"{tag:>4s} total: fwd {totals[0, i]:.1f}  bwd_input {totals[1, i]:.1f}  bwd_filter {totals[2, i]:.1f}"
              f"  = {totals[:, i].sum():.1f} ms ({flops_total / 1e9:.2f} GFLOP per pass;"
              f" {gf[0]:.0f} / {gf[1]:.0f} / {gf[2]:.0f} GFLOP/s)")


if __name__ == "__main__":
    main()

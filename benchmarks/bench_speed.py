"""Train img/s, sampling img-steps/s, FLOPs and achieved GFLOP/s of a config's U-Net.

    python benchmarks/bench_speed.py --config configs/quick.yaml [--batch 16]
        [--sample-batch 64] [--repeats 7] [--inner 3] [--compare-builtin] [--torch] [key=value ...]

Training is timed on the compiled TrainStep (forward, backward, loss scaling, Adam, EMA)
with synthetic batches, so the data pipeline is not included; sampling is timed on the
compiled network call at the sampling batch size (one network evaluation = one img-step
per image). Every number is the median over ``--repeats`` timings of ``--inner`` calls.

Variants are timed in one process, interleaved repeat by repeat, so that a machine busy
with other work slows them alike and the ratios stay meaningful:

* ``ms``: ddpm_ms as configured (fast CPU kernels unless ``DDPM_MS_FAST_KERNELS=0``);
* ``ms-builtin`` (``--compare-builtin``): the same network on MindSpore's built-in ops;
* ``ms-noconv`` (``--compare-noconv``): the fast kernels without the OpenBLAS convolutions
  (``DDPM_MS_FAST_CONV=0``, MindSpore's own conv ops);
* ``ms[KEY=VALUE]`` (``--compare KEY=VALUE``, repeatable): the config with that override, e.g.
  ``self_condition=true`` (its GFLOP/s column counts the base config's FLOPs);
* ``torch`` (``--torch``): the PyTorch eager reference (benchmarks/torch_unet.py; for
  ``arch: ddpm`` configs diffusers' ``UNet2DModel``, which needs diffusers) with the same
  weights, loss, Adam and EMA update, in a child process that runs only while
  this one waits (so neither framework's idle threads slow the other); needs torch
  (``pip install torch==2.13.0`` takes the CPU build on the project machines).

FLOPs count multiply-adds x2 of convolutions, dense layers and attention matmuls for
one image (elementwise ops, norms and activations excluded); fwd+bwd = 3x fwd. The
matmul peak is the median GFLOP/s of a 1024^3 float32 matmul in each framework.
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
import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ddpm_ms.models import kernels
from ddpm_ms.config import load_config
from ddpm_ms.utils.device import setup_device
from ddpm_ms.factory import create_model
from ddpm_ms.diffusion.generation import make_eps_fn
from ddpm_ms.training.trainer import Trainer
from ddpm_ms.models import ddpm_unet
from ddpm_ms.models import tutorial_unet as unet_mod

HERE = os.path.dirname(os.path.abspath(__file__))
# MindSpore sets OMP_NUM_THREADS=1 in its process once it runs a graph; the PyTorch worker
# gets the environment this script started with instead
_START_ENV = dict(os.environ)


# ----------------------------------------------------------------------------- FLOPs


def count_flops(cfg):
    """Forward FLOPs (2 x multiply-adds) of one image through the config's U-Net."""
    mode = ms.get_context("mode")
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        model = create_model(cfg)
        total = [0]

        def conv_hook(cell, inputs, output):
            cin = inputs[0].shape[1]
            kh, kw = cell.kernel_size
            if isinstance(cell, nn.Conv2dTranspose):
                _, _, h, w = inputs[0].shape
                total[0] += 2 * cin * h * w * cell.out_channels * kh * kw
            else:
                _, cout, h, w = output.shape
                total[0] += 2 * cout * h * w * (cin // cell.group) * kh * kw

        def dense_hook(cell, inputs, output):
            total[0] += 2 * cell.in_channels * cell.out_channels * inputs[0].shape[0]

        def attn_hook(cell, inputs, output):
            _, _, h, w = inputs[0].shape
            n, d, heads = h * w, cell.dim_head, cell.heads
            if isinstance(cell, unet_mod.Attention):
                total[0] += 2 * 2 * heads * n * n * d
            else:
                total[0] += 2 * 2 * heads * d * d * n

        def ddpm_attn_hook(cell, inputs, output):  # q, k, v, out projections (Dense weights used directly) + attention
            _, c, h, w = inputs[0].shape
            total[0] += 2 * 4 * h * w * c * c + 2 * 2 * h * w * h * w * c

        for _, cell in model.cells_and_names():
            if isinstance(cell, (nn.Conv2d, nn.Conv2dTranspose)):
                cell.register_forward_hook(conv_hook)
            elif isinstance(cell, nn.Dense):
                cell.register_forward_hook(dense_hook)
            elif isinstance(cell, (unet_mod.Attention, unet_mod.LinearAttention)):
                cell.register_forward_hook(attn_hook)
            elif isinstance(cell, ddpm_unet.AttentionBlock):
                cell.register_forward_hook(ddpm_attn_hook)
        size = cfg["image_size"]
        x = Tensor(np.zeros((1, cfg["channels"], size, size), np.float32))
        t = Tensor(np.zeros((1,), np.int32))
        y = Tensor(np.zeros((1,), np.int32)) if cfg["num_classes"] else None
        model(x, t, y)
        return total[0]
    finally:
        ms.set_context(mode=mode)


def ms_matmul_gflops(n=1024, repeats=5):
    a = Tensor(np.random.default_rng(0).standard_normal((n, n)).astype(np.float32))
    ops.matmul(a, a).asnumpy()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        ops.matmul(a, a).asnumpy()
        times.append(time.perf_counter() - t0)
    return 2 * n ** 3 / statistics.median(times) / 1e9


# ----------------------------------------------------------------------------- variants


class Variant:
    """A name, a train-step callable and a sampling callable."""

    def __init__(self, name, train_fn, sample_fn):
        self.name, self.train_fn, self.sample_fn = name, train_fn, sample_fn
        self.train_times, self.sample_times = [], []


def _with_env(env, fn):
    """Run fn() with the environment variables in ``env`` set (the cells read them when built)."""
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        return fn()
    finally:
        for k, v in old.items():
            if v is None:
                del os.environ[k]
            else:
                os.environ[k] = v


def ms_variant(name, cfg, backend, batch, sample_batch, env):
    def build():
        trainer = Trainer(cfg, backend, steps_per_epoch=10 ** 6)
        model = create_model(cfg)
        return trainer, model

    trainer, model = _with_env(env, build)
    model.set_train(False)
    for p, q in zip(model.get_parameters(), trainer.model.get_parameters()):
        p.set_data(q.value().copy())
    rng = np.random.default_rng(0)
    shape = (batch, cfg["channels"], cfg["image_size"], cfg["image_size"])
    x = Tensor(rng.uniform(-1, 1, shape).astype(np.float32))
    eps_fn = make_eps_fn(model)
    xs = Tensor(rng.standard_normal((sample_batch,) + shape[1:]).astype(np.float32))
    ts = Tensor(np.full((sample_batch,), cfg["timesteps"] // 2, np.int32))
    t0 = time.perf_counter()
    trainer.train_step(x)
    compile_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    eps_fn(xs, ts).asnumpy()
    compile_sample = time.perf_counter() - t0
    print(f"  {name}: first train step {compile_train:.1f} s, first sample call {compile_sample:.1f} s "
          "(incl. graph compilation)", flush=True)
    v = Variant(name, lambda: trainer.train_step(x), lambda: eps_fn(xs, ts).asnumpy())
    v.trainer = trainer
    return v


def diffusers_unet(arrays, cfg):
    """diffusers' UNet2DModel (PyTorch eager) holding the ddpm_ms weights ``arrays``, called as net(x, t) -> eps."""
    import torch
    from diffusers import UNet2DModel

    from ddpm_ms.convert import cfg_to_unet_config, to_diffusers_weights

    model = UNet2DModel(**{k: v for k, v in cfg_to_unet_config(cfg).items() if not k.startswith("_")})
    model.load_state_dict({k: torch.from_numpy(v) for k, v in to_diffusers_weights(arrays).items()}, strict=True)

    class Eps(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.unet = model

        def forward(self, x, t, y=None):
            return self.unet(x, t, class_labels=y).sample

    return Eps()


def torch_worker(args, cfg):
    """Child process: the PyTorch eager reference, timed on request from the parent.

    Reads lines "train N" / "sample N" / "quit" on stdin and answers with the seconds the N
    calls took. Runs in its own process so that neither framework's thread pool (OpenMP
    spin-waiting in PyTorch, the actor threads of MindSpore) slows the other's timings, and
    only ever runs while the parent waits, so the two still alternate block by block.
    """
    import torch

    sys.path.insert(0, HERE)
    import torch_unet
    from ddpm_ms.factory import create_schedule

    if args.torch_threads:
        torch.set_num_threads(args.torch_threads)
    arrays = dict(np.load(args.torch_worker))
    if cfg["arch"] == "ddpm":  # the paper's U-Net: diffusers' UNet2DModel is the PyTorch reference
        net, sample_net = diffusers_unet(arrays, cfg), diffusers_unet(arrays, cfg).eval()
    else:
        kwargs = torch_unet.unet_kwargs_from_config(cfg)
        net = torch_unet.from_mindspore(arrays, **kwargs)
        sample_net = torch_unet.from_mindspore(arrays, **kwargs).eval()
    params = [p for p in net.parameters() if p.requires_grad]
    opt = torch.optim.Adam(params, lr=cfg["lr"])
    shadow = [p.detach().clone() for p in params]
    sched = create_schedule(cfg)
    sa = torch.tensor(np.asarray(sched.sqrt_alphas_cumprod), dtype=torch.float32)
    s1 = torch.tensor(np.asarray(sched.sqrt_one_minus_alphas_cumprod), dtype=torch.float32)
    gen = torch.Generator().manual_seed(0)
    batch = args.batch
    shape = (batch, cfg["channels"], cfg["image_size"], cfg["image_size"])
    x = torch.rand(shape, generator=gen) * 2 - 1
    decay = cfg["ema_decay"]

    def train_step():  # same work as ddpm_ms's TrainStep: loss, backward, Adam, EMA
        t = torch.randint(0, sched.num_timesteps, (batch,), generator=gen)
        noise = torch.randn(shape, generator=gen)
        x_noisy = sa[t].view(-1, 1, 1, 1) * x + s1[t].view(-1, 1, 1, 1) * noise
        loss = torch_unet.noise_loss(net(x_noisy, t), noise, cfg["loss_type"])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            torch._foreach_mul_(shadow, decay)
            torch._foreach_add_(shadow, params, alpha=1 - decay)
        return loss.item()

    xs = torch.randn((args.sample_batch,) + shape[1:], generator=gen)
    ts = torch.full((args.sample_batch,), cfg["timesteps"] // 2, dtype=torch.long)

    def sample_step():
        with torch.no_grad():
            return sample_net(xs, ts).numpy()

    n = 1024
    a = torch.randn(n, n)
    a @ a
    times = []
    for _ in range(5):
        t0 = time.perf_counter()
        a @ a
        times.append(time.perf_counter() - t0)
    peak = 2 * n ** 3 / statistics.median(times) / 1e9
    train_step()
    sample_step()
    print(f"ready torch {torch.__version__} eager, {torch.get_num_threads()} threads, "
          f"matmul peak {peak:.1f} GFLOP/s", flush=True)
    fns = {"train": train_step, "sample": sample_step}
    for line in sys.stdin:
        what, _, count = line.strip().partition(" ")
        if what == "quit":
            break
        t0 = time.perf_counter()
        for _ in range(int(count)):
            fns[what]()
        print(time.perf_counter() - t0, flush=True)


def torch_variant(args, ms_model, tmpdir):
    """A Variant whose calls run in a PyTorch child process (None if torch is missing)."""
    import importlib.util
    import subprocess

    if importlib.util.find_spec("torch") is None:
        return None
    sys.path.insert(0, HERE)
    import torch_unet  # noqa: F401  (only to fail early if the file is broken)

    weights = os.path.join(tmpdir, "weights.npz")
    np.savez(weights, **torch_unet.mindspore_arrays(ms_model))
    cmd = [sys.executable, os.path.abspath(__file__), "--config", args.config, "--batch", str(args.batch),
           "--sample-batch", str(args.sample_batch), "--torch-worker", weights, *args.overrides]
    if args.torch_threads:
        cmd[2:2] = ["--torch-threads", str(args.torch_threads)]
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, bufsize=1,
                            env=_START_ENV)
    line = ""
    while not line.startswith("ready"):
        line = proc.stdout.readline()
        if not line:
            raise RuntimeError("the PyTorch worker process died; run it alone to see why: " + " ".join(cmd))
    print("  " + line.strip()[len("ready "):], flush=True)

    def call(what):
        def fn(inner=1):
            proc.stdin.write(f"{what} {inner}\n")
            return float(proc.stdout.readline()) / inner
        return fn

    v = Variant("torch", call("train"), call("sample"))
    v.proc = proc
    v.timed_inside = True
    return v


def interleaved(variants, attr, fn_attr, warmup, repeats, inner):
    """Time each variant's fn for ``inner`` calls, variant after variant, ``repeats`` rounds."""
    for v in variants:
        for _ in range(warmup):
            getattr(v, fn_attr)()
    for _ in range(repeats):
        for v in variants:
            fn = getattr(v, fn_attr)
            if getattr(v, "timed_inside", False):
                getattr(v, attr).append(fn(inner))
                continue
            t0 = time.perf_counter()
            for _ in range(inner):
                fn()
            getattr(v, attr).append((time.perf_counter() - t0) / inner)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: config)")
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--inner", type=int, default=3, help="steps per timing")
    parser.add_argument("--skip-sample", action="store_true")
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--compare-builtin", action="store_true",
                        help="also time MindSpore's built-in ops (DDPM_MS_FAST_KERNELS=0)")
    parser.add_argument("--compare-noconv", action="store_true",
                        help="also time the fast kernels with MindSpore's conv ops (DDPM_MS_FAST_CONV=0)")
    parser.add_argument("--no-fast", action="store_true", help="time only the built-in ops")
    parser.add_argument("--compare", action="append", default=[], metavar="KEY=VALUE",
                        help="also time the config with this override (repeatable), e.g. self_condition=true")
    parser.add_argument("--torch", action="store_true", help="also time the PyTorch eager reference")
    parser.add_argument("--torch-threads", type=int, default=None,
                        help="torch.set_num_threads for the PyTorch reference (default: PyTorch's own)")
    parser.add_argument("--torch-worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    args.batch = batch = args.batch or cfg["batch_size"]
    if args.torch_worker:
        return torch_worker(args, cfg)
    backend = setup_device(cfg["device"], cfg["mode"], seed=0)

    flops = count_flops(cfg)
    peak = ms_matmul_gflops()
    n_params = sum(p.size for p in create_model(cfg).trainable_params())
    print(f"config {args.config} ({' '.join(args.overrides)}): {n_params / 1e6:.2f} M params, backend {backend}, "
          f"{os.cpu_count()} CPUs")
    print(f"FLOPs per image: fwd {flops / 1e9:.3f} G, fwd+bwd {3 * flops / 1e9:.3f} G")
    print(f"kernels: {kernels.status()}")

    variants = []
    if not args.no_fast:
        variants.append(ms_variant("ms", cfg, backend, batch, args.sample_batch, {kernels.ENV_SWITCH: "1"}))
    if args.compare_noconv and not args.no_fast:
        variants.append(ms_variant("ms-noconv", cfg, backend, batch, args.sample_batch,
                                   {kernels.ENV_SWITCH: "1", kernels.ENV_CONV: "0"}))
    if args.compare_builtin or args.no_fast:
        variants.append(ms_variant("ms-builtin", cfg, backend, batch, args.sample_batch, {kernels.ENV_SWITCH: "0"}))
    for override in args.compare:
        variants.append(ms_variant(f"ms[{override}]", load_config(args.config, args.overrides + [override]), backend,
                                   batch, args.sample_batch, {kernels.ENV_SWITCH: "0" if args.no_fast else "1"}))
    tmpdir = tempfile.mkdtemp(prefix="ddpm_ms_bench_")
    tv = None
    try:
        if args.torch:
            tv = torch_variant(args, variants[0].trainer.model, tmpdir)
            if tv is None:
                print("torch is not installed (pip install torch==2.13.0, the CPU build); "
                      "skipping the PyTorch reference")
            else:
                variants.append(tv)
        print(f"MindSpore matmul peak (1024^3 fp32): {peak:.1f} GFLOP/s", flush=True)
        if not args.skip_train:
            interleaved(variants, "train_times", "train_fn", 1, args.repeats, args.inner)
        if not args.skip_sample:
            interleaved(variants, "sample_times", "sample_fn", 1, args.repeats, args.inner)
    finally:
        if tv is not None:
            tv.proc.stdin.write("quit\n")
            tv.proc.stdin.close()
            tv.proc.wait(timeout=60)
        shutil.rmtree(tmpdir, ignore_errors=True)

    results = {}
    for v in variants:
        r = results[v.name] = {}
        if v.train_times:
            med = statistics.median(v.train_times)
            r["train"] = batch / med
            print(f"{v.name:>10} train:  {r['train']:8.1f} img/s at batch {batch}   "
                  f"({3 * flops * r['train'] / 1e9:6.1f} GFLOP/s achieved; step {med * 1e3:.0f} ms, "
                  f"min {batch / max(v.train_times):.1f} max {batch / min(v.train_times):.1f} img/s)")
        if v.sample_times:
            med = statistics.median(v.sample_times)
            r["sample"] = args.sample_batch / med
            print(f"{v.name:>10} sample: {r['sample']:8.1f} img-steps/s at batch {args.sample_batch}   "
                  f"({flops * r['sample'] / 1e9:6.1f} GFLOP/s achieved; call {med * 1e3:.0f} ms)")
    base = variants[0].name if variants else None
    for other in results:
        if other == base:
            continue
        for key in ("train", "sample"):
            if key in results[base] and key in results[other]:
                print(f"ratio {base}/{other} {key}: {results[base][key] / results[other][key]:.2f}x")
    return results


if __name__ == "__main__":
    main()

"""Train img/s and sampling img-steps/s of a config's U-Net, as medians of repeated timings.

    python benchmarks/bench_speed.py --config configs/quick.yaml [--batch 64] [--repeats 5] [key=value ...]

Training is timed on the compiled TrainStep (forward, backward, loss scaling, Adam, EMA)
with synthetic batches, so the data pipeline is not included; sampling is timed on the
compiled network call at the sampling batch size (one network evaluation = one img-step
per image). Prints one line per measurement.
"""

import argparse
import statistics
import time

import ddpm_ms  # noqa: F401  (sets ONEDNN_MAX_CPU_ISA before MindSpore loads)
import numpy as np
from mindspore import Tensor

from ddpm_ms.config import load_config
from ddpm_ms.device import setup_device
from ddpm_ms.pipeline import create_model, make_eps_fn
from ddpm_ms.train import Trainer


def timed(fn, warmup, repeats, inner):
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        for _ in range(inner):
            fn()
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times), times


def bench_train(cfg, backend, batch, repeats, inner):
    trainer = Trainer(cfg, backend, steps_per_epoch=10**6)
    rng = np.random.default_rng(0)
    shape = (batch, cfg["channels"], cfg["image_size"], cfg["image_size"])
    x = Tensor(rng.uniform(-1, 1, shape).astype(np.float32))
    t_compile = time.perf_counter()
    trainer.train_step(x)
    t_compile = time.perf_counter() - t_compile
    med, _ = timed(lambda: trainer.train_step(x), 1, repeats, inner)
    return batch / med, t_compile


def bench_sample(cfg, batch, repeats, inner):
    model = create_model(cfg)
    model.set_train(False)
    eps_fn = make_eps_fn(model)
    rng = np.random.default_rng(0)
    x = Tensor(rng.standard_normal((batch, cfg["channels"], cfg["image_size"], cfg["image_size"]), np.float32))
    t = Tensor(np.full((batch,), cfg["timesteps"] // 2, np.int32))
    med, _ = timed(lambda: eps_fn(x, t).asnumpy(), 1, repeats, inner)
    return batch / med


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="configs/quick.yaml")
    parser.add_argument("--batch", type=int, default=None, help="training batch (default: config)")
    parser.add_argument("--sample-batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--inner", type=int, default=3, help="steps per timing")
    parser.add_argument("--skip-sample", action="store_true")
    parser.add_argument("overrides", nargs="*")
    args = parser.parse_args()
    cfg = load_config(args.config, args.overrides)
    backend = setup_device(cfg["device"], cfg["mode"], seed=0)
    batch = args.batch or cfg["batch_size"]
    model = create_model(cfg)
    n_params = sum(p.size for p in model.trainable_params())
    print(f"config {args.config} ({' '.join(args.overrides)}): {n_params / 1e6:.2f} M params, backend {backend}")
    img_s, compile_s = bench_train(cfg, backend, batch, args.repeats, args.inner)
    print(f"train: {img_s:.1f} img/s at batch {batch} (first step incl. compile {compile_s:.1f} s)")
    if not args.skip_sample:
        rate = bench_sample(cfg, args.sample_batch, args.repeats, args.inner)
        print(f"sample: {rate:.1f} img-steps/s at batch {args.sample_batch}")


if __name__ == "__main__":
    main()

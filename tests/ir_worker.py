"""Run by tests/test_ir_guard.py: compile graphs with MindSpore's IR dump on, list the kernel graphs of each.

    python tests/ir_worker.py OUT_DIR CASE [CASE ...]

The caller sets the dump variables (MS_DEV_SAVE_GRAPHS, MS_DEV_SAVE_GRAPHS_PATH, MS_DEV_DUMP_IR_PASSES) and
DDPM_MS_FAST_KERNELS before this process starts. CASE is ARCH:DTYPE (``tutorial:float32``, ``ddpm:float16``):
one train step of a Trainer of tests/configs/tiny.yaml at 8x8, batch 2; or ``probe``: a tiny Cell that computes
in float64 and int64, which the checker must flag. OUT_DIR/manifest.json gets {"kernels": status line,
"kernels_enabled": bool, "cases": {CASE: [the kernel graph dumps written while it ran]}, "seconds": {CASE: s}}.
"""

import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddpm_ms  # noqa: E402,F401  (first: it configures oneDNN before MindSpore loads)
import mindspore as ms  # noqa: E402
import numpy as np  # noqa: E402
from mindspore import Tensor, nn  # noqa: E402

from ddpm_ms.models import kernels  # noqa: E402
from ddpm_ms.config import load_config  # noqa: E402
from ddpm_ms.utils.device import setup_device  # noqa: E402
from ddpm_ms.training.trainer import Trainer  # noqa: E402

TINY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs", "tiny.yaml")
SIZE, BATCH = 8, 2
ARCH_OVERRIDES = {
    "tutorial": [],
    # the paper's U-Net: one residual block per level, attention at 4x4 and in the middle
    "ddpm": ["arch=ddpm", "layers_per_block=1", "attn_levels=[1]"],
}


class Float64Probe(nn.Cell):
    """What the guard must catch: a float64 tensor and a computed (non-scalar) int64 tensor."""

    def construct(self, x):
        wide = x.astype(ms.float64) * 2
        count = (x > 0).astype(ms.int64) * 3
        return wide.astype(ms.float32) + count.astype(ms.float32)


def dumped():
    root = os.environ["MS_DEV_SAVE_GRAPHS_PATH"]
    found = set()
    for top, _, files in os.walk(root):
        found.update(os.path.join(top, f) for f in files if f.startswith("graph_build_") and f.endswith(".ir"))
    return found


def run_case(case):
    if case == "probe":
        Float64Probe()(Tensor(np.linspace(-1, 1, 6, dtype=np.float32).reshape(2, 3)))
        return
    arch, dtype = case.split(":")
    cfg = load_config(TINY, [f"image_size={SIZE}", f"batch_size={BATCH}", f"dtype={dtype}", *ARCH_OVERRIDES[arch]])
    trainer = Trainer(cfg, "CPU", steps_per_epoch=10)
    x = np.random.default_rng(0).uniform(-1, 1, (BATCH, cfg["channels"], SIZE, SIZE)).astype(np.float32)
    trainer.train_step(Tensor(x))  # compiles every graph of a step (whatever cells it is made of)


def main(out, cases):
    setup_device("CPU", "graph", quiet=True)
    manifest = {"kernels": kernels.status(), "kernels_enabled": kernels.enabled(), "cases": {}, "seconds": {}}
    for case in cases:
        before, start = dumped(), time.perf_counter()
        run_case(case)
        manifest["cases"][case] = sorted(dumped() - before)
        manifest["seconds"][case] = round(time.perf_counter() - start, 1)
    with open(os.path.join(out, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])

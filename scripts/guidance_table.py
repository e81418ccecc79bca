"""Class accuracy and FD of a class-conditional checkpoint for several guidance weights w.

    python scripts/guidance_table.py --checkpoint runs/fashion_mnist_cond [--per-class 50]
        [--weights 0,1,3,5] [--sampler dpm-solver++ --steps 20] [--out-dir DIR]

For each w, generates ``per-class`` images of every class (the same seeds for every w),
classifies them with the evaluation classifier (ddpm_ms.evaluation.classifier) and reports the share
classified as the requested class (overall and per class), plus FD against the real test
split beside the real-data floor at the same N. Writes guidance.md and guidance.json.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

import ddpm_ms  # noqa: E402,F401  (caps oneDNN before MindSpore loads)
from ddpm_ms.command_line import run_cli  # noqa: E402
from ddpm_ms.utils.errors import UserError  # noqa: E402

CLASS_NAMES = ("T-shirt", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True)
    parser.add_argument("--per-class", type=int, default=50)
    parser.add_argument("--weights", default="0,1,3,5")
    parser.add_argument("--sampler", default="dpm-solver++")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default=None)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args(argv)

    from ddpm_ms import data
    from ddpm_ms.evaluation.classifier import extract, load_or_train_classifier
    from ddpm_ms.evaluation.metrics import RealReference, evaluate_images
    from ddpm_ms.pipeline import load
    from ddpm_ms.diffusion.generation import generate

    weights = [float(w) for w in args.weights.split(",")]
    loaded = load(args.checkpoint, device=args.device)
    model, sched, cfg, dtype, path = loaded.model, loaded.sched, loaded.cfg, loaded.dtype, loaded.path
    if cfg["num_classes"] is None:
        raise UserError(f"{path} is an unconditional model; this table needs a class-conditional checkpoint")
    dataset = cfg.get("dataset", "fashion_mnist")
    data_dir = data.locate(dataset, cfg.get("data_dir"))
    classifier, info = load_or_train_classifier(data_dir=data_dir, dataset=dataset)
    reference = RealReference.build(classifier, data_dir, dataset)
    classes = np.repeat(np.arange(cfg["num_classes"]), args.per_class)

    rows = []
    for w in weights:
        t0 = time.perf_counter()
        images, _ = generate(model, sched, cfg, len(classes), sampler=args.sampler, steps=args.steps,
                             seed=args.seed, dtype=dtype, classes=classes.tolist(), guidance=w, progress=False)
        _, probs = extract(classifier, images)
        hit = probs.argmax(axis=1) == classes
        result = evaluate_images(images, classifier, reference)
        rows.append({"w": w, "accuracy": float(hit.mean()),
                     "per_class": [float(hit[classes == c].mean()) for c in range(cfg["num_classes"])],
                     "fd": result["fd"], "fd_floor": result["fd_floor"], "is": result["is"],
                     "precision": result["precision"], "recall": result["recall"],
                     "seconds": time.perf_counter() - t0})
        print(f"w={w:g}: class accuracy {hit.mean():.3f}, FD {result['fd']:.2f} (floor {result['fd_floor']:.2f})",
              file=sys.stderr, flush=True)

    names = CLASS_NAMES if cfg["num_classes"] == 10 else [str(c) for c in range(cfg["num_classes"])]
    lines = [f"{len(classes)} samples per w ({args.per_class} per class), {args.sampler} {args.steps} steps, "
             f"classifier test accuracy {info['test_accuracy']:.4f}", "",
             "| w | class accuracy | FD (floor) | IS | precision | recall | " + " | ".join(names) + " |",
             "|---" * (6 + len(names)) + "|"]
    for r in rows:
        lines.append(f"| {r['w']:g} | {r['accuracy']:.3f} | {r['fd']:.2f} ({r['fd_floor']:.2f}) | {r['is']:.2f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | "
                     + " | ".join(f"{a:.2f}" for a in r["per_class"]) + " |")
    table = "\n".join(lines)
    print(table)
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(path))), "guidance")
    os.makedirs(out_dir, exist_ok=True)
    with open(os.path.join(out_dir, "guidance.md"), "w") as f:
        f.write(table + "\n")
    with open(os.path.join(out_dir, "guidance.json"), "w") as f:
        json.dump({"checkpoint": path, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    run_cli(main)

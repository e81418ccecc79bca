"""Sample quality against the number of sampling steps, for one checkpoint.

    python scripts/quality_vs_steps.py --checkpoint runs/quick [--num 1000] \
        [--samplers ddpm,ddim,dpm-solver++] [--steps 5,10,20,50,100] [--out-dir DIR]

DDPM is run as the full ancestral chain (all T steps; add ``--ddpm-steps 100,...`` for respaced
DDPM too); DDIM (eta from --eta, default 0) and DPM-Solver++ at every count of ``--steps``.
Each setting generates ``--num`` images from the same seed and is scored with
:func:`ddpm_ms.evaluation.metrics.evaluate_images` against the Fashion-MNIST test split. Writes to
``--out-dir`` (default ``<run dir>/quality_vs_steps``):

- ``quality_vs_steps.md``   the Markdown table (also printed)
- ``quality_vs_steps.json`` every number
- ``quality_vs_steps.png``  FD against steps, with the DDPM full chain and the real-data floor

Cost: samples x steps network evaluations per row (the DDPM full chain with T = 1000 costs as
much as 10 rows of 100 steps). A quick look: ``--num 200 --samplers ddim,dpm-solver++ --steps 5,20``.
"""

import argparse
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import ddpm_ms  # noqa: E402,F401  (caps oneDNN before MindSpore loads)
from ddpm_ms.utils import fileio  # noqa: E402
from ddpm_ms.command_line import run_cli  # noqa: E402
from ddpm_ms.utils.errors import UserError  # noqa: E402
from ddpm_ms.diffusion.samplers import SAMPLERS  # noqa: E402


def int_list(text):
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers, got {text!r}")
    return values


def name_list(text):
    names = [v.strip() for v in text.split(",") if v.strip()]
    bad = [n for n in names if n not in SAMPLERS]
    if bad or not names:
        raise argparse.ArgumentTypeError(f"unknown sampler(s) {bad or text!r}; choose from {', '.join(SAMPLERS)}")
    return names


def settings(samplers, steps, ddpm_steps, timesteps):
    """[(sampler, steps)] in table order; DDPM's full chain is steps == timesteps."""
    out = []
    for sampler in samplers:
        counts = sorted(set([timesteps] + list(ddpm_steps))) if sampler == "ddpm" else sorted(set(steps))
        for k in counts:
            if k > timesteps:
                raise UserError(f"{sampler} with {k} steps: the model has only {timesteps} timesteps")
            out.append((sampler, k))
    return out


def markdown_table(rows, num, info, checkpoint):
    lines = [f"Checkpoint `{checkpoint}`, {num} samples per row, classifier `{info.get('key')}` "
             f"(test accuracy {info.get('test_accuracy', float('nan')):.2%}). "
             f"Real-data floor (FD of {num} real train images vs the test split): "
             f"{rows[0]['fd_floor']:.3f}.",
             "",
             "| sampler | steps | FD | FD floor | IS | precision | recall | sampling s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        steps = f"{r['steps']} (full)" if r["sampler"] == "ddpm" and r["steps"] == r["timesteps"] else str(r["steps"])
        lines.append(f"| {r['sampler']} | {steps} | {r['fd']:.3f} | {r['fd_floor']:.3f} | {r['is']:.3f} | "
                     f"{r['precision']:.3f} | {r['recall']:.3f} | {r['sampling_seconds']:.1f} |")
    return "\n".join(lines) + "\n"


def plot(rows, path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ticks = set()
    for sampler in dict.fromkeys(r["sampler"] for r in rows):
        pts = [(r["steps"], r["fd"]) for r in rows if r["sampler"] == sampler]
        if sampler == "ddpm" and len(pts) == 1:
            ax.axhline(pts[0][1], color="C3", linestyle=":", label=f"DDPM, full chain ({pts[0][0]} steps)")
        else:
            xs, ys = zip(*pts)
            ticks.update(xs)
            ax.plot(xs, ys, marker="o", label=sampler.upper() if sampler != "dpm-solver++" else "DPM-Solver++")
    ax.axhline(rows[0]["fd_floor"], color="gray", linestyle="--", label="real data (floor)")
    from matplotlib.ticker import LogLocator, NullFormatter, ScalarFormatter

    ax.set_xscale("log")
    ax.set_yscale("log")
    if ticks:
        ax.set_xticks(sorted(ticks))
    ax.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    for axis in (ax.xaxis, ax.yaxis):
        axis.set_major_formatter(ScalarFormatter())
        axis.set_minor_formatter(NullFormatter())
    ax.set_xlabel("sampling steps (network evaluations)")
    ax.set_ylabel("FD (classifier features)")
    ax.set_title(f"Sample quality vs steps ({rows[0]['num_samples']} samples)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fileio.atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"), "figure")
    plt.close(fig)
    return path


def main(argv=None):
    parser = argparse.ArgumentParser(prog="quality_vs_steps", description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="checkpoint file or run directory")
    parser.add_argument("--num", type=int, default=1000, help="samples per setting")
    parser.add_argument("--samplers", type=name_list, default=list(SAMPLERS), help="comma-separated")
    parser.add_argument("--steps", type=int_list, default=[5, 10, 20, 50, 100], help="DDIM / DPM-Solver++ step counts")
    parser.add_argument("--ddpm-steps", type=int_list, default=[],
                        help="respaced DDPM step counts (besides the full chain)")
    parser.add_argument("--eta", type=float, default=0.0, help="DDIM eta")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--no-ema", action="store_true")
    parser.add_argument("--out-dir", default=None, help="default: <run dir>/quality_vs_steps")
    parser.add_argument("--data-dir", default=None)
    parser.add_argument("--cache-dir", default=None, help="classifier cache")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--no-progress", action="store_true")
    args = parser.parse_args(argv)
    if args.num < 2:
        raise UserError(f"--num must be >= 2, got {args.num}")

    from ddpm_ms.evaluate import classifier_record, write_json, write_text
    from ddpm_ms.evaluation.metrics import prepare_reference
    from ddpm_ms.evaluation.metrics import evaluate_images, summary_line
    from ddpm_ms.pipeline import load
    from ddpm_ms.diffusion.generation import generate

    loaded = load(args.checkpoint, device=args.device, use_ema=not args.no_ema)
    net_model, sched, cfg, dtype, path = loaded.model, loaded.sched, loaded.cfg, loaded.dtype, loaded.path
    run_dir = args.checkpoint if os.path.isdir(args.checkpoint) else os.path.dirname(os.path.abspath(path))
    out_dir = args.out_dir or os.path.join(run_dir, "quality_vs_steps")
    todo = settings(args.samplers, args.steps, args.ddpm_steps, sched.num_timesteps)
    net, info, reference = prepare_reference(args.data_dir, args.cache_dir, progress=not args.no_progress,
                                             dataset=cfg.get("dataset", "fashion_mnist"))

    rows = []
    for sampler, steps in todo:
        t0 = time.time()
        images, _ = generate(net_model, sched, cfg, args.num, sampler=sampler, steps=steps, eta=args.eta,
                             seed=args.seed, dtype=dtype, progress=not args.no_progress)
        seconds = time.time() - t0
        result = evaluate_images(images, net, reference, seed=args.seed)
        row = {"sampler": sampler, "steps": steps, "timesteps": sched.num_timesteps, "sampling_seconds": seconds,
               **result}
        rows.append(row)
        print(f"{sampler:>13} {steps:>5} steps: {summary_line(result)}  [{seconds:.0f} s]", file=sys.stderr,
              flush=True)

    table = markdown_table(rows, args.num, info, path)
    print(table)
    os.makedirs(out_dir, exist_ok=True)
    write_text(os.path.join(out_dir, "quality_vs_steps.md"), table)
    write_json(os.path.join(out_dir, "quality_vs_steps.json"),
               {"checkpoint": os.path.abspath(path), "num": args.num, "seed": args.seed, "eta": args.eta,
                "ema": not args.no_ema, "classifier": classifier_record(info), "rows": rows})
    plot(rows, os.path.join(out_dir, "quality_vs_steps.png"))
    print(f"wrote {out_dir}/quality_vs_steps.md, .json and .png", file=sys.stderr)
    return rows


if __name__ == "__main__":
    run_cli(main)

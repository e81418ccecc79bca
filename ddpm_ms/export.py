"""Export a trained denoiser to MindIR (MindSpore, MindSpore Lite) or ONNX (onnxruntime, ...).

    python -m ddpm_ms.export --checkpoint runs/quick --format onnx --batch 16 --out quick.onnx [--no-ema]

The file holds one graph, the noise predictor, for a fixed batch size and image shape:

* unconditional models: ``model_output = net(x [N, C, H, W] float32, t [N] int32)``;
* class-conditional models: ``net(x, t, y [N] int32, guidance [] float32)`` makes both
  predictions in one call of batch 2N (labels y and the null class) and returns the
  classifier-free guided one, (1 + w) eps(x, y) - w eps(x, null) (as ``ddpm_ms.diffusion.generation.guided_eps_fn``);
* self-conditioned models (``self_condition``) take one more input, last: ``x_self_cond [N, C, H, W]
  float32``, the previous x_0 prediction (zeros at the first call; both halves of a guided batch get it).

It is built on MindSpore's built-in ops (the C++ CPU kernels are custom ops that neither MindIR
consumers nor ONNX can run); for ONNX, GroupNorm and the exact GELU are written in the export
forms of ``ddpm_ms.interop.onnx_forms``. ``FILE.json`` beside it records what a runtime needs: the
betas, the prediction type, image shape, classes, batch size, input/output names and the
ddpm_ms and MindSpore versions. ``ddpm-sample --exported FILE`` samples from it.
"""

import argparse
import json
import os
import sys
import time

import numpy as np
import mindspore as ms
from mindspore import Tensor, nn, ops

from ddpm_ms.utils import fileio
from ddpm_ms.command_line import add_checkpoint_arg, add_device_args, add_weights_arg, run_cli
from ddpm_ms.diffusion.generation import guided_output
from ddpm_ms.utils.errors import UserError
from ddpm_ms.interop.exported import (  # the format, defined by its reader
    FORMAT_NAME,
    FORMAT_VERSION,
    FORMATS,
    metadata_path,
)

OUTPUT_NAME = "model_output"


def input_spec(cfg, batch):
    """[{name, shape, dtype}] of the exported graph's inputs, in call order."""
    shape = [batch, cfg["channels"], cfg["image_size"], cfg["image_size"]]
    spec = [{"name": "x", "shape": shape, "dtype": "float32"}, {"name": "t", "shape": [batch], "dtype": "int32"}]
    if cfg["num_classes"] is not None:
        spec += [{"name": "y", "shape": [batch], "dtype": "int32"},
                 {"name": "guidance", "shape": [], "dtype": "float32"}]
    if cfg.get("self_condition"):
        spec.append({"name": "x_self_cond", "shape": shape, "dtype": "float32"})
    return spec


class GuidedDenoiser(nn.Cell):
    """(x, t, y, guidance) -> the classifier-free guided prediction, both halves in one model call.

    Ho & Salimans 2022, Eq. 6, on a batch of 2N: labels y for the first N, the null class
    (index ``num_classes``) for the second N.
    """

    def __init__(self, model, batch, num_classes):
        super().__init__()
        self.model = model
        self.null = Tensor(np.full(batch, num_classes, np.int32))

    def construct(self, x, t, y, guidance, x_self_cond=None):
        return guided_output(self.model, x, t, ops.concat((y, self.null)), guidance, x_self_cond)


class SelfConditionedDenoiser(nn.Cell):
    """(x, t, x_self_cond) -> the prediction of an unconditional self-conditioned model."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def construct(self, x, t, x_self_cond):
        return self.model(x, t, None, x_self_cond)


def denoiser(model, cfg, batch):
    """The Cell to export: ``model`` itself, or the guided wrapper for class-conditional models
    (or the wrapper that takes x_self_cond third, for unconditional self-conditioned ones)."""
    if cfg["num_classes"] is None:
        return SelfConditionedDenoiser(model) if cfg.get("self_condition") else model
    return GuidedDenoiser(model, batch, cfg["num_classes"])


def example_inputs(spec):
    return [Tensor(np.zeros(s["shape"], s["dtype"]), getattr(ms, s["dtype"])) for s in spec]


def metadata(cfg, sched, fmt, file_name, batch, spec, weights, checkpoint, step):
    from ddpm_ms import __version__

    out_shape = [batch, cfg["channels"], cfg["image_size"], cfg["image_size"]]
    return {
        "format": FORMAT_NAME,
        "format_version": FORMAT_VERSION,
        "file": file_name,
        "file_format": fmt,
        "batch_size": batch,
        "image_shape": out_shape[1:],
        "inputs": spec,
        "outputs": [{"name": OUTPUT_NAME, "shape": out_shape, "dtype": "float32"}],
        "prediction_type": cfg.get("prediction_type", "eps"),
        "num_classes": cfg["num_classes"],
        "null_class": cfg["num_classes"],
        "self_condition": bool(cfg.get("self_condition", False)),
        "timesteps": sched.num_timesteps,
        "betas": sched.betas.tolist(),
        "weights": weights,
        "checkpoint": os.path.abspath(checkpoint),
        "step": step,
        "ddpm_ms_version": __version__,
        "mindspore_version": ms.__version__,
        "config": cfg,
    }


def _write_json(path, data):
    fileio.write_text(path, json.dumps(data, indent=1) + "\n", "export metadata")


def check_request(fmt, batch, out):
    if fmt not in FORMATS:
        raise UserError(f"--format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if batch < 1:
        raise UserError(f"--batch must be >= 1, got {batch}")
    if not out.endswith(FORMATS[fmt]):
        raise UserError(f"--out must end with {FORMATS[fmt]} for --format {fmt}, got {out}")
    directory = os.path.dirname(os.path.abspath(out))
    if not os.path.isdir(directory):
        raise UserError(f"the directory of --out, {directory}, does not exist")


def export(checkpoint, fmt, batch, out, use_ema=True):
    """Write the denoiser of ``checkpoint`` to ``out`` (+ ``out.json``) -> the metadata dict.

    Both files are written under temporary names and renamed into place, so a failed export
    leaves nothing behind and never a half-written file under ``out``.
    """
    from ddpm_ms.utils import checkpoint as ckpt
    from ddpm_ms.interop.onnx_forms import to_export_forms
    from ddpm_ms.pipeline import load

    check_request(fmt, batch, out)
    path = ckpt.resolve_checkpoint(checkpoint)
    model, sched, cfg = load(path, use_ema=use_ema, dtype="float32", fast_kernels=False)[:3]
    if fmt == "onnx" and cfg.get("arch") == "ddpm" and cfg.get("downsample_padding") == 0:
        # its bottom/right-only padding (PadV3, or an asymmetric conv pad) does not survive MindSpore's ONNX exporter
        raise UserError("ONNX export of arch: ddpm models with downsample_padding: 0 (the DDPM checkpoints) is not "
                        "supported by MindSpore 2.10's ONNX exporter; use --format mindir")
    groups, meta = ckpt.load(path)
    weights = "ema" if use_ema and groups["ema"] else "model"
    if fmt == "onnx":
        to_export_forms(model)
    spec = input_spec(cfg, batch)
    net = denoiser(model, cfg, batch)
    net.set_train(False)
    info = metadata(cfg, sched, fmt, os.path.basename(out), batch, spec, weights, path, meta.get("step"))

    def write(tmp):  # the model under its temporary name, then the metadata; then fileio renames the model
        if fmt == "onnx":
            ms.onnx.export(net, *example_inputs(spec), file_name=tmp, input_names=[s["name"] for s in spec],
                           output_names=[OUTPUT_NAME])
        else:
            ms.export(net, *example_inputs(spec), file_name=tmp, file_format="MINDIR")
        _write_json(metadata_path(out), info)

    fileio.atomic_write(out, write, "exported model")
    return info


def main(argv=None):
    parser = argparse.ArgumentParser(prog="ddpm-export", description="Export a ddpm_ms denoiser to MindIR or ONNX.")
    add_checkpoint_arg(parser, required=True)
    parser.add_argument("--format", required=True, choices=tuple(FORMATS), help="mindir or onnx")
    parser.add_argument("--batch", type=int, default=64, help="the batch size the graph is built for (default 64)")
    parser.add_argument("--out", required=True, help="output file, ending in .mindir or .onnx")
    add_weights_arg(parser)
    add_device_args(parser, device="CPU")  # the backend to trace on: the file is the same
    args = parser.parse_args(argv)
    check_request(args.format, args.batch, args.out)
    from ddpm_ms.utils.device import setup_device

    setup_device(args.device, args.mode or "graph")
    start = time.perf_counter()
    info = export(args.checkpoint, args.format, args.batch, args.out, use_ema=not args.no_ema)
    size = os.path.getsize(args.out) / 2**20
    print(f"wrote {args.out} ({size:.2f} MB, {info['weights']} weights, batch {args.batch}, "
          f"{time.perf_counter() - start:.1f} s) and {metadata_path(args.out)}", file=sys.stderr)


def console_main():
    run_cli(main)


if __name__ == "__main__":
    console_main()

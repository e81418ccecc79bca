"""Sample from an exported denoiser (``ddpm-export``) instead of a checkpoint.

``load_exported(path)`` reads ``path`` and the JSON beside it and returns an
:class:`ExportedDenoiser`: the schedule and config the samplers need, and the noise predictor
run by MindSpore (MindIR: ``ms.load`` + ``nn.GraphCell``) or by onnxruntime (ONNX). The
samplers are the same as for a checkpoint; only the network call differs
(``ddpm_ms.diffusion.generation.generate`` asks the denoiser for its ``make_eps_fn``).
"""

import json
import os

import numpy as np
import mindspore as ms
from mindspore import Tensor, ops

from ddpm_ms.config import saved_config
from ddpm_ms.diffusion.gaussian import Schedule
from ddpm_ms.utils.errors import UserError

# the exported files (written by ddpm_ms.export): model file + metadata JSON
FORMATS = {"mindir": ".mindir", "onnx": ".onnx"}
FORMAT_NAME = "ddpm_ms-exported-denoiser"
FORMAT_VERSION = 1


def metadata_path(path):
    """The JSON beside an exported file: ``model.onnx`` -> ``model.onnx.json``."""
    return path + ".json"


def read_metadata(path):
    """The JSON of an exported file, checked -> dict (UserError when it is missing or not ours)."""
    if not os.path.isfile(path):
        raise UserError(f"exported model {path} does not exist")
    meta_path = metadata_path(path)
    if not os.path.isfile(meta_path):
        raise UserError(f"{path} has no {os.path.basename(meta_path)} beside it; "
                        "pass a file written by ddpm-export (model file and its JSON)")
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except (OSError, ValueError, UnicodeDecodeError) as e:
        raise UserError(f"{meta_path} is not a ddpm-export JSON file ({type(e).__name__})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise UserError(f"{meta_path} is not a ddpm-export JSON file (no \"format\": \"{FORMAT_NAME}\")")
    if meta.get("format_version") != FORMAT_VERSION:
        raise UserError(f"{meta_path} has format version {meta.get('format_version')}, "
                        f"this ddpm_ms reads version {FORMAT_VERSION}")
    fmt = meta.get("file_format")
    if fmt not in FORMATS or not path.endswith(FORMATS[fmt]):
        raise UserError(f"{path}: its JSON says file_format {fmt!r}, which does not fit the file name")
    return meta


def _mindir_runner(path):
    from mindspore import nn

    try:
        cell = nn.GraphCell(ms.load(path))
    except Exception as e:  # noqa: BLE001 - MindSpore raises RuntimeError/ValueError on bad files
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not a MindIR model MindSpore can load ({reason})") from None
    return lambda *inputs: cell(*inputs)


def _onnx_runner(path, input_names):
    try:
        import onnxruntime as ort
    except ImportError:
        raise UserError("running an ONNX file needs onnxruntime: pip install 'onnxruntime<1.23' "
                        "(or export --format mindir)") from None
    try:
        options = ort.SessionOptions()
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")  # no busy-waiting threads
        session = ort.InferenceSession(path, options, providers=["CPUExecutionProvider"])
    except Exception as e:  # noqa: BLE001 - onnxruntime raises its own exception types
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"{path} is not an ONNX model onnxruntime can load ({reason[:200]})") from None

    def run(*inputs):
        feed = {name: value.asnumpy() for name, value in zip(input_names, inputs)}
        return Tensor(session.run(None, feed)[0])

    return run


class ExportedDenoiser:
    """An exported noise predictor with its schedule and config (``cfg``, ``sched``, ``batch``)."""

    def __init__(self, path):
        meta = read_metadata(path)
        self.path, self.meta = path, meta
        self.cfg = saved_config(meta)
        self.sched = Schedule(np.asarray(meta["betas"], np.float64))
        self.batch = int(meta["batch_size"])
        self.x_shape = tuple(meta["inputs"][0]["shape"])
        self.conditional = meta["num_classes"] is not None
        names = [s["name"] for s in meta["inputs"]]
        self.self_condition = "x_self_cond" in names  # the last input (ddpm_ms.export.input_spec)
        self._run = _mindir_runner(path) if meta["file_format"] == "mindir" else _onnx_runner(path, names)

    def check_shape(self, shape):
        if tuple(shape) != self.x_shape:
            raise UserError(f"{self.path} was exported for x of shape {list(self.x_shape)} (batch {self.batch}), "
                            f"got {list(shape)}; use --num {self.batch} or export again with --batch N")

    def __call__(self, x, t, y=None, guidance=0.0, x_self_cond=None):
        """The graph's output for Tensors x [N, C, H, W], t [N] (and labels y, weight w if conditional;
        the self-conditioning input, None: zeros, if self-conditioned)."""
        self.check_shape(x.shape)
        inputs = [x.astype(ms.float32), t.astype(ms.int32)]
        if self.conditional:
            if y is None:
                raise UserError(f"{self.path} is class-conditional: it needs class labels")
            inputs += [Tensor(np.asarray(y, np.int32)), Tensor(np.float32(guidance))]
        if self.self_condition:
            inputs.append(ops.zeros_like(inputs[0]) if x_self_cond is None else x_self_cond.astype(ms.float32))
        return self._run(*inputs)

    def make_eps_fn(self, num, labels=None, guidance=0.0):
        """eps(x, t) for the samplers, for ``num`` images; labels [num] and the guidance weight w
        for conditional models; eps(x, t, x_self_cond=...) for self-conditioned ones (marked
        ``self_condition``, as ``ddpm_ms.diffusion.samplers.predictor`` expects). Raises UserError at
        once if num is not the exported batch size."""
        self.check_shape((num,) + self.x_shape[1:])
        y = np.asarray(labels, np.int32) if self.conditional else None
        if self.self_condition:
            def eps_fn(x, t, x_self_cond=None):
                return self(x, t, y, guidance, x_self_cond)

            eps_fn.self_condition = True
            return eps_fn
        if self.conditional:
            return lambda x, t: self(x, t, y, guidance)
        return lambda x, t: self(x, t)


def load_exported(path):
    return ExportedDenoiser(path)

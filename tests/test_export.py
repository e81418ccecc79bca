"""ddpm-export and sampling from the exported file: MindIR (GraphCell) and ONNX (onnxruntime).

Three tiny models, one per kind of network: a ResNet U-Net (SiLU, GroupNorm(4), full attention in
the middle; the quick config's kind), a ConvNeXt U-Net with exact GELU, GroupNorm(1) and linear
attention (the tutorial's kind) and a class-conditional ResNet U-Net exported with guidance in
the graph. Each is exported once per format (module fixture) and compared with its checkpoint
model on MindSpore's built-in ops.
"""

import ddpm_ms  # noqa: F401

import json
import math
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms import export as export_mod
from ddpm_ms import sample as sample_mod
from ddpm_ms.config import load_config
from ddpm_ms.utils.errors import UserError
from ddpm_ms.interop.exported import load_exported
from ddpm_ms.interop.onnx_forms import ExportGELU, erf
from ddpm_ms.factory import create_model
from ddpm_ms.diffusion.generation import generate, guided_eps_fn, make_eps_fn
from ddpm_ms.pipeline import load
from tiny_config import TINY

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BATCH = 4
GUIDANCE = 2.5
MODELS = {
    "resnet": {},
    "convnext": {"block_type": "convnext", "act": "gelu", "attn_levels": [1], "mid_attn": True},
    "conditional": {"num_classes": 3},
}
FORMATS = ("mindir", "onnx")
try:
    import onnxruntime  # noqa: F401
    ORT_MISSING = None
except ImportError as e:
    ORT_MISSING = f"onnxruntime is not installed ({e}); pip install 'onnxruntime<1.23'"

try:
    from cli_checks import one_line_error
except ImportError:  # tests/ imported as a package
    from tests.cli_checks import one_line_error



def needs_runtime(fmt):
    if fmt == "onnx" and ORT_MISSING:
        pytest.skip(ORT_MISSING)


pytestmark = pytest.mark.usefixtures("graph_mode_module")


def save_random_checkpoint(path, cfg, seed):
    """An untrained model's weights as "model" and other weights (x 1.01 + 0.01) as "ema"."""
    ms.set_seed(seed)
    params = ckpt.named_params(create_model(cfg, fast_kernels=False))
    ema = {k: v.asnumpy() * np.float32(1.01) + np.float32(0.01) for k, v in params.items()}
    return ckpt.save(path, {"model": params, "ema": ema}, {"config": cfg, "step": 12})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{kind: {"ckpt", "ref" (built-in ops, EMA), "sched", "cfg", "mindir"/"onnx" (paths), "net"}}."""
    tmp = tmp_path_factory.mktemp("export")
    out = {}
    for i, (kind, over) in enumerate(MODELS.items()):
        cfg = load_config(TINY, over)
        path = save_random_checkpoint(str(tmp / f"{kind}.ckpt"), cfg, seed=i)
        ref, sched, cfg = load(path, fast_kernels=False)[:3]
        entry = {"ckpt": path, "ref": ref, "sched": sched, "cfg": cfg}
        for fmt in FORMATS:
            entry[fmt] = str(tmp / f"{kind}.{fmt}")
            export_mod.main(["--checkpoint", path, "--format", fmt, "--batch", str(BATCH), "--out", entry[fmt]])
        # loaded once: a GraphCell compiles on its first call
        entry["net"] = {fmt: load_exported(entry[fmt]) for fmt in FORMATS if fmt == "mindir" or not ORT_MISSING}
        out[kind] = entry
    return out


def random_inputs(cfg, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((BATCH, cfg["channels"], cfg["image_size"], cfg["image_size"]), dtype=np.float32)
    t = np.array([0, 6, 13, cfg["timesteps"] - 1], np.int32)  # several timesteps, one per sample
    labels = None if cfg["num_classes"] is None else np.array([0, 2, 1, 2])
    return Tensor(x), Tensor(t), labels


def reference_eps(entry, labels):
    fn = make_eps_fn(entry["ref"])
    return fn if labels is None else guided_eps_fn(fn, labels, GUIDANCE, entry["cfg"]["num_classes"])


def test_models_without_kernels_hold_no_custom_op():
    cfg = load_config(TINY, MODELS["convnext"])
    built_in = create_model(cfg, fast_kernels=False)
    assert all(getattr(c, "_fast", None) is None for _, c in built_in.cells_and_names())
    from ddpm_ms.models import kernels
    if kernels.enabled():  # the switch is what turns them off, not this machine
        assert any(getattr(c, "_fast", None) is not None for _, c in create_model(cfg).cells_and_names())


def test_polynomial_erf_and_gelu_are_exact_to_float32():
    """Multiplications and additions only: op by op (PyNative) rounds as the exported graph does."""
    x = np.linspace(-9, 9, 400_001).astype(np.float32)
    want = np.array([math.erf(v) for v in x.astype(np.float64)])
    ms.set_context(mode=ms.PYNATIVE_MODE)
    try:
        got = erf(Tensor(x)).asnumpy()
        gelu = ExportGELU()(Tensor(x)).asnumpy()
    finally:
        ms.set_context(mode=ms.GRAPH_MODE)
    assert np.abs(got - want).max() < 1e-7
    exact = 0.5 * x.astype(np.float64) * (1.0 + np.array([math.erf(v / math.sqrt(2.0)) for v in x.astype(np.float64)]))
    assert np.abs(gelu - exact).max() < 1e-6  # |x| <= 9 scales the erf error by x / 2


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_exported_output_equals_checkpoint_model(models, kind, fmt):
    needs_runtime(fmt)
    entry = models[kind]
    net = entry["net"][fmt]
    for seed in (0, 1):
        x, t, labels = random_inputs(entry["cfg"], seed)
        want = reference_eps(entry, labels)(x, t).asnumpy()
        got = net.make_eps_fn(BATCH, labels, GUIDANCE)(x, t).asnumpy()
        assert got.shape == want.shape
        assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()
        assert np.linalg.norm(got - want) <= 1e-5 * np.linalg.norm(want)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("kind", list(MODELS))
def test_ddim_samples_from_exported_file_match_checkpoint(models, kind, fmt):
    needs_runtime(fmt)
    entry = models[kind]
    net = entry["net"][fmt]
    _, _, labels = random_inputs(entry["cfg"])
    kw = dict(sampler="ddim", steps=5, eta=0.0, seed=7, progress=False, classes=labels,
              guidance=None if labels is None else GUIDANCE)
    want, _ = generate(entry["ref"], entry["sched"], entry["cfg"], BATCH, **kw)
    got, _ = generate(net, net.sched, net.cfg, BATCH, **kw)
    assert np.abs(want).max() > 0.1
    assert np.abs(got - want).max() < 1e-4


@pytest.mark.parametrize("sampler,eta", [("ddpm", None), ("ddim", 0.5), ("dpm-solver++", None)])
def test_every_sampler_runs_on_the_exported_graph(models, sampler, eta):
    fmt = "onnx" if not ORT_MISSING else "mindir"  # onnxruntime needs no graph compilation
    entry = models["conditional"]
    net = entry["net"][fmt]
    kw = dict(sampler=sampler, steps=4, eta=eta, seed=3, progress=False, classes=[1, 1, 0, 2], guidance=1.0)
    want, _ = generate(entry["ref"], entry["sched"], entry["cfg"], BATCH, **kw)
    got, frames = generate(net, net.sched, net.cfg, BATCH, gif_frames=2, **kw)
    assert np.abs(got - want).max() < 1e-4 and len(frames) == 2


def test_metadata_records_what_a_runtime_needs(models):
    entry = models["conditional"]
    meta = json.load(open(entry["onnx"] + ".json"))
    assert meta["betas"] == entry["sched"].betas.tolist() and meta["timesteps"] == 20
    assert meta["batch_size"] == BATCH and meta["image_shape"] == [1, 28, 28]
    assert meta["num_classes"] == 3 and meta["null_class"] == 3 and meta["prediction_type"] == "eps"
    assert [s["name"] for s in meta["inputs"]] == ["x", "t", "y", "guidance"]
    assert meta["inputs"][3]["shape"] == [] and meta["outputs"][0]["shape"] == [BATCH, 1, 28, 28]
    assert meta["weights"] == "ema" and meta["step"] == 12
    assert meta["mindspore_version"] == ms.__version__ and meta["ddpm_ms_version"] == ddpm_ms.__version__
    if not ORT_MISSING:
        import onnxruntime as ort
        session = ort.InferenceSession(entry["onnx"], providers=["CPUExecutionProvider"])
        assert [(i.name, i.shape) for i in session.get_inputs()] == [(s["name"], s["shape"]) for s in meta["inputs"]]
        assert [o.name for o in session.get_outputs()] == ["model_output"]
    assert not [f for f in os.listdir(os.path.dirname(entry["onnx"])) if f.startswith(".tmp")]


def readme_onnxruntime_example():
    with open(os.path.join(ROOT, "docs", "interop.md")) as f:
        blocks = re.findall(r"```python\n(.*?)```", f.read(), re.S)
    found = [b for b in blocks if "onnxruntime as ort" in b]
    assert len(found) == 1, "docs/interop.md's plain-onnxruntime example is missing"
    return found[0]


def test_readme_onnxruntime_example_runs_and_matches_ddpm_ms(models, tmp_path, monkeypatch):
    if ORT_MISSING:
        pytest.skip(ORT_MISSING)
    entry = models["resnet"]
    shutil.copy(entry["onnx"], tmp_path / "model.onnx")
    shutil.copy(entry["onnx"] + ".json", tmp_path / "model.onnx.json")
    monkeypatch.chdir(tmp_path)
    scope = {}
    exec(readme_onnxruntime_example(), scope)  # noqa: S102 - the docs' own example
    net = entry["net"]["onnx"]
    want, _ = generate(net, net.sched, net.cfg, BATCH, sampler="ddim", steps=min(50, 20), eta=0.0, seed=0,
                       progress=False)
    assert scope["x"].shape == want.shape and np.abs(scope["x"] - want).max() < 1e-4
    assert scope["images"].dtype == np.uint8


def test_sample_and_gif_commands_with_exported_file(models, tmp_path):
    fmt = "onnx" if not ORT_MISSING else "mindir"
    path = models["conditional"][fmt]
    env = dict(os.environ, PYTHONPATH=ROOT)
    cmd = [sys.executable, "-c", "from ddpm_ms.sample import console_main; console_main()"]
    proc = subprocess.run(cmd + ["--exported", path, "--classes", "2,0,1,1", "--guidance", "1.5", "--sampler",
                                 "dpm-solver++", "--steps", "4", "--seed", "5", "--out", str(tmp_path),
                                 "--no-progress"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    images = np.load(tmp_path / "samples_dpm-solver++_4_seed5_w1.5.npy")
    net = models["conditional"]["net"][fmt]
    want, _ = generate(net, net.sched, net.cfg, BATCH, sampler="dpm-solver++", steps=4, seed=5, progress=False,
                       classes=[2, 0, 1, 1], guidance=1.5)
    np.testing.assert_array_equal(images, want)
    proc = subprocess.run(cmd + ["--exported", path, "--num", "3", "--no-progress"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0, proc.stderr
    assert proc.stderr.startswith("error: ") and "batch 4" in proc.stderr
    from ddpm_ms import gif
    out = tmp_path / "d.gif"
    gif.main(["--exported", path, "--num", "4", "--steps", "3", "--frames", "2", "--out", str(out), "--no-progress"])
    assert out.stat().st_size > 0


def test_export_errors_write_nothing(models, tmp_path, capsys):
    path = models["resnet"]["ckpt"]
    cases = [
        (["--format", "onnx", "--out", str(tmp_path / "m.mindir")], "must end with .onnx"),
        (["--format", "mindir", "--batch", "0", "--out", str(tmp_path / "m.mindir")], "--batch must be >= 1"),
        (["--format", "mindir", "--out", str(tmp_path / "no" / "m.mindir")], "does not exist"),
    ]
    for argv, message in cases:
        assert message in one_line_error(export_mod.main, ["--checkpoint", path] + argv, capsys)
    assert "does not exist" in one_line_error(export_mod.main, ["--checkpoint", str(tmp_path / "none.ckpt"), "--format",
                                                           "onnx", "--out", str(tmp_path / "m.onnx")], capsys)
    assert os.listdir(tmp_path) == []


def test_exported_file_errors(models, tmp_path, capsys, monkeypatch):
    def sample_error(path, *extra):
        argv = ["--exported", str(path), "--no-progress", "--out", str(tmp_path)] + list(extra)
        return one_line_error(sample_mod.main, argv, capsys)

    entry = models["resnet"]
    assert "no m.onnx.json beside it" in sample_error(shutil.copy(entry["onnx"], tmp_path / "m.onnx"))
    for fmt in FORMATS:  # a file that is not a model, with a valid JSON beside it
        bad = tmp_path / f"bad.{fmt}"
        bad.write_bytes(os.urandom(4096))
        shutil.copy(entry[fmt] + ".json", str(bad) + ".json")
        if fmt == "onnx" and ORT_MISSING:
            continue
        assert "is not a" in sample_error(bad, "--num", "4")
    (tmp_path / "j.onnx").write_bytes(b"x")
    (tmp_path / "j.onnx.json").write_text('{"some": "json"}')
    assert "not a ddpm-export JSON" in sample_error(tmp_path / "j.onnx")
    assert "was exported for x of shape [4, 1, 28, 28]" in sample_error(entry["mindir"], "--num", "8")
    assert "--no-ema applies to checkpoints" in sample_error(entry["mindir"], "--num", "4", "--no-ema")
    net = load_exported(entry["mindir"])
    with pytest.raises(UserError, match="exported for x of shape"):
        net(Tensor(np.zeros((BATCH, 1, 32, 32), np.float32)), Tensor(np.zeros(BATCH, np.int32)))
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if it were not installed
    assert "needs onnxruntime" in sample_error(entry["onnx"], "--num", "4")
    assert not [f for f in os.listdir(tmp_path) if f.endswith((".png", ".npy"))]

"""Class conditioning: label dropout, classifier-free guidance, conditional training, no confusion."""

import ddpm_ms  # noqa: F401

import os

import numpy as np
import pytest
import mindspore as ms
from mindspore import Tensor

from ddpm_ms.utils import checkpoint as ckpt
from ddpm_ms.config import ARCH_KEYS, load_config
from ddpm_ms.utils.errors import UserError
from ddpm_ms.diffusion.generation import class_labels, guided_eps_fn
from ddpm_ms.train import train
from ddpm_ms.training.step import drop_labels
from idx_files import write_blob_dataset
from tiny_config import FLAT, TINY

NULL = 10


class StubEps:
    """eps(x, t, y) = x * (y + 1): conditional and null predictions differ in a known way."""

    def __init__(self):
        self.batches = []

    def __call__(self, x, t, y):
        self.batches.append(x.shape[0])
        return x * (y.astype(ms.float32) + 1.0).reshape((-1, 1, 1, 1))


@pytest.fixture(autouse=True)
def pynative():
    ms.set_context(mode=ms.PYNATIVE_MODE)


@pytest.mark.parametrize("w", [0.0, 1.0, 3.0])
def test_guidance_combines_predictions_as_in_ho_salimans(w):
    rng = np.random.default_rng(0)
    x = rng.standard_normal((4, 1, 3, 3)).astype(np.float32)
    classes = [7, 7, 9, 0]
    stub = StubEps()
    eps = guided_eps_fn(stub, classes, w, NULL)(Tensor(x), Tensor(np.zeros(4, np.int32))).asnumpy()
    cond = x * (np.array(classes) + 1.0)[:, None, None, None]
    uncond = x * (NULL + 1.0)
    assert np.allclose(eps, (1 + w) * cond - w * uncond, atol=1e-5)
    # one network call; twice the batch only when the unconditional branch is needed
    assert stub.batches == ([4] if w == 0 else [8])


def test_label_dropout_rate():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 10, 200_000)
    for p in (0.0, 0.1, 0.5, 1.0):
        out = drop_labels(labels, p, NULL, rng)
        dropped = out == NULL
        assert abs(dropped.mean() - p) < 0.005
        assert np.array_equal(out[~dropped], labels[~dropped])  # kept labels unchanged


def test_class_labels_and_unconditional_confusion():
    cond = load_config(TINY, ["num_classes=10"])
    assert class_labels(cond, 12).tolist() == list(range(10)) + [0, 1]
    assert class_labels(cond, 3, [7, 7, 9]).tolist() == [7, 7, 9]
    with pytest.raises(UserError, match="class labels must be in 0..9"):
        class_labels(cond, 2, [3, 10])
    uncond = load_config(TINY)
    assert class_labels(uncond, 4) is None
    with pytest.raises(UserError, match="unconditional model"):
        class_labels(uncond, 3, [7, 7, 9])
    with pytest.raises(ckpt.CheckpointError, match="num_classes: checkpoint 10 vs config None"):
        ckpt.check_compatible({"config": cond}, uncond, ARCH_KEYS, "c.ckpt")


@pytest.mark.parametrize("objective", [[], ["prediction_type=x0"], ["prediction_type=v", "zero_terminal_snr=true"]])
def test_conditional_training_run_and_guided_sampling(tmp_path, objective):
    from ddpm_ms.diffusion.generation import generate
    from ddpm_ms.pipeline import load

    data_dir = write_blob_dataset(tmp_path / "data", n_train=48)
    out = str(tmp_path / "run")
    # tiny.yaml's network on one level, without attention: the class embedding joins the time embedding as in any
    # network, and this one compiles its train step and sampling graphs in about half the time
    cfg = load_config(TINY, [f"data_dir={data_dir}", f"output_dir={out}", "num_classes=10", "max_steps=3",
                             "label_dropout=0.5", "num_samples=10", "sample_steps=2", "gif_frames=2",
                             "guidance=2.0"] + FLAT + objective)
    train(cfg, progress=False)
    path = ckpt.CheckpointManager(os.path.join(out, "checkpoints")).list()[-1]
    model, sched, cfg2 = load(path)[:3]
    assert cfg2["num_classes"] == 10
    assert cfg2["prediction_type"] == cfg["prediction_type"]  # the objective is stored in the checkpoint
    a, _ = generate(model, sched, cfg2, 4, classes=[7, 7, 9, 1], guidance=0.0, seed=0, progress=False)
    b, _ = generate(model, sched, cfg2, 4, classes=[7, 7, 9, 1], guidance=3.0, seed=0, progress=False)
    c, _ = generate(model, sched, cfg2, 4, classes=[1, 1, 1, 1], guidance=0.0, seed=0, progress=False)
    assert a.shape == (4, 1, 28, 28) and np.isfinite(b).all()
    assert not np.allclose(a, b) and not np.allclose(a, c)  # guidance and labels change the result

"""Training you can watch: TensorBoard events, quality during training, the best checkpoint, speed lines."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cli_checks import one_line_error
from ddpm_ms.utils import checkpoint as ckpt
from idx_files import write_blob_dataset, write_fixed_classifier
from tiny_config import FLAT, TINY

event_accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
pytest.importorskip("tensorboardX")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EVAL_NUM = 257  # just above the classifier's 256 features
# evaluations at 2, 4, 6, 8, checkpoints at 4 and 8 (one kept): a kill at step 7 leaves an evaluation (6) logged
# after the newest checkpoint, which the resumed run must replace, not repeat
# tiny.yaml's network with one level and no attention (no down- or up-sampling): events, quality rows and the
# best checkpoint do not depend on the network, and it compiles and samples in about half the time
WATCHED = ["epochs=2", "max_steps=8", "save_every_steps=4", "keep_checkpoints=1", "eval_every_steps=2",
           f"eval_num={EVAL_NUM}", "log_tensorboard=true", "log_every=1", "num_samples=2", "sample_steps=2",
           "gif_frames=2", "lr=0.003"] + FLAT


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("watch")
    return tmp, write_blob_dataset(tmp / "data", n_train=40, n_test=64), write_fixed_classifier(tmp / "cache")


def env_of(cache, kill_at=None):
    env = dict(os.environ, PYTHONPATH=ROOT, DDPM_MS_CACHE=cache)
    env.pop("DDPM_MS_KILL_AT", None)
    if kill_at:
        env["DDPM_MS_KILL_AT"] = kill_at
    return env


def train(out, setup, resume=False, kill_at=None):
    _, data_dir, cache = setup
    cmd = [sys.executable, "-m", "ddpm_ms.train", "--config", TINY, "--output-dir", str(out), "--data-dir", data_dir,
           "--no-progress", *WATCHED] + (["--resume"] if resume else [])
    return subprocess.run(cmd, env=env_of(cache, kill_at), capture_output=True, text=True, timeout=400)


@pytest.fixture(scope="module")
def watched(setup):
    out = setup[0] / "run"
    proc = train(out, setup)
    assert proc.returncode == 0, proc.stderr
    return out, proc.stderr


def read_csv(path):
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def events(run):
    acc = event_accumulator.EventAccumulator(str(run / "tensorboard"),
                                             size_guidance={"scalars": 0, "images": 0, "tensors": 0})
    acc.Reload()
    return acc


def scalars(acc, tag):
    return [(e.step, e.value) for e in acc.Scalars(tag)]


def test_event_file_holds_the_loss_lr_quality_images_and_config(watched):
    run, _ = watched
    acc = events(run)
    loss = read_csv(run / "loss.csv")
    assert [s for s, _ in scalars(acc, "train/loss")] == list(range(1, 9))
    np.testing.assert_allclose([v for _, v in scalars(acc, "train/loss")], [float(r["loss"]) for r in loss],
                               rtol=1e-5)
    np.testing.assert_allclose([v for _, v in scalars(acc, "train/lr")], [float(r["lr"]) for r in loss], rtol=1e-5)
    assert [v for _, v in scalars(acc, "train/skipped_steps")] == [0.0] * 8  # float32: nothing overflows
    for tag in ("speed/img_per_s", "speed/step_seconds", "speed/peak_rss_gib"):
        assert scalars(acc, tag) and all(v > 0 for _, v in scalars(acc, tag)), tag
    quality = read_csv(run / "quality.csv")
    assert [int(r["step"]) for r in quality] == [2, 4, 6, 8]
    for key in ("fd", "precision", "recall", "min_class_share"):
        assert [s for s, _ in scalars(acc, f"quality/{key}")] == [2, 4, 6, 8]
        np.testing.assert_allclose([v for _, v in scalars(acc, f"quality/{key}")], [float(r[key]) for r in quality],
                                   rtol=1e-5, atol=1e-7)
    assert [(e.step, e.width) for e in acc.Images("eval_samples")] == [(s, 8 * 30 + 2) for s in (2, 4, 6, 8)]
    assert [e.step for e in acc.Images("samples")][-1] == 8  # the final samples
    config = acc.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert f"eval_num: {EVAL_NUM}" in config and "max_steps: 8" in config
    assert len(os.listdir(run / "tensorboard")) == 1


def test_quality_csv_equals_ddpm_evaluate_and_the_best_checkpoint_is_the_lowest_fd(watched, setup):
    run, stderr = watched
    quality = read_csv(run / "quality.csv")
    best_row = min(quality, key=lambda r: float(r["fd"]))
    groups, meta = ckpt.load(str(run / "checkpoints" / "best.ckpt"))
    assert meta["step"] == int(best_row["step"]) and meta["quality"]["fd"] == pytest.approx(float(best_row["fd"]))
    assert sorted(os.listdir(run / "checkpoints")) == ["best.ckpt", "ckpt_step00000008.ckpt"]
    assert f"best checkpoint {run / 'checkpoints' / 'best.ckpt'}" in stderr.splitlines()[-1]
    # the same numbers as ddpm-evaluate on that checkpoint, with the run's seed and the same N
    out = setup[0] / "best.json"
    best = str(run / "checkpoints" / "best.ckpt")
    proc = subprocess.run([sys.executable, "-m", "ddpm_ms.evaluate", "--checkpoint", best,
                           "--num", str(EVAL_NUM), "--seed", "0", "--data-dir", setup[1], "--out", str(out),
                           "--no-progress"], env=env_of(setup[2]), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    for key in ("fd", "fd_floor", "precision", "recall", "is"):
        assert float(best_row[key]) == pytest.approx(result[key], rel=1e-5, abs=1e-7), key
    assert float(best_row["min_class_share"]) == pytest.approx(min(result["class_shares"]))


def test_the_lowest_fd_is_kept_through_rotation(setup, tmp_path, monkeypatch):
    """Scripted scores (FD 3, 1, 2, 4 at steps 2, 4, 6, 8): the checkpoint of step 4 is kept as best.ckpt while
    keep_checkpoints=1 rotates every other step's away."""
    from ddpm_ms.config import load_config
    from ddpm_ms.train import train as train_in_process
    from ddpm_ms.training import quality

    scores = {2: 3.0, 4: 1.0, 6: 2.0, 8: 4.0}

    class Scripted:
        def __init__(self, cfg, data_dir, progress=True):
            pass

        def evaluate(self, trainer, step, epoch, progress=True):
            result = {"fd": scores[step], "fd_floor": 0.5, "precision": 0.1, "recall": 0.2, "is": 1.0,
                      "class_shares": [0.1] * 10, "num_samples": EVAL_NUM}
            return quality.row_of(step, epoch, result, 0.0), np.zeros((2, 1, 28, 28), np.float32)

    monkeypatch.setattr(quality, "QualityMonitor", Scripted)
    overrides = [w for w in WATCHED if not w.startswith(("save_every_steps", "log_tensorboard"))]
    cfg = load_config(TINY, overrides + ["save_every_steps=2", "log_tensorboard=false", f"data_dir={setup[1]}",
                                         f"output_dir={tmp_path / 'run'}", "device=CPU"])
    run = train_in_process(cfg, progress=False)
    assert sorted(os.listdir(run.checkpoints)) == ["best.ckpt", "ckpt_step00000008.ckpt"]
    assert not os.path.exists(os.path.join(run.root, "tensorboard"))
    _, meta = ckpt.load(run.best_checkpoint)
    assert meta["step"] == 4 and meta["quality"]["fd"] == 1.0
    assert [float(r["fd"]) for r in read_csv(run.quality_csv)] == [3.0, 1.0, 2.0, 4.0]


def test_sample_best_uses_the_best_checkpoint(watched, capsys):
    from ddpm_ms.sample import main

    run, _ = watched
    main(["--checkpoint", str(run), "--best", "--num", "2", "--steps", "2", "--device", "CPU", "--no-progress"])
    best = np.load(run / "samples_best_ddim_2_seed0.npy")
    from ddpm_ms.pipeline import DDPMPipeline

    pipe = DDPMPipeline.from_checkpoint(str(run / "checkpoints" / "best.ckpt"))
    np.testing.assert_array_equal(best, pipe.sample(2, steps=2, seed=0, progress=False)[0])
    capsys.readouterr()
    error = one_line_error(main, ["--checkpoint", str(run / "samples"), "--best", "--num", "2"], capsys)
    assert "has no best checkpoint" in error and "eval_every_steps" in error


def test_resume_after_sigkill_continues_events_and_quality_without_gaps_or_repeats(watched, setup):
    reference, _ = watched
    out = setup[0] / "killed"
    proc = train(out, setup, kill_at="step:7")
    assert proc.returncode == -9, proc.stderr
    assert [int(r["step"]) for r in read_csv(out / "quality.csv")] == [2, 4, 6]  # 6 is after the checkpoint of 4
    proc = train(out, setup, resume=True)
    assert proc.returncode == 0, proc.stderr

    def without_seconds(rows):
        return [{k: v for k, v in r.items() if k != "seconds"} for r in rows]
    assert without_seconds(read_csv(out / "quality.csv")) == without_seconds(read_csv(reference / "quality.csv"))
    acc, ref = events(out), events(reference)
    for tag in ("train/loss", "train/lr", "quality/fd", "quality/recall"):
        assert scalars(acc, tag) == scalars(ref, tag), tag  # each step once, the same values
    assert len(os.listdir(out / "tensorboard")) == 2  # the resumed run appends a second event file
    assert ckpt.load(str(out / "checkpoints" / "best.ckpt"))[1]["step"] == \
        ckpt.load(str(reference / "checkpoints" / "best.ckpt"))[1]["step"]


@pytest.mark.parametrize("overrides, message", [
    (["eval_every_steps=-1"], "'eval_every_steps' must be >= 0"),
    (["eval_every_steps=2", "eval_num=100"], "eval_num must be above 256"),
    (["log_tensorboard=sometimes"], "'log_tensorboard' must be one of: auto, true, false"),
])
def test_bad_values_are_one_line(setup, tmp_path, capsys, overrides, message):
    from ddpm_ms.train import main

    error = one_line_error(main, ["--config", TINY, "--output-dir", str(tmp_path / "run"), "--data-dir", setup[1],
                                  "--no-progress", *overrides], capsys)
    assert message in error
    assert not os.path.exists(tmp_path / "run")


def folder_of_pngs(path, count=8, size=16):
    from PIL import Image

    os.makedirs(path)
    rng = np.random.default_rng(0)
    for i in range(count):
        Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8)).save(os.path.join(path, f"{i}.png"))
    return str(path)


def test_folder_datasets_refuse_an_explicit_evaluation_and_note_an_inherited_one(tmp_path, capsys):
    from ddpm_ms.training import quality

    folder = folder_of_pngs(tmp_path / "images")
    from ddpm_ms.train import main

    error = one_line_error(main, ["--config", TINY, "--output-dir", str(tmp_path / "run"), "--data-dir", folder,
                                  "dataset=folder", "image_size=16", "channels=3", "eval_every_steps=5"], capsys)
    assert "no feature network exists for dataset 'folder'" in error
    assert not os.path.exists(tmp_path / "run")
    from ddpm_ms.config import load_config

    cfg = load_config(TINY, ["dataset=folder", "eval_every_steps=5"])  # as if the YAML file had set it
    assert quality.wanted(cfg, explicit=False) is False
    assert "note: no quality evaluation during training" in capsys.readouterr().err


def test_tensorboard_true_without_the_writer_is_a_clear_error(monkeypatch):
    from ddpm_ms.config import load_config
    from ddpm_ms.training import monitor
    from ddpm_ms.utils.errors import UserError

    monkeypatch.setitem(sys.modules, "tensorboardX", None)  # import fails
    assert monitor.check_tensorboard(load_config(TINY, ["log_tensorboard=auto"])) is False
    with pytest.raises(UserError, match="needs tensorboardX"):
        monitor.check_tensorboard(load_config(TINY, ["log_tensorboard=true"]))

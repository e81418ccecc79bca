"""Offline evaluation: Fréchet distance, Inception-like score, precision/recall, the classifier, the CLI."""

import ddpm_ms  # noqa: F401  (caps oneDNN before MindSpore loads)

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import mindspore as ms

from ddpm_ms.evaluation import classifier as C
from ddpm_ms.evaluation import metrics as E
from ddpm_ms.command_line import run_cli
from ddpm_ms.utils.errors import UserError
from idx_files import write_blob_dataset
from script_modules import load_script

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def random_orthogonal(d, rng):
    q, r = np.linalg.qr(rng.standard_normal((d, d)))
    return q * np.sign(np.diag(r))


@pytest.fixture(autouse=True)
def keep_execution_mode():
    """The CLI's setup_device switches to GRAPH_MODE; give other test modules their mode back."""
    mode = ms.get_context("mode")
    yield
    ms.set_context(mode=mode)


@pytest.fixture(scope="module")
def fashion_dir():
    from ddpm_ms.data.mnist import locate_fashion_mnist

    try:
        return locate_fashion_mnist(download=False)
    except UserError as e:
        pytest.skip(f"Fashion-MNIST not available: {e}")


@pytest.fixture(scope="module")
def fixed_net():
    """An untrained FashionCNN with fixed-seed weights: a fixed (random) feature map."""
    ms.set_seed(123)
    net = C.FashionCNN()
    net.set_train(False)
    return net


# --------------------------------------------------------------------------- Fréchet distance

def test_fd_of_a_set_with_itself_is_zero():
    feats = np.random.default_rng(0).standard_normal((400, 16)) @ np.random.default_rng(1).standard_normal((16, 16))
    mu, sigma = E.feature_stats(feats)
    assert E.frechet_distance(mu, sigma, mu, sigma) == pytest.approx(0.0, abs=1e-8)
    assert E.fd_of_features(feats, feats.copy()) == pytest.approx(0.0, abs=1e-8)


def test_fd_diagonal_gaussians_closed_form():
    rng = np.random.default_rng(2)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    s1, s2 = rng.uniform(0.1, 3, 6), rng.uniform(0.1, 3, 6)
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(s1 + s2 - 2 * np.sqrt(s1 * s2))
    assert E.frechet_distance(mu1, np.diag(s1), mu2, np.diag(s2)) == pytest.approx(expected, rel=1e-10)
    # 1-D: N(0, 1) vs N(0, 4): 1 + 4 - 2 * 2 = 1
    assert E.frechet_distance([0.0], [[1.0]], [0.0], [[4.0]]) == pytest.approx(1.0)


def test_fd_non_diagonal_commuting_covariances():
    rng = np.random.default_rng(3)
    d = 8
    q = random_orthogonal(d, rng)
    a, b = rng.uniform(0.0, 2, d), rng.uniform(0.0, 2, d)
    a[:2] = 0.0  # rank-deficient S1 (as with fewer samples than features)
    s1, s2 = q @ np.diag(a) @ q.T, q @ np.diag(b) @ q.T
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    # commuting S1, S2: (S1 S2)^1/2 = Q diag(sqrt(a b)) Q^T
    expected = np.sum((mu1 - mu2) ** 2) + np.sum(a + b - 2 * np.sqrt(a * b))
    # (zero eigenvalues come out as ~1e-16, whose square roots are ~1e-8: hence the tolerance)
    assert E.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(expected, abs=1e-6)


def test_trace_sqrt_product_general_case_matches_definition():
    """Non-commuting S1, S2: tr((S1 S2)^1/2) = sum of square roots of the eigenvalues of S1 S2."""
    rng = np.random.default_rng(4)
    x, y = rng.standard_normal((2, 10, 10))
    s1, s2 = x @ x.T, y @ y.T + np.eye(10)
    assert not np.allclose(s1 @ s2, s2 @ s1)
    expected = np.sum(np.sqrt(np.linalg.eigvals(s1 @ s2).real.clip(0)))
    assert E.trace_sqrt_product(s1, s2) == pytest.approx(expected, rel=1e-8)
    # and the FD is symmetric
    mu = rng.standard_normal(10)
    assert E.frechet_distance(mu, s1, 0 * mu, s2) == pytest.approx(E.frechet_distance(0 * mu, s2, mu, s1), rel=1e-9)


def test_fd_rejects_mismatched_statistics():
    with pytest.raises(ValueError):
        E.frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


def blur(images, size):
    """Box blur of [N, 1, 28, 28] images in [-1, 1] (edge padding)."""
    p = size // 2
    padded = np.pad(images, ((0, 0), (0, 0), (p, p), (p, p)), mode="edge")
    out = np.zeros_like(images)
    for dy in range(size):
        for dx in range(size):
            out += padded[:, :, dy:dy + 28, dx:dx + 28]
    return out / size ** 2


def shift(images, pixels):
    """Move the content ``pixels`` right and down, filling with the background (-1)."""
    out = np.full_like(images, -1.0)
    out[:, :, pixels:, pixels:] = images[:, :, :28 - pixels, :28 - pixels]
    return out


@pytest.mark.parametrize("space", ["pixels", "fixed_cnn"])
def test_fd_grows_when_images_are_blurred_or_shifted(space, fashion_dir, fixed_net):
    """Real test images vs other real test images, and vs blurred / shifted ones, in two feature
    spaces: 2x2-pooled pixels and a fixed-seed (untrained) FashionCNN."""
    from ddpm_ms.data.idx import load_arrays

    n = 300
    images = C.to_model_input(load_arrays(fashion_dir, "test")[0][:2 * n])
    ref, other = images[:n], images[n:]
    variants = {"real": other, "blur3": blur(other, 3), "blur5": blur(other, 5), "shift2": shift(other, 2),
                "shift4": shift(other, 4)}
    everything = np.concatenate([ref] + list(variants.values()))
    if space == "pixels":
        feats = everything.reshape(len(everything), 14, 2, 14, 2).mean(axis=(2, 4)).reshape(len(everything), -1)
    else:
        feats = C.extract(fixed_net, everything)[0]
    ref_f, *variant_f = np.split(feats.astype(np.float64), len(variants) + 1)
    fd = {name: E.fd_of_features(ref_f, f) for name, f in zip(variants, variant_f)}
    assert fd["real"] < fd["blur3"] < fd["blur5"], fd
    assert fd["real"] < fd["shift2"] < fd["shift4"], fd
    assert fd["blur5"] > 2 * fd["real"] and fd["shift4"] > 2 * fd["real"], fd


# --------------------------------------------------------------------------- Inception-like score

def test_inception_score_extremes():
    one_hot = np.zeros((50, 10))
    one_hot[:, 3] = 1.0
    assert E.inception_score(one_hot, splits=5)[0] == pytest.approx(1.0)
    confident_uniform = np.tile(np.eye(10), (10, 1))  # each split of 10 holds every class once
    mean, std = E.inception_score(confident_uniform, splits=10)
    assert mean == pytest.approx(10.0, rel=1e-6) and std == pytest.approx(0.0, abs=1e-6)
    unsure = np.full((40, 10), 0.1)
    assert E.inception_score(unsure, splits=4)[0] == pytest.approx(1.0)
    # half the classes, confidently and evenly: 5
    half = np.tile(np.eye(10)[:5], (8, 1))
    assert E.inception_score(half, splits=1)[0] == pytest.approx(5.0, rel=1e-6)


# --------------------------------------------------------------------------- precision / recall

def test_knn_radii_exclude_the_point_itself():
    pts = np.array([[0.0], [1.0], [3.0], [7.0]])
    np.testing.assert_allclose(E.knn_radii(pts, k=1), [1.0, 1.0, 4.0, 16.0])
    np.testing.assert_allclose(E.knn_radii(pts, k=2, batch_size=3), [9.0, 4.0, 9.0, 36.0])


def test_precision_recall_identical_sets():
    feats = np.random.default_rng(5).standard_normal((300, 5))
    assert E.precision_recall(feats, feats.copy(), k=3, batch_size=64) == (1.0, 1.0)


def test_precision_recall_far_away_fakes():
    rng = np.random.default_rng(6)
    real = rng.standard_normal((300, 5))
    fake = rng.standard_normal((300, 5)) + 50.0
    assert E.precision_recall(real, fake, k=3) == (0.0, 0.0)


def test_precision_recall_mode_collapse():
    """Fakes from one of the two real modes: all realistic (precision ~1), half the modes (recall ~0.5)."""
    rng = np.random.default_rng(7)
    centres = np.array([[0.0, 0.0], [30.0, 0.0]])
    real = np.concatenate([rng.standard_normal((200, 2)) + centres[0], rng.standard_normal((200, 2)) + centres[1]])
    fake = rng.standard_normal((400, 2)) + centres[0]
    precision, recall = E.precision_recall(real, fake, k=3, batch_size=128)
    assert precision > 0.9
    assert 0.4 < recall <= 0.5


# --------------------------------------------------------------------------- classifier and evaluate_images

def test_augment_flips_and_shifts_keep_shape_and_content():
    rng = np.random.default_rng(8)
    x = np.full((64, 1, 28, 28), -1.0, np.float32)
    x[:, :, 10:18, 4:8] = 1.0  # a bar on the left
    out = C.augment(x, rng, max_shift=1)
    assert out.shape == x.shape and out.dtype == np.float32
    assert set(np.unique(out)) <= {-1.0, 1.0}
    np.testing.assert_array_equal((out > 0).sum(axis=(1, 2, 3)), 32)  # content moved, not cut off
    left = (out[:, 0, :, :14] > 0).sum(axis=(1, 2)) > 0
    assert 0 < left.sum() < 64  # some flipped, some not


def test_to_model_input_scales_uint8_and_rejects_bad_shapes():
    x = C.to_model_input(np.array([[[0] * 28] * 28, [[255] * 28] * 28], np.uint8))
    assert x.shape == (2, 1, 28, 28) and x.min() == -1.0 and x.max() == 1.0
    with pytest.raises(UserError, match="shape"):
        C.to_model_input(np.zeros((2, 3, 28, 28), np.float32))


def test_classifier_trains_on_a_small_subset_and_is_cached(fashion_dir, tmp_path, monkeypatch):
    net, info = C.load_or_train_classifier(cache_dir=str(tmp_path), data_dir=fashion_dir, epochs=1, batch_size=64,
                                           lr=3e-3, limit=2048, test_limit=1000, progress=False,
                                           min_accuracy=0.0, log=None)
    assert info["test_accuracy"] > 0.5  # chance is 0.1
    path = tmp_path / (C.cache_key(1, 64, 3e-3, C.DEFAULT_SEED, 2048) + ".ckpt")
    assert path.is_file() and not [p for p in os.listdir(tmp_path) if p.startswith(".tmp")]

    def no_training(*a, **k):
        raise AssertionError("the cached classifier should have been loaded")

    monkeypatch.setattr(C, "train_classifier", no_training)
    net2, info2 = C.load_or_train_classifier(cache_dir=str(tmp_path), data_dir=fashion_dir, epochs=1, batch_size=64,
                                             lr=3e-3, limit=2048, progress=False, log=None)
    assert info2["test_accuracy"] == info["test_accuracy"]
    x = np.random.default_rng(9).uniform(-1, 1, (7, 1, 28, 28)).astype(np.float32)
    np.testing.assert_allclose(C.extract(net, x)[0], C.extract(net2, x)[0], rtol=1e-5, atol=1e-5)


def test_classifier_below_the_accuracy_bar_is_an_error_and_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: (C.FashionCNN(), 0.5))
    monkeypatch.setattr("ddpm_ms.data.locate", lambda *a, **k: "unused")
    with pytest.raises(UserError, match="50.00% test accuracy"):
        C.load_or_train_classifier(cache_dir=str(tmp_path), log=None)
    assert os.listdir(tmp_path) == []


def test_extract_pads_the_last_batch(fixed_net):
    x = np.random.default_rng(10).uniform(-1, 1, (13, 1, 28, 28)).astype(np.float32)
    f_all, p_all = C.extract(fixed_net, x, batch_size=5)
    f_one, p_one = C.extract(fixed_net, x, batch_size=13)
    assert f_all.shape == (13, C.FEATURE_DIM) and p_all.shape == (13, 10) and f_all.dtype == np.float64
    np.testing.assert_allclose(f_all, f_one, rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(p_all.sum(axis=1), 1.0)


def test_evaluate_images_reports_metrics_and_the_real_floor(fixed_net, tmp_path):
    data_dir = write_blob_dataset(tmp_path / "data", n_train=64, n_test=32)
    reference = E.RealReference.build(fixed_net, data_dir)
    real = reference.train_images[:32]
    good = E.evaluate_images(real, fixed_net, reference)
    bad = E.evaluate_images(shift(C.to_model_input(real), 6), fixed_net, reference)
    for r in (good, bad):
        assert r["num_samples"] == 32 and r["fd"] >= 0 and r["fd_floor"] >= 0 and 1.0 <= r["is"] <= 10.0
        assert 0 <= r["precision"] <= 1 and 0 <= r["recall"] <= 1
        assert set(r["floor"]) >= {"fd", "is", "precision", "recall"}
    assert bad["fd"] > good["fd"]
    assert good["fd_floor"] == bad["fd_floor"]  # the same real subset (seeded)
    line = E.summary_line(good)
    assert line.startswith("FD ") and "(floor " in line and ", IS " in line and "precision" in line and "recall" in line
    # class coverage: the share of the images the classifier puts in each class (argmax)
    probs = C.extract(fixed_net, real)[1]
    np.testing.assert_allclose(good["class_shares"], [np.mean(probs.argmax(1) == c) for c in range(10)])
    assert sum(good["class_shares"]) == pytest.approx(1.0)
    assert f"smallest class share {100 * min(good['class_shares']):.1f}%" in line
    json.dumps(good)  # JSON-able


# --------------------------------------------------------------------------- the CLI

@pytest.fixture(scope="module")
def cli_setup(tmp_path_factory, fixed_net):
    """Blob data and a cache holding a fixed-seed classifier under the default key (no training)."""
    tmp = tmp_path_factory.mktemp("evalcli")
    data_dir = write_blob_dataset(tmp / "data", n_train=64, n_test=24)
    cache = tmp / "cache"
    C.save_classifier(fixed_net, str(cache / (C.cache_key() + ".ckpt")),
                      {"version": C.CLASSIFIER_VERSION, "key": C.cache_key(), "test_accuracy": 0.0})
    samples = np.random.default_rng(11).uniform(-1, 1, (20, 1, 28, 28)).astype(np.float32)
    np.save(tmp / "samples.npy", samples)
    return tmp, data_dir, str(cache)


def test_cli_scores_an_npy_and_writes_json(cli_setup):
    tmp, data_dir, cache = cli_setup
    out = tmp / "results.json"
    proc = subprocess.run([sys.executable, "-m", "ddpm_ms.evaluate", "--samples", str(tmp / "samples.npy"),
                           "--out", str(out), "--data-dir", data_dir, "--cache-dir", cache, "--device", "CPU",
                           "--no-progress"], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("FD ") and "(floor " in lines[0]
    result = json.loads(out.read_text())
    for key in ("fd", "fd_floor", "is", "is_std", "precision", "recall", "num_samples", "floor", "classifier",
                "source"):
        assert key in result, key
    assert result["num_samples"] == 20 and result["classifier"]["version"] == C.CLASSIFIER_VERSION


def test_cli_reads_a_folder_of_pngs(cli_setup, capsys):
    from PIL import Image

    tmp, data_dir, cache = cli_setup
    folder = tmp / "pngs"
    folder.mkdir()
    for i, img in enumerate(np.random.default_rng(12).integers(0, 256, (6, 28, 28), dtype=np.uint8)):
        Image.fromarray(img).save(folder / f"{i:03d}.png")
    from ddpm_ms.evaluate import main

    result = main(["--samples", str(folder), "--data-dir", data_dir, "--cache-dir", cache, "--device", "CPU",
                   "--no-progress"])
    assert result["num_samples"] == 6 and result["source"]["samples"] == str(folder)


def test_cli_bad_input_exits_2_with_one_line(cli_setup, tmp_path):
    tmp, data_dir, cache = cli_setup
    np.save(tmp_path / "rgb.npy", np.zeros((4, 3, 28, 28), np.float32))
    proc = subprocess.run([sys.executable, "-m", "ddpm_ms.evaluate", "--samples", str(tmp_path / "rgb.npy"),
                           "--cache-dir", cache], cwd=ROOT, env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [proc.stderr.strip()] and proc.stderr.startswith("error: ")
    assert "[N, 1, 28, 28]" in proc.stderr


@pytest.mark.parametrize("make, message", [
    (lambda d: str(d / "missing.npy"), "does not exist"),
    (lambda d: (np.save(d / "big.npy", np.full((4, 1, 28, 28), 3.0, np.float32)), str(d / "big.npy"))[1],
     "must be in [-1, 1]"),
    (lambda d: (np.save(d / "small.npy", np.zeros((4, 1, 32, 32), np.float32)), str(d / "small.npy"))[1],
     "expected 28x28"),
    (lambda d: (np.save(d / "one.npy", np.zeros((1, 1, 28, 28), np.float32)), str(d / "one.npy"))[1],
     "at least 2"),
    (lambda d: ((d / "bad.npy").write_bytes(b"not numpy"), str(d / "bad.npy"))[1], "not a readable .npy"),
    (lambda d: (d / "empty").mkdir() or str(d / "empty"), "no .png files"),
])
def test_cli_bad_inputs(tmp_path, capsys, make, message):
    path = make(tmp_path)
    with pytest.raises(SystemExit) as exc:
        run_cli(__import__("ddpm_ms.evaluate", fromlist=["main"]).main, ["--samples", path])
    assert exc.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0], err


def test_cli_needs_exactly_one_source(capsys):
    from ddpm_ms.evaluate import main

    with pytest.raises(SystemExit) as exc:
        run_cli(main, [])
    assert exc.value.code == 2
    with pytest.raises(SystemExit):
        run_cli(main, ["--samples", "a.npy", "--checkpoint", "runs/x"])
    with pytest.raises(SystemExit) as exc:
        run_cli(main, ["--checkpoint", "/nonexistent/run", "--device", "CPU"])
    assert exc.value.code == 2 and "does not exist" in capsys.readouterr().err


# --------------------------------------------------------------------------- scripts/quality_vs_steps.py

@pytest.fixture(scope="module")
def qvs():
    return load_script("quality_vs_steps")


def test_quality_vs_steps_settings_table_and_plot(qvs, tmp_path):
    todo = qvs.settings(["ddpm", "ddim", "dpm-solver++"], [20, 5], [], 1000)
    assert todo == [("ddpm", 1000), ("ddim", 5), ("ddim", 20), ("dpm-solver++", 5), ("dpm-solver++", 20)]
    assert qvs.settings(["ddpm"], [5], [100], 1000) == [("ddpm", 100), ("ddpm", 1000)]
    with pytest.raises(UserError, match="only 50 timesteps"):
        qvs.settings(["ddim"], [100], [], 50)
    rows = [{"sampler": s, "steps": k, "timesteps": 1000, "fd": 10.0 / k ** 0.5, "fd_floor": 0.1, "is": 8.0,
             "precision": 0.7, "recall": 0.6, "sampling_seconds": 1.0, "num_samples": 100} for s, k in todo]
    table = qvs.markdown_table(rows, 100, {"key": "k", "test_accuracy": 0.93}, "ckpt")
    lines = table.strip().splitlines()
    assert lines[2].startswith("| sampler | steps | FD |") and len(lines) == 4 + len(todo)
    assert "| ddpm | 1000 (full) |" in table and "| ddim | 5 | 4.472 |" in table
    png = qvs.plot(rows, str(tmp_path / "q.png"))
    assert os.path.getsize(png) > 1000

"""Tests for ddpm_ms.data on a small IDX dataset written here (40 train + 16 test images).

Every image has a bright left half (128..255) and a dark right half (0..127) and random,
unique pixels, so an output can be traced back to its source image and a horizontal flip
is unambiguous.
"""

import gzip
import os
import struct
import subprocess
import sys

import numpy as np
import pytest

import ddpm_ms  # noqa: F401  (before mindspore: sets ONEDNN_MAX_CPU_ISA)
from ddpm_ms import data
from ddpm_ms.data import idx, mnist
from ddpm_ms.utils.errors import UserError
from idx_files import idx_bytes, write_idx  # noqa: F401
from script_modules import load_script

N_TRAIN, N_TEST = 40, 16
REAL_DIR = "/usr/share/datasets/fashion-mnist"


# --------------------------------------------------------------------------- helpers

def make_images(n, seed):
    rng = np.random.default_rng(seed)
    imgs = np.empty((n, 28, 28), np.uint8)
    imgs[:, :, :14] = rng.integers(128, 256, (n, 28, 14))
    imgs[:, :, 14:] = rng.integers(0, 128, (n, 28, 14))
    imgs[0, 0, 0] = 255  # make sure the extremes occur
    imgs[0, 0, 27] = 0
    return imgs


TRAIN_IMAGES = make_images(N_TRAIN, 1)
TRAIN_LABELS = (np.arange(N_TRAIN) % 10).astype(np.uint8)
TEST_IMAGES = make_images(N_TEST, 2)
TEST_LABELS = ((np.arange(N_TEST) + 3) % 10).astype(np.uint8)
ARRAYS = {idx.TRAIN_IMAGES: TRAIN_IMAGES, idx.TRAIN_LABELS: TRAIN_LABELS,
          idx.TEST_IMAGES: TEST_IMAGES, idx.TEST_LABELS: TEST_LABELS}


def write_dataset(directory, gz=False):
    os.makedirs(directory, exist_ok=True)
    for name, arr in ARRAYS.items():
        write_idx(os.path.join(directory, name + (".gz" if gz else "")), arr, gz=gz)
    return str(directory)


def assert_holds_dataset(directory):
    for name, arr in ARRAYS.items():
        path = os.path.join(directory, name)
        with open(path, "rb") as f:
            assert f.read(2) != b"\x1f\x8b", f"{path} is still compressed"
        np.testing.assert_array_equal(idx.read_idx(path), arr)


def lookup(images):
    """uint8 bytes of every original and mirrored image -> (index, flipped)."""
    table = {}
    for i, im in enumerate(images):
        table[im.tobytes()] = (i, False)
        table[im[:, ::-1].tobytes()] = (i, True)
    return table


def to_uint8(batch_images):
    """[-1, 1] float CHW back to exact uint8 HW (asserting the mapping is exact)."""
    u = (batch_images[:, 0].astype(np.float64) + 1.0) / 2.0 * 255.0
    r = np.rint(u)
    assert np.abs(u - r).max() < 1e-3
    return r.astype(np.uint8)


def collect(ds, with_labels=False):
    """All rows of a batched pipeline: list of (index, flipped[, label]) for train data."""
    table = lookup(TRAIN_IMAGES)
    out = []
    for row in ds.create_tuple_iterator(output_numpy=True, num_epochs=1):
        for j, im in enumerate(to_uint8(row[0])):
            idx, flipped = table[im.tobytes()]  # KeyError: neither original nor mirror
            out.append((idx, flipped, int(row[1][j])) if with_labels else (idx, flipped))
    return out


@pytest.fixture(scope="module")
def small_dir(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("fm_small"))


@pytest.fixture
def restore_seed():
    import mindspore.dataset as msds

    seed = msds.config.get_seed()
    yield
    msds.config.set_seed(seed)


class Recorder:
    """A fake downloader: serves gz files of the small dataset and records the URLs."""

    def __init__(self, corrupt=None, fail=False):
        self.urls = []
        self.corrupt, self.fail = corrupt, fail

    def __call__(self, url, path):
        self.urls.append(url)
        if self.fail:
            raise OSError("network is\n  unreachable")  # multi-line, as the download package does
        name = url.rsplit("/", 1)[1][:-len(".gz")]
        payload = gzip.compress(idx_bytes(ARRAYS[name]), mtime=0)
        if name == self.corrupt:
            payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
        with open(path, "wb") as f:
            f.write(payload)

    @staticmethod
    def checksums():
        import hashlib
        return {n + ".gz": hashlib.md5(gzip.compress(idx_bytes(a), mtime=0)).hexdigest()
                for n, a in ARRAYS.items()}


# --------------------------------------------------------------------------- read_idx

@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_round_trip(tmp_path, gz):
    p = write_idx(tmp_path / "images", TRAIN_IMAGES, gz=gz)
    q = write_idx(tmp_path / "labels", TRAIN_LABELS, gz=gz)
    im, lb = idx.read_idx(p), idx.read_idx(q)
    assert im.dtype == np.uint8 and im.shape == (N_TRAIN, 28, 28)
    assert lb.dtype == np.uint8 and lb.shape == (N_TRAIN,)
    np.testing.assert_array_equal(im, TRAIN_IMAGES)
    np.testing.assert_array_equal(lb, TRAIN_LABELS)
    im[0, 0, 0] = 1  # writable


@pytest.mark.parametrize("gz", [False, True])
def test_read_idx_truncated(tmp_path, gz):
    payload = idx_bytes(TRAIN_IMAGES)[:-100]
    p = tmp_path / "trunc-images-idx3-ubyte"
    p.write_bytes(gzip.compress(payload) if gz else payload)
    with pytest.raises(UserError) as e:
        idx.read_idx(p)
    msg = str(e.value)
    assert str(p) in msg and "truncated" in msg
    assert f"expected {N_TRAIN * 784} bytes" in msg and f"got {N_TRAIN * 784 - 100}" in msg
    assert "\n" not in msg


def test_read_idx_header_count_mismatch(tmp_path):
    # Header claims 41 images, payload holds 40; and labels claim fewer than stored.
    p = write_idx(tmp_path / "images", TRAIN_IMAGES, count=N_TRAIN + 1)
    with pytest.raises(UserError, match="truncated") as e:
        idx.read_idx(p)
    assert p in str(e.value)
    q = write_idx(tmp_path / "labels", TRAIN_LABELS, count=N_TRAIN - 1)
    with pytest.raises(UserError, match="trailing") as e:
        idx.read_idx(q)
    assert q in str(e.value)


@pytest.mark.parametrize("magic", [0x00000804, 0x00000903, 0x12345678])
def test_read_idx_wrong_magic(tmp_path, magic):
    p = write_idx(tmp_path / "bad", TRAIN_IMAGES, magic=magic)
    with pytest.raises(UserError, match="magic") as e:
        idx.read_idx(p)
    assert p in str(e.value) and f"0x{magic:08x}" in str(e.value)


def test_read_idx_tiny_missing_corrupt_and_wrong_size(tmp_path):
    tiny = tmp_path / "tiny"
    tiny.write_bytes(b"\x00\x00")
    with pytest.raises(UserError, match="tiny"):
        idx.read_idx(tiny)
    header_only = tmp_path / "header"
    header_only.write_bytes(struct.pack(">II", 0x803, 5))
    with pytest.raises(UserError, match="truncated header"):
        idx.read_idx(header_only)
    with pytest.raises(UserError, match="does not exist"):
        idx.read_idx(tmp_path / "nope")
    badgz = tmp_path / "bad.gz"
    badgz.write_bytes(gzip.compress(idx_bytes(TRAIN_LABELS))[:-12])
    with pytest.raises(UserError, match="gzip") as e:
        idx.read_idx(badgz)
    assert str(badgz) in str(e.value)
    p = write_idx(tmp_path / "big", np.zeros((2, 32, 32), np.uint8))
    with pytest.raises(UserError, match="32x32"):
        idx.read_idx(p)


def test_load_arrays(tmp_path, small_dir):
    im, lb = idx.load_arrays(small_dir, "train")
    np.testing.assert_array_equal(im, TRAIN_IMAGES)
    np.testing.assert_array_equal(lb, TRAIN_LABELS)
    im, lb = idx.load_arrays(write_dataset(tmp_path / "gz", gz=True), "all")
    np.testing.assert_array_equal(im, np.concatenate([TRAIN_IMAGES, TEST_IMAGES]))
    np.testing.assert_array_equal(lb, np.concatenate([TRAIN_LABELS, TEST_LABELS]))
    bad = write_dataset(tmp_path / "bad")
    write_idx(os.path.join(bad, idx.TEST_LABELS), TEST_LABELS[:-1])
    with pytest.raises(UserError, match="counts must match") as e:
        idx.load_arrays(bad, "test")
    assert idx.TEST_LABELS in str(e.value)
    with pytest.raises(UserError, match="usage"):
        idx.load_arrays(small_dir, "valid")


def test_importing_data_does_not_import_mindspore():
    code = "import sys, ddpm_ms.data; assert 'mindspore' not in sys.modules"
    root = os.path.dirname(os.path.dirname(os.path.dirname(data.__file__)))  # ddpm_ms/data/__init__.py
    env = dict(os.environ, PYTHONPATH=root)
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# --------------------------------------------------------------------------- locate

@pytest.fixture
def places(tmp_path):
    """Empty cache dir and system dir paths (not created), plus a downloader that fails."""
    class P:
        cache = str(tmp_path / "cache" / "fashion-mnist")
        system = str(tmp_path / "usr" / "share" / "datasets" / "fashion-mnist")
        root = tmp_path
    return P


def locate(places, **kw):
    kw.setdefault("cache_dir", places.cache)
    kw.setdefault("system_dirs", [places.system])
    kw.setdefault("download", False)
    kw.setdefault("downloader", Recorder(fail=True))
    return mnist.locate_fashion_mnist(**kw)


def test_locate_explicit_dir_wins(places):
    explicit = write_dataset(places.root / "mine")
    write_dataset(places.cache)
    write_dataset(places.system, gz=True)
    rec = Recorder()
    assert locate(places, data_dir=explicit, download=True, downloader=rec) == explicit
    assert rec.urls == []


def test_locate_explicit_gz_dir_is_decompressed_into_cache(places):
    explicit = write_dataset(places.root / "mine", gz=True)
    got = locate(places, data_dir=explicit)
    assert got == places.cache
    assert_holds_dataset(got)
    assert sorted(os.listdir(got)) == sorted(idx.FILES)  # no temp files left


def test_locate_explicit_mixed_dir(places):
    explicit = write_dataset(places.root / "mine")
    os.remove(os.path.join(explicit, idx.TEST_IMAGES))
    write_idx(os.path.join(explicit, idx.TEST_IMAGES + ".gz"), TEST_IMAGES, gz=True)
    assert_holds_dataset(locate(places, data_dir=explicit))


def test_locate_explicit_unusable_dir_does_not_fall_back(places):
    write_dataset(places.cache)  # a perfectly good cache is NOT used
    explicit = write_dataset(places.root / "mine")
    bad = os.path.join(explicit, idx.TRAIN_IMAGES)
    with open(bad, "r+b") as f:
        f.truncate(1000)
    with pytest.raises(UserError) as e:
        locate(places, data_dir=explicit)
    msg = str(e.value)
    assert explicit in msg and bad in msg and "truncated" in msg and "--data-dir" in msg
    with pytest.raises(UserError, match="no such directory"):
        locate(places, data_dir=str(places.root / "missing"))


def test_locate_uses_cache_before_system_dir(places):
    write_dataset(places.cache)
    os.makedirs(places.system)  # empty: would fail
    assert locate(places) == places.cache


def test_locate_decompresses_gz_in_cache(places):
    write_dataset(places.cache, gz=True)
    assert locate(places) == places.cache
    assert_holds_dataset(places.cache)


def test_locate_debian_dir_is_decompressed_into_cache(places):
    write_dataset(places.system, gz=True)
    before = sorted(os.listdir(places.system))
    got = locate(places)
    assert got == places.cache
    assert_holds_dataset(got)
    assert sorted(os.listdir(got)) == sorted(idx.FILES)  # atomic: no temp files left
    assert sorted(os.listdir(places.system)) == before  # system dir untouched
    # Second call: served from the cache even when the system dir has gone.
    for name in before:
        os.remove(os.path.join(places.system, name))
    assert locate(places) == places.cache


def test_locate_corrupt_debian_file_is_not_cached(places):
    write_dataset(places.system, gz=True)
    with open(os.path.join(places.system, idx.TEST_LABELS + ".gz"), "wb") as f:
        f.write(gzip.compress(idx_bytes(TEST_LABELS, magic=0x0801FFFF)))
    with pytest.raises(UserError, match="magic"):
        locate(places)
    assert not os.path.exists(os.path.join(places.cache, idx.TRAIN_IMAGES))


def test_locate_missing_everywhere_lists_every_place(places):
    other = str(places.root / "other-system")
    rec = Recorder(fail=True)
    with pytest.raises(UserError) as e:
        locate(places, system_dirs=[places.system, other], download=True, downloader=rec)
    msg = str(e.value)
    assert "\n" not in msg
    for expected in (places.cache, places.system, other, mnist.FASHION_MNIST_MIRROR,
                     "network is unreachable", "--data-dir",
                     "apt-get install dataset-fashion-mnist"):
        assert expected in msg, expected
    assert len(rec.urls) == 1


def test_locate_download_not_called_when_disabled(places):
    rec = Recorder()
    with pytest.raises(UserError) as e:
        locate(places, download=False, downloader=rec)
    assert rec.urls == []
    assert "download" in str(e.value) and places.cache in str(e.value)
    assert not os.path.exists(places.cache)


def test_locate_download_fetches_verifies_and_decompresses(places):
    rec = Recorder()
    got = locate(places, download=True, downloader=rec, checksums=Recorder.checksums())
    assert got == places.cache
    assert sorted(rec.urls) == sorted(mnist.FASHION_MNIST_MIRROR + n + ".gz" for n in idx.FILES)
    assert_holds_dataset(got)
    assert sorted(os.listdir(got)) == sorted(idx.FILES)
    # Now cached: no second download.
    rec2 = Recorder()
    assert locate(places, download=True, downloader=rec2) == places.cache
    assert rec2.urls == []


def test_locate_download_md5_mismatch(places):
    rec = Recorder(corrupt=idx.TRAIN_LABELS)
    with pytest.raises(UserError, match="MD5 mismatch") as e:
        locate(places, download=True, downloader=rec, checksums=Recorder.checksums())
    assert idx.TRAIN_LABELS + ".gz" in str(e.value)
    assert not os.path.exists(os.path.join(places.cache, idx.TRAIN_LABELS + ".gz"))
    # The real checksums reject the synthetic files too.
    with pytest.raises(UserError, match=mnist.FASHION_MNIST_MD5[idx.TRAIN_IMAGES + ".gz"]):
        locate(places, download=True, downloader=Recorder())


def test_default_cache_dir(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_MS_DATA", str(tmp_path / "d"))
    assert mnist.default_cache_dir() == str(tmp_path / "d")
    monkeypatch.delenv("DDPM_MS_DATA")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "x"))
    assert mnist.default_cache_dir() == str(tmp_path / "x" / "ddpm_ms" / "fashion-mnist")
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "h"))
    assert mnist.default_cache_dir() == str(tmp_path / "h" / ".cache" / "ddpm_ms" /
                                            "fashion-mnist")


def test_locate_default_cache_from_env(monkeypatch, tmp_path):
    monkeypatch.setenv("DDPM_MS_DATA", write_dataset(tmp_path / "envcache"))
    got = mnist.locate_fashion_mnist(system_dirs=[], download=False)
    assert got == str(tmp_path / "envcache")


# --------------------------------------------------------------------------- pipeline

def test_pipeline_shapes_and_value_mapping(small_dir):
    ds = data.create_dataset("fashion_mnist", small_dir, batch_size=8, random_flip=False, shuffle=False)
    assert ds.get_dataset_size() == N_TRAIN // 8
    assert ds.get_col_names() == ["image"]
    batches = [row[0] for row in ds.create_tuple_iterator(output_numpy=True, num_epochs=1)]
    assert len(batches) == N_TRAIN // 8
    for b in batches:
        assert b.shape == (8, 1, 28, 28) and b.dtype == np.float32
        assert b.min() >= -1.0 and b.max() <= 1.0
    got = np.concatenate(batches)[:, 0]
    src = TRAIN_IMAGES
    np.testing.assert_allclose(got, src / 255.0 * 2 - 1, atol=1e-6)
    assert np.all(got[src == 0] == -1.0) and np.all(got[src == 255] == 1.0)
    assert (src == 0).any() and (src == 255).any()


def test_pipeline_drop_remainder(small_dir):
    sizes = lambda ds: [r[0].shape[0] for r in ds.create_tuple_iterator(  # noqa: E731
        output_numpy=True, num_epochs=1)]
    ds = data.create_dataset("fashion_mnist", small_dir, batch_size=16, shuffle=False)
    assert ds.get_dataset_size() == 2 and sizes(ds) == [16, 16]
    ds = data.create_dataset("fashion_mnist", small_dir, batch_size=16, shuffle=False, drop_remainder=False)
    assert ds.get_dataset_size() == 3 and sizes(ds) == [16, 16, 8]


def test_pipeline_without_flip_never_flips(small_dir):
    rows = collect(data.create_dataset("fashion_mnist", small_dir, batch_size=10, random_flip=False, seed=3))
    assert sorted(i for i, _ in rows) == list(range(N_TRAIN))
    assert not any(f for _, f in rows)


def test_pipeline_with_flip_flips_some(small_dir, restore_seed):
    rows = collect(data.create_dataset("fashion_mnist", small_dir, batch_size=10, random_flip=True,
                                       shuffle=False, seed=0))
    assert [i for i, _ in rows] == list(range(N_TRAIN))  # each output: original or mirror
    flips = [f for _, f in rows]
    assert any(flips) and not all(flips)


def test_pipeline_seed_reproducible(small_dir, restore_seed):
    run = lambda s: collect(data.create_dataset("fashion_mnist",   # noqa: E731
        small_dir, batch_size=8, random_flip=True, shuffle=True, seed=s))
    a, b, c = run(7), run(7), run(8)
    assert a == b and a != c
    assert sorted(i for i, _ in a) == list(range(N_TRAIN))
    assert [i for i, _ in a] != list(range(N_TRAIN))  # really shuffled


@pytest.mark.parametrize("shuffle", [False, True])
def test_pipeline_shards_are_disjoint(small_dir, shuffle):
    shards = [collect(data.create_dataset("fashion_mnist", small_dir, batch_size=4, random_flip=False,
                                          shuffle=shuffle, num_shards=2, shard_id=k))
              for k in (0, 1)]
    ids = [{i for i, _ in s} for s in shards]
    assert len(shards[0]) == len(shards[1]) == N_TRAIN // 2
    assert ids[0].isdisjoint(ids[1]) and ids[0] | ids[1] == set(range(N_TRAIN))


def test_pipeline_labels_and_test_split(small_dir):
    ds = data.create_dataset("fashion_mnist", small_dir, batch_size=4, random_flip=False, with_labels=True)
    assert ds.get_col_names() == ["image", "label"]
    row = next(ds.create_tuple_iterator(output_numpy=True, num_epochs=1))
    assert row[1].dtype == np.int32 and row[1].shape == (4,)
    rows = collect(ds, with_labels=True)
    assert all(label == TRAIN_LABELS[i] for i, _, label in rows)
    test = data.create_dataset("fashion_mnist", small_dir, batch_size=4, usage="test", shuffle=False,
                               random_flip=False, with_labels=True)
    labels = np.concatenate([r[1] for r in test.create_tuple_iterator(output_numpy=True,
                                                                      num_epochs=1)])
    np.testing.assert_array_equal(labels, TEST_LABELS)
    both = data.create_dataset("fashion_mnist", small_dir, batch_size=8, usage="all", random_flip=False)
    assert both.get_dataset_size() == (N_TRAIN + N_TEST) // 8


def test_pipeline_resize(small_dir):
    ds = data.create_dataset("fashion_mnist", small_dir, batch_size=4, image_size=32, shuffle=False)
    b = next(ds.create_tuple_iterator(output_numpy=True, num_epochs=1))[0]
    assert b.shape == (4, 1, 32, 32) and b.dtype == np.float32
    assert b.min() >= -1.0 and b.max() <= 1.0


def test_pipeline_user_errors(tmp_path, small_dir):
    train_only = write_dataset(tmp_path / "train_only")
    os.remove(os.path.join(train_only, idx.TEST_IMAGES))
    with pytest.raises(UserError, match=idx.TEST_IMAGES):
        data.create_dataset("fashion_mnist", train_only, batch_size=4, usage="test")
    with pytest.raises(UserError, match="larger than"):
        data.create_dataset("fashion_mnist", small_dir, batch_size=64)
    with pytest.raises(UserError, match="batch_size"):
        data.create_dataset("fashion_mnist", small_dir, batch_size=0)
    with pytest.raises(UserError, match="does not exist"):
        data.create_dataset("fashion_mnist", tmp_path / "nowhere", batch_size=4)
    with pytest.raises(UserError, match="together"):
        data.create_dataset("fashion_mnist", small_dir, batch_size=4, num_shards=2)
    gz_only = write_dataset(tmp_path / "gz_only", gz=True)
    with pytest.raises(UserError, match="decompress"):
        data.create_dataset("fashion_mnist", gz_only, batch_size=4)


# --------------------------------------------------------------------------- real data

@pytest.mark.skipif(not os.path.isdir(REAL_DIR), reason="dataset-fashion-mnist not installed")
def test_real_fashion_mnist(tmp_path):
    images, labels = idx.load_arrays(REAL_DIR, "train")
    assert images.shape == (60000, 28, 28) and images.dtype == np.uint8
    assert labels.shape == (60000,)
    np.testing.assert_array_equal(np.bincount(labels), [6000] * 10)
    assert images.max() == 255 and images.min() == 0
    # The Debian gz files go through locate into a cache, and the pipeline reads them.
    got = mnist.locate_fashion_mnist(cache_dir=tmp_path / "cache", system_dirs=[REAL_DIR],
                                     download=False)
    assert got == str(tmp_path / "cache")
    ds = data.create_dataset("fashion_mnist", got, batch_size=64, usage="test", shuffle=False,
                             random_flip=False, with_labels=True)
    assert ds.get_dataset_size() == 10000 // 64
    img, lab = next(ds.create_tuple_iterator(output_numpy=True, num_epochs=1))
    test_images, test_labels = idx.load_arrays(got, "test")
    np.testing.assert_allclose(img[:, 0], test_images[:64] / 255.0 * 2 - 1, atol=1e-6)
    np.testing.assert_array_equal(lab, test_labels[:64])


def test_orientation_script_measures_which_way_a_class_faces():
    """scripts/orientation.py (the evidence for random_flip: false on Fashion-MNIST): a class drawn
    only in its left half is 0% right-heavy with mirror asymmetry 1, its mirror 100% and 1, a
    symmetric class 0% (equal halves are not right-heavy) and 0, an even mix of both 50% and 0."""
    orientation = load_script("orientation")
    rng = np.random.default_rng(0)
    left = np.zeros((8, 3, 6, 10), np.uint8)
    left[:, :, :, :4] = rng.integers(1, 256, (8, 3, 6, 4))
    mirrored = left[..., ::-1]
    symmetric = np.zeros_like(left)
    symmetric[:, :, :, 4:6] = 200
    images = np.concatenate([left, mirrored, symmetric, left[:4], mirrored[:4]])
    labels = np.repeat([0, 1, 2, 3, 3], [8, 8, 8, 4, 4])
    rows = orientation.orientation(images, labels, 4)
    np.testing.assert_allclose(rows, [(0.0, 1.0), (1.0, 1.0), (0.0, 0.0), (0.5, 0.0)], atol=1e-12)

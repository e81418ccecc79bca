"""MNIST, CIFAR-10 and image folders: native-format files written here, decoded pixels, labels,
geometry and flips against NumPy/PIL references, locating and downloading, sharding."""

import gzip
import hashlib
import io
import os
import tarfile

import numpy as np
import pytest
from idx_files import FILE_NAMES, idx_bytes, write_idx
from PIL import Image

import ddpm_ms  # noqa: F401  (before mindspore: sets ONEDNN_MAX_CPU_ISA)
from ddpm_ms import data
from ddpm_ms.data import cifar10
from ddpm_ms.data import fetch
from ddpm_ms.data import folder
from ddpm_ms.data import idx
from ddpm_ms.data import mnist
from ddpm_ms.utils.errors import UserError


def rows(ds):
    return list(ds.create_tuple_iterator(output_numpy=True, num_epochs=1))


def to_uint8(batch):
    """[-1, 1] float NCHW back to exact uint8 NHWC (asserting the mapping is exact)."""
    u = (batch.astype(np.float64) + 1.0) / 2.0 * 255.0
    r = np.rint(u)
    assert np.abs(u - r).max() < 1e-3
    return r.astype(np.uint8).transpose(0, 2, 3, 1)


@pytest.fixture
def restore_seed():
    import mindspore.dataset as msds

    seed = msds.config.get_seed()
    yield
    msds.config.set_seed(seed)


# --------------------------------------------------------------------------- MNIST (IDX)

MN_TRAIN = np.random.default_rng(5).integers(0, 256, (24, 28, 28), dtype=np.uint8)
MN_TEST = np.random.default_rng(6).integers(0, 256, (8, 28, 28), dtype=np.uint8)
MN_LABELS = (np.arange(24) * 7 % 10).astype(np.uint8), (np.arange(8) % 10).astype(np.uint8)
MN_ARRAYS = dict(zip(FILE_NAMES, (MN_TRAIN, MN_LABELS[0], MN_TEST, MN_LABELS[1])))


def write_mnist(directory, gz=False):
    os.makedirs(directory, exist_ok=True)
    for name, arr in MN_ARRAYS.items():
        write_idx(os.path.join(directory, name + (".gz" if gz else "")), arr, gz=gz)
    return str(directory)


class GzServer:
    """A patched downloader serving the gz files of MN_ARRAYS; ``corrupt`` flips a byte of one."""

    def __init__(self, corrupt=None):
        self.urls, self.corrupt = [], corrupt

    def payload(self, name):
        return gzip.compress(idx_bytes(MN_ARRAYS[name]), mtime=0)

    def __call__(self, url, path):
        self.urls.append(url)
        name = url.rsplit("/", 1)[1][:-len(".gz")]
        payload = self.payload(name)
        if name == self.corrupt:
            payload = payload[:-1] + bytes([payload[-1] ^ 0xFF])
        with open(path, "wb") as f:
            f.write(payload)

    def md5s(self):
        return {n + ".gz": hashlib.md5(self.payload(n)).hexdigest() for n in MN_ARRAYS}


def test_mnist_pipeline_reads_idx_pixels_and_labels(tmp_path):
    d = write_mnist(tmp_path / "mnist")
    ds = data.create_dataset("mnist", d, batch_size=8, random_flip=False, shuffle=False, with_labels=True)
    got = rows(ds)
    images = np.concatenate([to_uint8(r[0]) for r in got])[..., 0]
    np.testing.assert_array_equal(images, MN_TRAIN)
    np.testing.assert_array_equal(np.concatenate([r[1] for r in got]), MN_LABELS[0])
    test = rows(data.create_dataset("mnist", d, batch_size=8, usage="test", random_flip=False, shuffle=False))
    np.testing.assert_array_equal(to_uint8(test[0][0])[..., 0], MN_TEST)
    images, labels = data.load_split("mnist", d, "test")
    assert images.shape == (8, 1, 28, 28) and images.dtype == np.uint8
    np.testing.assert_array_equal(images[:, 0], MN_TEST)
    np.testing.assert_array_equal(labels, MN_LABELS[1])


@pytest.mark.parametrize("shuffle", [False, True])
def test_mnist_shards_are_disjoint(tmp_path, shuffle):
    d = write_mnist(tmp_path / "mnist")
    table = {im.tobytes(): i for i, im in enumerate(MN_TRAIN)}
    seen = []
    for k in range(3):
        ds = data.create_dataset("mnist", d, batch_size=4, random_flip=False, shuffle=shuffle, num_shards=3,
                                 shard_id=k)
        seen.append({table[im[..., 0].tobytes()] for r in rows(ds) for im in to_uint8(r[0])})
    assert [len(s) for s in seen] == [8, 8, 8]
    assert set.union(*seen) == set(range(24)) and not (seen[0] & seen[1] or seen[1] & seen[2])


def test_mnist_download_verifies_md5_and_decompresses(tmp_path):
    server = GzServer()
    got = mnist.locate_mnist(cache_dir=tmp_path / "cache", system_dirs=[], downloader=server,
                             checksums=server.md5s())
    assert got == str(tmp_path / "cache")
    assert server.urls == [mnist.MNIST_MIRROR + n + ".gz" for n in FILE_NAMES]
    for name, arr in MN_ARRAYS.items():
        np.testing.assert_array_equal(idx.read_idx(os.path.join(got, name)), arr)
    assert not any(n.endswith((".gz", ".part")) for n in os.listdir(got))


def test_mnist_download_md5_mismatch_is_one_error_and_leaves_nothing(tmp_path):
    server = GzServer(corrupt=FILE_NAMES[2])
    with pytest.raises(UserError, match="MD5 mismatch") as e:
        mnist.locate_mnist(cache_dir=tmp_path / "cache", system_dirs=[], downloader=server, checksums=server.md5s())
    assert "MNIST not found" in str(e.value) and "\n" not in str(e.value)
    assert not any(n.startswith(FILE_NAMES[2]) for n in os.listdir(tmp_path / "cache"))
    # the published MD5s are the default: the served files (not the real ones) fail them
    with pytest.raises(UserError, match=mnist.MNIST_MD5[FILE_NAMES[0] + ".gz"]):
        mnist.locate_mnist(cache_dir=tmp_path / "cache2", system_dirs=[], downloader=GzServer())


def test_mnist_gz_data_dir_and_missing_files(tmp_path):
    got = mnist.locate_mnist(write_mnist(tmp_path / "gz", gz=True), cache_dir=tmp_path / "cache", download=False)
    np.testing.assert_array_equal(idx.read_idx(os.path.join(got, FILE_NAMES[0])), MN_TRAIN)
    with pytest.raises(UserError, match="MNIST data dir .* is unusable"):
        mnist.locate_mnist(tmp_path / "nothing_here", cache_dir=tmp_path / "c2", download=False)


# --------------------------------------------------------------------------- CIFAR-10 (binary)

def cifar_records(seed, label_offset):
    """10000 records: label byte, then R, G, B planes (row-major); image i holds i in its first pixels."""
    rng = np.random.default_rng(seed)
    planes = rng.integers(0, 256, (cifar10.RECORDS, 3, 32, 32), dtype=np.uint8)
    idx = np.arange(cifar10.RECORDS)
    planes[:, 0, 0, 0], planes[:, 0, 0, 1] = idx % 256, idx // 256  # R of the first two pixels: the index
    labels = ((idx + label_offset) % 10).astype(np.uint8)
    raw = np.concatenate([labels[:, None], planes.reshape(cifar10.RECORDS, -1)], axis=1)
    return raw, planes, labels


@pytest.fixture(scope="module")
def cifar(tmp_path_factory):
    """Full-size batch files (Cifar10Dataset rejects others): data_batch_1.bin and test_batch.bin."""
    d = tmp_path_factory.mktemp("cifar")
    out = {}
    for name, seed, off in (("data_batch_1.bin", 1, 0), ("test_batch.bin", 2, 3)):
        raw, planes, labels = cifar_records(seed, off)
        raw.tofile(d / name)
        out[name] = (planes, labels)
    return str(d), out


def image_index(hwc):
    return int(hwc[0, 0, 0]) + 256 * int(hwc[0, 1, 0])


def test_cifar_numpy_reader_follows_the_record_layout(cifar):
    d, arrays = cifar
    images, labels = cifar10.load_arrays(d, "test")
    planes, want_labels = arrays["test_batch.bin"]
    assert images.shape == (10000, 32, 32, 3)
    np.testing.assert_array_equal(images, planes.transpose(0, 2, 3, 1))  # [i, y, x, c] = plane c, row y, col x
    np.testing.assert_array_equal(labels, want_labels)
    chw, lab = data.load_split("cifar10", d, "train")
    np.testing.assert_array_equal(chw[:5], arrays["data_batch_1.bin"][0][:5])
    assert lab.dtype == np.int64 and chw.shape == (10000, 3, 32, 32)


def test_cifar_pipeline_matches_the_records(cifar):
    d, arrays = cifar
    ds = data.create_dataset("cifar10", d, batch_size=500, usage="test", random_flip=False, shuffle=False,
                             with_labels=True)
    assert ds.get_dataset_size() == 20
    first = rows(ds)[:2]
    planes, labels = arrays["test_batch.bin"]
    for k, (im, lb) in enumerate(first):
        assert im.shape == (500, 3, 32, 32) and im.dtype == np.float32 and lb.dtype == np.int32
        np.testing.assert_allclose(im, planes[500 * k:500 * (k + 1)] / 127.5 - 1.0, atol=1e-6)
        np.testing.assert_array_equal(lb, labels[500 * k:500 * (k + 1)])


def test_cifar_flips_and_shards(cifar, restore_seed):
    d, arrays = cifar
    planes = arrays["data_batch_1.bin"][0].transpose(0, 2, 3, 1)
    seen, flipped = [], 0
    for k in (0, 1):
        ds = data.create_dataset("cifar10", d, batch_size=1000, random_flip=True, shuffle=True, seed=4,
                                 num_shards=2, shard_id=k)
        ids = []
        for r in rows(ds)[:2]:
            for im in to_uint8(r[0]):
                i = image_index(im) % 10000
                if not np.array_equal(im, planes[i]):  # mirrored: the index pixels are in the last column
                    i = image_index(im[:, ::-1])
                    np.testing.assert_array_equal(im[:, ::-1], planes[i])
                    flipped += 1
                ids.append(i)
        seen.append(set(ids))
        assert len(ids) == len(set(ids)) == 2000
    assert not seen[0] & seen[1]
    assert 1700 < flipped < 2300  # p = 0.5 of 4000


def test_cifar_bad_files_and_locating(cifar, tmp_path):
    d, _ = cifar
    short = tmp_path / "short"
    short.mkdir()
    cifar_records(3, 0)[0][:500].tofile(short / "data_batch_1.bin")
    with pytest.raises(UserError, match=r"data_batch_1.bin: 1536500 bytes, expected 30730000"):
        data.create_dataset("cifar10", str(short), batch_size=4)
    with pytest.raises(UserError, match="test_batch.bin: file does not exist"):
        data.create_dataset("cifar10", str(short), batch_size=4, usage="test")
    assert data.locate("cifar10", d) == d  # an explicit dir with the batch files is used as is
    with pytest.raises(UserError, match="CIFAR-10 data dir .* is unusable"):
        cifar10.locate_cifar10(str(short), cache_dir=tmp_path / "cache", download=False)
    with pytest.raises(UserError, match="channel"):
        data.create_dataset("cifar10", d, batch_size=4, channels=1)


@pytest.fixture(scope="module")
def cifar_archive(tmp_path_factory):
    """The archive layout, cifar-10-batches-bin/<six full-size files>, of constant records (they
    compress to almost nothing); each file's label byte is its index."""
    path = tmp_path_factory.mktemp("archive") / cifar10.ARCHIVE
    with tarfile.open(path, "w:gz", compresslevel=1) as tar:
        for k, name in enumerate(cifar10.SPLITS["all"]):
            payload = np.full((cifar10.RECORDS, cifar10.RECORD_BYTES), k, np.uint8).tobytes()
            info = tarfile.TarInfo(f"{cifar10.ARCHIVE_DIR}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
        info = tarfile.TarInfo("../evil.txt")  # never extracted
        info.size = 4
        tar.addfile(info, io.BytesIO(b"evil"))
    return str(path)


def test_cifar_download_md5_failure_then_success(cifar_archive, tmp_path):
    served = []

    def downloader(url, dest):
        served.append(url)
        with open(cifar_archive, "rb") as src, open(dest, "wb") as out:
            out.write(src.read())

    cache = tmp_path / "cache"
    with pytest.raises(UserError, match="MD5 mismatch") as e:  # the published MD5 of the real archive
        cifar10.locate_cifar10(cache_dir=cache, downloader=downloader)
    assert "CIFAR-10 not found" in str(e.value) and "\n" not in str(e.value)
    assert not any(n.endswith((".part", ".tar.gz")) for n in os.listdir(cache))
    got = cifar10.locate_cifar10(cache_dir=cache, downloader=downloader, checksum=fetch.md5(cifar_archive))
    assert got == str(cache) and served == [cifar10.URL] * 2
    assert sorted(os.listdir(cache)) == sorted(cifar10.SPLITS["all"])  # no archive, no evil.txt
    assert not os.path.exists(tmp_path / "evil.txt")
    assert cifar10.validate_dir(got, "all") == 60000
    _, labels = cifar10.load_arrays(got, "all")
    np.testing.assert_array_equal(np.unique(labels), np.arange(6))
    # an explicit archive is extracted into the cache as well
    assert cifar10.locate_cifar10(cifar_archive, cache_dir=tmp_path / "c2", download=False) == str(tmp_path / "c2")


# --------------------------------------------------------------------------- image folders

RNG = np.random.default_rng(11)
RGB_40x50 = RNG.integers(0, 256, (50, 40, 3), dtype=np.uint8)      # H 50, W 40
GRAY_32x32 = RNG.integers(0, 256, (32, 32), dtype=np.uint8)
RGBA_64x32 = RNG.integers(0, 256, (32, 64, 4), dtype=np.uint8)     # H 32, W 64: no resize, crop x 16..47
RGB_128x64 = RNG.integers(0, 256, (64, 128, 3), dtype=np.uint8)    # halved to 32x64, crop x 16..47
WEBP_33x40 = RNG.integers(0, 256, (40, 33, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def mixed(tmp_path_factory):
    """Two class folders, nested, mixed formats and sizes, a corrupt PNG and a text file."""
    root = tmp_path_factory.mktemp("mixed")
    (root / "cats" / "nested").mkdir(parents=True)
    (root / "dogs").mkdir()
    Image.fromarray(RGB_40x50).save(root / "cats" / "a.png")
    Image.fromarray(GRAY_32x32).save(root / "cats" / "nested" / "b.bmp")
    Image.fromarray(RGB_128x64).save(root / "cats" / "nested" / "c.JPG", quality=95)
    Image.fromarray(RGBA_64x32, "RGBA").save(root / "dogs" / "d.png")
    Image.fromarray(WEBP_33x40).save(root / "dogs" / "e.webp", lossless=True)
    good = (root / "cats" / "a.png").read_bytes()
    (root / "dogs" / "broken.png").write_bytes(good[:len(good) // 2])
    (root / "dogs" / "notes.txt").write_text("not an image")
    (root / ".hidden.png").write_bytes(b"ignored")
    return str(root)


def over_white(rgba):
    rgb, a = rgba[..., :3].astype(np.float64), rgba[..., 3:].astype(np.float64) / 255.0
    return np.rint(rgb * a + 255.0 * (1.0 - a)).astype(np.uint8)


def test_folder_scan_labels_and_one_warning(mixed, capsys):
    folder._SCANS.clear()
    index = folder.scan_folder(mixed)
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "skipped 2 of 7 files" in err[0]
    assert "dogs/broken.png (cannot decode" in err[0] and "dogs/notes.txt (not an image" in err[0]
    assert [os.path.relpath(f, mixed) for f in index.files] == [
        "cats/a.png", "cats/nested/b.bmp", "cats/nested/c.JPG", "dogs/d.png", "dogs/e.webp"]
    assert index.class_names == ("cats", "dogs") and index.labels.tolist() == [0, 0, 0, 1, 1]
    folder.scan_folder(mixed)  # remembered: no second warning
    assert capsys.readouterr().err == ""
    spec = data.dataset_spec("folder", mixed, 32, 3)
    assert spec.num_classes == 2 and spec.class_names == ("cats", "dogs") and spec.channels == 3


def folder_images(root, size, channels, **kw):
    ds = data.create_dataset("folder", root, batch_size=1, image_size=size, channels=channels, shuffle=False,
                             with_labels=True, **kw)
    got = rows(ds)
    return [to_uint8(r[0])[0] for r in got], [int(r[1][0]) for r in got]


def test_folder_decoded_pixels_and_geometry_rgb(mixed):
    images, labels = folder_images(mixed, 32, 3, random_flip=False)
    assert labels == [0, 0, 0, 1, 1] and all(im.shape == (32, 32, 3) for im in images)
    # a.png 40x50 -> shorter side 32: 32x40 (round(50 * 32 / 40) = 40) -> rows 4..35
    ref = np.asarray(Image.fromarray(RGB_40x50).resize((32, 40), Image.BILINEAR))[4:36]
    np.testing.assert_array_equal(images[0], ref)
    np.testing.assert_array_equal(images[1], np.repeat(GRAY_32x32[:, :, None], 3, axis=2))  # gray replicated
    with Image.open(os.path.join(mixed, "cats", "nested", "c.JPG")) as jpg:  # lossy: against its own decode
        ref = np.asarray(jpg.convert("RGB").resize((64, 32), Image.BILINEAR))[:, 16:48]
    np.testing.assert_array_equal(images[2], ref)
    # RGBA over white, 64x32 -> no resize, centre columns 16..47 (exact)
    np.testing.assert_allclose(images[3].astype(int), over_white(RGBA_64x32)[:, 16:48].astype(int), atol=1)
    # webp 33x40 (lossless) -> 32x39 (round(40 * 32 / 33) = 39) -> rows 3..34
    ref = np.asarray(Image.fromarray(WEBP_33x40).resize((32, 39), Image.BILINEAR))[3:35]
    np.testing.assert_array_equal(images[4], ref)


def test_folder_gray_conversion_uses_luma(mixed):
    images, _ = folder_images(mixed, 32, 1, random_flip=False)
    assert all(im.shape == (32, 32, 1) for im in images)
    np.testing.assert_array_equal(images[1][..., 0], GRAY_32x32)
    rgba = over_white(RGBA_64x32)[:, 16:48].astype(np.float64)
    luma = rgba @ np.array([0.299, 0.587, 0.114])  # ITU-R 601-2
    np.testing.assert_allclose(images[3][..., 0], luma, atol=1.5)


def test_folder_random_crop_windows_and_flips(mixed, restore_seed):
    wide = over_white(RGBA_64x32)  # d.png: 64 wide after conversion, height 32: windows x = 0..32
    offsets, flips = set(), 0
    for seed in range(12):
        images, _ = folder_images(mixed, 32, 3, random_flip=True, center_crop=False, seed=seed)
        im = images[3].astype(int)
        for x in range(33):
            win = wide[:, x:x + 32].astype(int)
            if np.abs(im - win).max() <= 1:
                offsets.add(x)
                break
            if np.abs(im - win[:, ::-1]).max() <= 1:
                offsets.add(x)
                flips += 1
                break
        else:
            raise AssertionError(f"seed {seed}: output is no 32x32 window of the image, nor a mirrored one")
    assert len(offsets) >= 4 and 0 < flips < 12


def test_folder_shards_and_unconditional_layout(tmp_path):
    root = tmp_path / "flat"
    (root / "deeper").mkdir(parents=True)
    colours = np.arange(10, dtype=np.uint8) * 20
    for i, c in enumerate(colours):
        where = root / "deeper" if i % 3 == 0 else root
        Image.fromarray(np.full((8, 8, 3), c, np.uint8)).save(where / f"{i}.png")
    spec = data.dataset_spec("folder", str(root), 8, 3)
    assert spec.class_names is None and spec.num_classes is None  # images at the top: no classes
    seen = []
    for k in (0, 1):
        ds = data.create_dataset("folder", str(root), batch_size=5, image_size=8, channels=3, num_shards=2, shard_id=k,
                                 random_flip=False)
        seen.append({int(im[0, 0, 0]) for r in rows(ds) for im in to_uint8(r[0])})
    assert len(seen[0]) == len(seen[1]) == 5 and seen[0] | seen[1] == set(colours.tolist())


def test_folder_errors(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="is empty"):
        data.locate("folder", tmp_path / "empty")
    (tmp_path / "text").mkdir()
    (tmp_path / "text" / "a.txt").write_text("x")
    (tmp_path / "text" / "b.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match="holds no usable images .*a.txt .*b.png"):
        data.locate("folder", tmp_path / "text")
    with pytest.raises(UserError, match="does not exist"):
        data.locate("folder", tmp_path / "missing")
    with pytest.raises(UserError, match="needs data_dir"):
        data.locate("folder", None)
    with pytest.raises(UserError, match="unknown dataset"):
        data.locate("imagenet", None)


# --------------------------------------------------------------------------- downstream: evaluation inputs

def test_evaluate_reads_rgb_arrays_and_png_folders(tmp_path):
    from ddpm_ms.evaluate import load_samples

    spec = data.dataset_spec("cifar10")
    rgb = np.random.default_rng(3).integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    np.save(tmp_path / "nhwc.npy", rgb)
    np.save(tmp_path / "nchw.npy", rgb.transpose(0, 3, 1, 2).astype(np.float32) / 127.5 - 1)
    np.testing.assert_array_equal(load_samples(str(tmp_path / "nhwc.npy"), spec), rgb.transpose(0, 3, 1, 2))
    np.testing.assert_allclose(load_samples(str(tmp_path / "nchw.npy"), spec), rgb.transpose(0, 3, 1, 2) / 127.5 - 1,
                               atol=1e-6)
    pngs = tmp_path / "pngs"
    pngs.mkdir()
    for i, im in enumerate(rgb):
        Image.fromarray(im).save(pngs / f"{i}.png")
    np.testing.assert_array_equal(load_samples(str(pngs), spec), rgb.transpose(0, 3, 1, 2))
    np.save(tmp_path / "gray.npy", rgb[..., 0])
    with pytest.raises(UserError, match=r"1 channel.*expected \[N, 3, 32, 32\]"):
        load_samples(str(tmp_path / "gray.npy"), spec)
    with pytest.raises(UserError, match="expected 28x28"):
        load_samples(str(tmp_path / "gray.npy"))  # Fashion-MNIST by default
    np.save(tmp_path / "small.npy", rgb[:, :28, :28])
    with pytest.raises(UserError, match="expected 32x32"):
        load_samples(str(tmp_path / "small.npy"), spec)


def test_classifier_per_dataset_shapes_and_cache(tmp_path, monkeypatch):
    import mindspore as ms

    from ddpm_ms.evaluation import classifier as C

    net = C.create_classifier("cifar10")
    assert net.input_shape == (3, 32)
    feats, probs = C.extract(net, np.zeros((3, 3, 32, 32), np.uint8), batch_size=3)
    assert feats.shape == (3, C.FEATURE_DIM) and probs.shape == (3, 10)
    with pytest.raises(UserError, match=r"\[N, 3, 32, 32\]"):
        C.extract(net, np.zeros((3, 1, 28, 28), np.uint8))
    keys = {d: C.cache_key(dataset=d) for d in ("fashion_mnist", "mnist", "cifar10")}
    assert keys["fashion_mnist"] == C.cache_key() and len(set(keys.values())) == 3
    # trained once per dataset, cached under its own key, and rebuilt with the dataset's shape
    ms.set_seed(0)
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: (C.create_classifier(k["dataset"]), 0.9))
    monkeypatch.setattr("ddpm_ms.data.locate", lambda *a, **k: "unused")
    net1, info = C.load_or_train_classifier(cache_dir=str(tmp_path), dataset="cifar10", log=None)
    assert info["dataset"] == "cifar10" and os.listdir(tmp_path) == [keys["cifar10"] + ".ckpt"]
    monkeypatch.setattr(C, "train_classifier", lambda *a, **k: pytest.fail("retrained"))
    net2, _ = C.load_or_train_classifier(cache_dir=str(tmp_path), dataset="cifar10", log=None)
    x = np.random.default_rng(1).integers(0, 256, (2, 3, 32, 32), dtype=np.uint8)
    np.testing.assert_allclose(C.extract(net1, x)[0], C.extract(net2, x)[0], rtol=1e-5, atol=1e-5)
    with pytest.raises(UserError, match="no feature network exists for dataset 'folder'"):
        C.load_or_train_classifier(cache_dir=str(tmp_path), dataset="folder", log=None)


def test_to_display_gray_and_rgb():
    from ddpm_ms.utils.visualize import make_grid, to_display

    rgb = np.random.default_rng(4).uniform(-1.2, 1.2, (3, 5, 7)).astype(np.float32)
    np.testing.assert_allclose(to_display(rgb), np.clip((rgb.transpose(1, 2, 0) + 1) / 2, 0, 1), atol=1e-7)
    assert to_display(rgb[:1]).shape == (5, 7)
    assert make_grid(rgb[None].repeat(2, 0), nrow=2).shape == (5 + 4, 2 * 7 + 6, 3)

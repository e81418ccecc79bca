"""Several processes locating one empty dataset cache at once (msrun starts the training command in
every worker and in its scheduler): exactly one downloads, the others wait and use its result.

Each child process calls the real locator with a fake downloader that streams files written here
slowly (so the downloads overlap) and leaves one marker file per call in a shared directory. The
children start together (they wait for a "go" file), so the races really happen.
"""

import gzip
import hashlib
import io
import json
import os
import subprocess
import sys
import tarfile
import time

import numpy as np
from idx_files import FILE_NAMES, idx_bytes

from ddpm_ms.data import cifar10
from ddpm_ms.data import fetch
from ddpm_ms.data import idx
from ddpm_ms.data import mnist

PROCESSES = 6
SMALL = (np.zeros((2, 28, 28), np.uint8), np.arange(2), np.ones((1, 28, 28), np.uint8), np.arange(1))

CHILD = r"""
import json, os, sys, time, uuid

args = json.loads(sys.argv[1])
from ddpm_ms.data import cifar10, mnist


def downloader(url, dest):
    name = url.rsplit("/", 1)[1]
    with open(os.path.join(args["calls"], f"{os.getpid()}-{uuid.uuid4().hex}"), "w") as f:
        f.write(name)
    with open(os.path.join(args["served"], name), "rb") as f:
        payload = f.read()
    step = max(1, len(payload) // 6)
    with open(dest, "wb") as out:  # slowly: the other processes run meanwhile
        for i in range(0, len(payload), step):
            out.write(payload[i:i + step])
            out.flush()
            time.sleep(0.02)


open(os.path.join(args["ready"], str(os.getpid())), "w").close()
while not os.path.exists(args["go"]):
    time.sleep(0.005)
if args["dataset"] == "cifar10":
    got = cifar10.locate_cifar10(cache_dir=args["cache"], downloader=downloader, checksum=args["md5"],
                                 url=args["url"])
else:
    got = mnist.locate_idx(args["dataset"], cache_dir=args["cache"], system_dirs=[], downloader=downloader,
                           checksums=args["md5"], mirror=args["url"])
print(json.dumps(got))
"""


def run_concurrently(tmp_path, **args):
    """Start PROCESSES children at once; returns (their results, the names the downloader was called for)."""
    for d in ("ready", "calls"):
        os.makedirs(tmp_path / d)
    args.update(ready=str(tmp_path / "ready"), calls=str(tmp_path / "calls"), go=str(tmp_path / "go"))
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(args)], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(PROCESSES)]
    try:
        deadline = time.monotonic() + 30
        while len(os.listdir(tmp_path / "ready")) < PROCESSES and time.monotonic() < deadline:
            if any(p.poll() is not None for p in procs):
                break
            time.sleep(0.01)
        (tmp_path / "go").touch()
        outs = [p.communicate(timeout=60) + (p.returncode,) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    failed = [(err.strip().splitlines() or ["?"])[-1].split(". Fix:")[0][-170:] for _, err, rc in outs if rc != 0]
    assert not failed, f"{len(failed)} of {PROCESSES} processes failed: {failed}"
    results = [json.loads(out.strip().splitlines()[-1]) for out, _, _ in outs]
    calls = sorted((tmp_path / "calls" / n).read_text() for n in os.listdir(tmp_path / "calls"))
    return results, calls


def test_concurrent_idx_locators_download_once(tmp_path):
    rng = np.random.default_rng(3)
    arrays = dict(zip(FILE_NAMES, (rng.integers(0, 256, (64, 28, 28), dtype=np.uint8), rng.integers(0, 10, 64),
                                   rng.integers(0, 256, (16, 28, 28), dtype=np.uint8), rng.integers(0, 10, 16))))
    served = tmp_path / "served"
    served.mkdir()
    md5 = {}
    for name, arr in arrays.items():
        payload = gzip.compress(idx_bytes(arr), mtime=0)
        (served / (name + ".gz")).write_bytes(payload)
        md5[name + ".gz"] = hashlib.md5(payload).hexdigest()
    cache = tmp_path / "cache" / "fashion-mnist"  # neither it nor its parent exists yet

    results, calls = run_concurrently(tmp_path, dataset="fashion_mnist", cache=str(cache), served=str(served),
                                      md5=md5, url="http://mirror.invalid/fashion/")

    assert results == [str(cache)] * PROCESSES
    assert calls == sorted(n + ".gz" for n in FILE_NAMES)  # one download per file in total
    assert sorted(os.listdir(cache)) == sorted(FILE_NAMES)  # no .gz, .part or temporary file left
    assert idx.validate_dir(str(cache), "all") == 80
    for name, arr in arrays.items():
        np.testing.assert_array_equal(idx.read_idx(str(cache / name)), arr.astype(np.uint8))


def test_concurrent_cifar10_locators_download_once(tmp_path):
    """The archive holds six full-size batch files of constant records (they compress to almost nothing)."""
    served = tmp_path / "served"
    served.mkdir()
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz", compresslevel=1) as tar:
        for k, name in enumerate(cifar10.SPLITS["all"]):
            payload = np.full((cifar10.RECORDS, cifar10.RECORD_BYTES), k, np.uint8).tobytes()
            info = tarfile.TarInfo(f"{cifar10.ARCHIVE_DIR}/{name}")
            info.size = len(payload)
            tar.addfile(info, io.BytesIO(payload))
    (served / cifar10.ARCHIVE).write_bytes(buf.getvalue())
    cache = tmp_path / "cache" / "cifar-10"

    results, calls = run_concurrently(tmp_path, dataset="cifar10", cache=str(cache), served=str(served),
                                      md5=hashlib.md5(buf.getvalue()).hexdigest(),
                                      url="http://mirror.invalid/" + cifar10.ARCHIVE)

    assert results == [str(cache)] * PROCESSES
    assert calls == [cifar10.ARCHIVE]
    assert sorted(os.listdir(cache)) == sorted(cifar10.SPLITS["all"])  # no archive, .part or temporary file
    assert cifar10.validate_dir(str(cache), "all") == 60000
    for k, name in enumerate(cifar10.SPLITS["all"]):
        with open(cache / name, "rb") as f:
            assert set(f.read(2 * cifar10.RECORD_BYTES)) == {k}


def test_lock_that_cannot_be_created_is_skipped(tmp_path, monkeypatch):
    """No lock (e.g. a read-only directory beside the cache): locating works unlocked, as before."""
    (tmp_path / "file").write_text("")
    monkeypatch.setattr(fetch, "lock_path", lambda d: str(tmp_path / "file" / "x.lock"))  # ENOTDIR, even as root
    with fetch.cache_lock(str(tmp_path / "cache")):
        pass
    payloads = {n + ".gz": gzip.compress(idx_bytes(a), mtime=0) for n, a in zip(FILE_NAMES, SMALL)}

    def downloader(url, dest):
        with open(dest, "wb") as f:
            f.write(payloads[url.rsplit("/", 1)[1]])

    cache = str(tmp_path / "cache")
    assert mnist.locate_mnist(cache_dir=cache, downloader=downloader, checksums={}) == cache
    assert sorted(os.listdir(cache)) == sorted(FILE_NAMES)
    assert mnist.locate_mnist(cache_dir=cache, download=False) == cache


def test_waiting_for_the_lock_prints_one_line(tmp_path):
    cache = str(tmp_path / "cache")
    code = ("import sys; from ddpm_ms.data import fetch\n"
            "with fetch.cache_lock(sys.argv[1], note_after=0.2):\n    print('locked')\n")
    with fetch.cache_lock(cache):
        assert os.path.isfile(fetch.lock_path(cache)) and not os.path.exists(cache)
        child = subprocess.Popen([sys.executable, "-c", code, cache], stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True)
        time.sleep(1.0)
        assert child.poll() is None  # waits while this process holds the lock
    out, err = child.communicate(timeout=30)
    assert child.returncode == 0 and out == "locked\n"
    assert err.count("\n") == 1 and f"waiting for another process to fill {cache}" in err

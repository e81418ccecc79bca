"""Atomic file writes (ddpm_ms.utils.fileio) and the loss log: a failed write leaves no partial file, a clear error."""

import errno
import os
import subprocess
import sys

import pytest

from ddpm_ms.utils import fileio
from ddpm_ms.utils.errors import WriteError
from ddpm_ms.training.rundir import CSV_FIELDS, CsvLog

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def names(directory):
    return sorted(os.listdir(directory))


def test_write_replaces_the_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "sub" / "a.txt"
    fileio.write_text(path, "one")
    fileio.write_text(path, "two")
    assert path.read_text() == "two" and names(path.parent) == ["a.txt"]


def test_a_failing_write_keeps_the_old_file_and_says_what_it_needed(tmp_path):
    path = tmp_path / "ckpt.bin"
    path.write_bytes(b"old")

    def write(tmp):  # half the data reaches the disk, then the disk is full
        with open(tmp, "wb") as f:
            f.write(b"x" * 3000)
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), tmp)

    with pytest.raises(WriteError) as info:
        fileio.atomic_write(path, write, "checkpoint", size=6000)
    e = info.value
    assert isinstance(e, OSError) and e.errno == errno.ENOSPC and e.filename == str(path) and e.needed == 6000
    free = fileio.format_bytes(fileio.free_bytes(str(tmp_path)))
    assert str(e).startswith(f"could not write checkpoint {path}: No space left on device (needs 5.9 KiB, ")
    assert str(e).endswith(" free)") and len(str(e).splitlines()) == 1
    assert free.split()[1] in str(e)  # the unit of the free space now (the amount may change meanwhile)
    assert path.read_bytes() == b"old" and names(tmp_path) == ["ckpt.bin"]


def test_other_exceptions_pass_through_and_clean_up(tmp_path):
    def write(tmp):
        open(tmp, "wb").close()
        raise RuntimeError("compiler failed")

    with pytest.raises(RuntimeError, match="compiler failed"):
        fileio.atomic_write(tmp_path / "k.so", write)
    assert names(tmp_path) == []


def test_a_real_kernel_error_is_a_write_error(tmp_path):
    """RLIMIT_FSIZE makes the kernel refuse bytes past 64 KiB (EFBIG): a real failing write(2)."""
    code = ("import resource, sys; from ddpm_ms.utils import fileio; from ddpm_ms.utils.errors import WriteError\n"
            "resource.setrlimit(resource.RLIMIT_FSIZE, (65536, 65536))\n"
            "try:\n    fileio.write_bytes(sys.argv[1], b'z' * 200000, 'samples')\n"
            "except WriteError as e:\n    print(e.errno, e); sys.exit(4)\n")
    target = tmp_path / "s.npy"
    proc = subprocess.run([sys.executable, "-c", code, str(target)], env=dict(os.environ, PYTHONPATH=ROOT),
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 4, proc.stderr
    assert proc.stdout.startswith(f"{errno.EFBIG} could not write samples {target}: File too large (needs 195.3 KiB")
    assert names(tmp_path) == []


def test_fault_hook_fails_the_nth_write_of_a_name(tmp_path, monkeypatch):
    monkeypatch.setenv(fileio.FAIL_ENV, "b.png:2, c.txt")
    monkeypatch.setattr(fileio, "_writes", {})
    fileio.write_bytes(tmp_path / "b.png", b"1")
    with pytest.raises(WriteError, match="injected"):
        fileio.write_bytes(tmp_path / "b.png", b"22")
    fileio.write_bytes(tmp_path / "b.png", b"333")
    with pytest.raises(WriteError):
        fileio.write_text(tmp_path / "c.txt", "x")
    assert (tmp_path / "b.png").read_bytes() == b"333" and names(tmp_path) == ["b.png"]


def test_loss_log_never_holds_half_a_row(tmp_path, monkeypatch):
    path = str(tmp_path / "loss.csv")
    monkeypatch.setenv(fileio.FAIL_ENV, "loss.csv:4")  # write 1 is the header; rows 1, 2 pass, row 3 fails
    monkeypatch.setattr(fileio, "_writes", {})
    log = CsvLog(path)
    log.write(1, 0, "0.5", "0.001", "1", 1)
    log.write(2, 0, "0.4", "0.001", "1", 1)
    row = "3,0,0.3,0.001,1,1\r\n"
    with pytest.raises(WriteError, match=rf"could not write loss log .*loss.csv: No space left on device .*\(needs "
                                         rf"{len(row)} bytes, "):
        log.write(3, 0, "0.3", "0.001", "1", 1)
    with open(path, newline="") as f:
        assert f.read().endswith("0.4,0.001,1,1\r\n")  # the half row written before the error is gone
    log.write(3, 0, "0.3", "0.001", "1", 1)  # space again: the row goes where the cut-off one was
    log.close()
    with open(path, newline="") as f:
        assert f.read() == ",".join(CSV_FIELDS) + "\r\n" + "".join(
            f"{s},0,0.{6 - s},0.001,1,1\r\n" for s in (1, 2, 3))
    # on resume the rows after the checkpoint's step are dropped, atomically
    CsvLog(path, resume_step=2).close()
    with open(path, newline="") as f:
        assert [line.split(",")[0] for line in f.read().splitlines()] == ["step", "1", "2"]
    assert names(tmp_path) == ["loss.csv"]

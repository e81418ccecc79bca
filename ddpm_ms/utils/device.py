"""Choosing the backend: Ascend, GPU or CPU, with a loud fallback when one is missing.

A single process falls back (Ascend -> GPU -> CPU) with one warning. Under msrun
(``MS_WORKER_NUM`` > 1) a named device that is missing is an error on every rank instead:
one node falling back to CPU would train with another collective backend than the others.
"""

import ctypes
import importlib
import os
import socket
import sys

import mindspore as ms

from ddpm_ms import _MINDSPORE_WAS_IMPORTED_FIRST, _ONEDNN_VAR
from ddpm_ms.utils.errors import UserError

from ddpm_ms.utils import DEVICES, DTYPES, FALLBACK_ORDER, JIT_LEVELS, MODES  # noqa: F401  (MindSpore-free there)


def backend_available(name):
    """Whether MindSpore loaded backend ``name``'s plugin.

    ``mindspore.device_context.{ascend,gpu,cpu}.is_available()`` (MindSpore 2.5+; it replaces
    ``mindspore.hal.is_available(name)``, which 2.10 documents as deprecated).
    """
    try:
        return bool(importlib.import_module(f"mindspore.device_context.{name.lower()}").is_available())
    except Exception:  # a broken plugin counts as absent
        return False


def msrun_worker_num(environ=None):
    """The number of processes msrun launched (``MS_WORKER_NUM``, set in its workers and its
    scheduler), or 1 outside msrun."""
    try:
        return int((os.environ if environ is None else environ).get("MS_WORKER_NUM", "1"))
    except ValueError:
        return 1


# what to do when a named device is missing under msrun
_MISSING_DEVICE_FIX = {
    "Ascend": "source CANN's set_env.sh (e.g. /usr/local/Ascend/ascend-toolkit/set_env.sh) in the shell that "
              "starts msrun on every node",
    "GPU": "make the NVIDIA driver, CUDA and cuDNN libraries loadable (LD_LIBRARY_PATH) on every node",
    "CPU": "install a MindSpore package with the CPU backend on every node",
}


def missing_device_error(requested, workers):
    """The UserError for a named device that is missing in a process msrun started."""
    return UserError(
        f"device {requested} requested but host {socket.gethostname()} has no {requested} backend "
        f"({unavailable_reason(requested)}); under msrun (MS_WORKER_NUM={workers}) a rank does not fall back, "
        f"so that all ranks train on the same device: {_MISSING_DEVICE_FIX[requested]}, or pass --device CPU")


def pick_backend(requested="auto", available=backend_available, workers=None):
    """The backend to use and a warning (or None).

    'auto' takes the first available of Ascend, GPU, CPU silently. A named backend that
    is missing falls back along the same order, and the warning says which one is used;
    except under msrun (``workers``, default ``MS_WORKER_NUM``, > 1), where it raises a
    UserError, the same on every rank that lacks the device.
    """
    if requested not in ("auto",) + FALLBACK_ORDER:
        raise ValueError(f"unknown device {requested!r}; choose auto, Ascend, GPU or CPU")
    if requested != "auto" and available(requested):
        return requested, None
    if requested != "auto":
        workers = msrun_worker_num() if workers is None else workers
        if workers > 1:
            raise missing_device_error(requested, workers)
    start = 0 if requested == "auto" else FALLBACK_ORDER.index(requested)
    for name in FALLBACK_ORDER[start:] + FALLBACK_ORDER[:start]:
        if name != requested and available(name):
            if requested == "auto":
                return name, None
            return name, (f"WARNING: device {requested} requested but no {requested} backend is available "
                          f"on this machine ({unavailable_reason(requested)}); falling back to {name}.")
    return "CPU", None


# What MindSpore 2.10's device plugins load first (lib/plugin/libmindspore_gpu.so.11.{1,6} list
# these as NEEDED: CUDA 11 runtime, cuBLAS 11, cuDNN 8; the Ascend plugin needs CANN's libraries).
# MindSpore's own load errors are hidden by GLOG_v=3 (ddpm_ms/__init__.py), so the fallback names them.
BACKEND_LIBS = {
    "GPU": (("libcuda.so.1", "no NVIDIA driver"), ("libcudart.so.11.0", "no CUDA 11.x runtime"),
            ("libcublas.so.11", "no cuBLAS 11"), ("libcudnn.so.8", "no cuDNN 8")),
    "Ascend": (("libascendcl.so", "no CANN toolkit (source its set_env.sh)"),
               ("libge_runner.so", "no CANN GraphEngine runtime (source CANN's set_env.sh)")),
}


def unavailable_reason(name, load=ctypes.CDLL):
    """Why backend ``name`` cannot load: the first missing library it needs, or a hint to see MindSpore's log."""
    for lib, reason in BACKEND_LIBS.get(name, ()):
        try:
            load(lib)
        except OSError:
            return f"{reason}: {lib} not found" + (
                "; MindSpore 2.10's GPU plugin needs CUDA 11.1 or 11.6 with cuDNN 8" if name == "GPU" else "")
    return "its libraries load but MindSpore's plugin did not; rerun with GLOG_v=1 to see MindSpore's error"


def _set_device(backend, device_id):
    """``ms.set_device`` (MindSpore 2.5+); where this process's runtime already runs, only on the same device."""
    try:
        ms.set_device(backend, device_id)
    except RuntimeError as e:
        # the runtime is already running in this process (e.g. a notebook or a test): fine if it is ours.
        # (set_device records the new target in the context before it raises: ask the device manager)
        current = ms.get_current_device()
        wanted = 0 if device_id is None else device_id
        if current.device_target != backend or (backend != "CPU" and current.device_id != wanted):
            reason = str(e).strip().splitlines()[0]
            raise RuntimeError(f"MindSpore already runs on {current.device_target} device {current.device_id} in "
                               f"this process and cannot switch to {backend} device {wanted} ({reason})") from None


def _cpu_has_avx512():
    try:
        with open("/proc/cpuinfo") as f:
            return "avx512f" in f.read()
    except OSError:
        return False


def setup_device(device="auto", mode="graph", device_id=None, seed=None, quiet=False):
    """Select the backend and execution mode; returns the backend name actually used.

    Raises UserError under msrun when the named ``device`` is missing (see :func:`pick_backend`).
    """
    backend, warning = pick_backend(device)
    if warning and not quiet:
        print(warning, file=sys.stderr, flush=True)
    if device_id is None:
        device_id = int(os.environ.get("DEVICE_ID", os.environ.get("LOCAL_RANK", 0)))
    _set_device(backend, device_id if backend != "CPU" else None)
    ms.set_context(mode=ms.GRAPH_MODE if mode == "graph" else ms.PYNATIVE_MODE)
    if backend == "CPU" and _MINDSPORE_WAS_IMPORTED_FIRST and _cpu_has_avx512() and not quiet:
        print(f"WARNING: mindspore was imported before ddpm_ms without {_ONEDNN_VAR}=AVX2; on this AVX-512 "
              "CPU convolutions run up to 60x slower. Import ddpm_ms first or export "
              f"{_ONEDNN_VAR}=AVX2.", file=sys.stderr, flush=True)
    if seed is not None:
        ms.set_seed(seed)
    return backend


def set_jit_level(cell, level="O0"):
    """Compile ``cell`` (a top-level Cell run in GRAPH_MODE) at ``jit_level`` ``level``; returns ``cell``.

    ddpm_ms passes the ``jit_level`` config key, "O0" by default: MindSpore turns off every
    optimisation that correctness does not need and runs the graph kernel by kernel, the most
    predictable level (and the one the tests and measurements use).
    "O1" adds MindSpore's automatic operator fusion (still kernel-by-kernel); on CPU it
    measured no faster (README, "CPU performance"). It is set explicitly because
    ``ms.JitConfig``'s own default in 2.10 is ``jit_level=""`` (the framework chooses);
    "O2" (whole-graph sink, Ascend only) is deprecated since 2.9 and not offered.
    """
    cell.set_jit_config(ms.JitConfig(jit_level=level))
    return cell


def compute_dtype(backend, dtype="auto"):
    """float16 compute on Ascend/GPU, float32 on CPU, unless the config says otherwise."""
    if dtype == "auto":
        return ms.float32 if backend == "CPU" else ms.float16
    return ms.float16 if dtype == "float16" else ms.float32

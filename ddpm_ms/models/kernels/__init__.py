"""Fast exact CPU kernels (C++ MindSpore ``aot`` custom ops), built on first use.

MindSpore 2.10's CPU GroupNorm, erf-GELU, SiLU and depthwise convolution (above all its
weight gradient) are several times slower than they need to be. ``cpu_kernels.cc`` holds
float32 kernels for the same functions, forward and backward; ``attn_kernels.cc`` does the
U-Net's linear and full attention (qkv to the output projection's input) in one op each way,
``optim_kernels.cc`` the EMA update of all weights in one op. ``conv_kernels.cc`` adds dense
convolutions (stride 1 "same", the 4x4 stride-2 down-sampling conv and its transpose), as
direct convolutions or im2col + OpenBLAS sgemm: MindSpore's oneDNN has to be capped at AVX2 on
AVX-512 CPUs (see ``ddpm_ms/__init__.py``), these are not; OpenBLAS comes from the
``scipy-openblas32`` wheel and the convolutions are left out (built-in conv ops) when that is
not installed or ``DDPM_MS_FAST_CONV=0``. All kernels share one pool of worker threads
(``common.h``). They are never shipped as a binary: on first use the sources are compiled with
``g++ -O3 -march=native`` (or ``-march=$DDPM_MS_KERNEL_MARCH``) into a per-user cache
(``$DDPM_MS_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ddpm_ms/kernels``, else
``~/.cache/ddpm_ms/kernels``), under a name keyed by the hash of the source, the compiler
flags, the compiler version and the CPU's feature flags, so a machine with other vector
units builds its own. The library is written to a temporary name and renamed into place
(atomic), so concurrent processes never load a half-written file.

The kernels are used only when all of these hold, else the built-in MindSpore ops run
(with one warning when something went wrong, none when they are just not applicable):

* the environment variable ``DDPM_MS_FAST_KERNELS`` is not ``0``;
* MindSpore's device target is CPU on Linux x86-64 (Ascend and GPU keep the built-in ops; on other
  CPUs, e.g. aarch64, one note says the built-in ops run: the sources use x86 intrinsics);
* ``g++`` (or ``$CXX``) is found and the compilation succeeds;
* the cell was not built with ``fast_kernels=False`` (how ``ddpm_ms.export`` builds a network
  that MindIR consumers and ONNX can run: custom aot ops cannot be exported).

``enabled(fast_kernels)`` answers that question (compiling on the first call): ``fast_kernels``
None means the user's default, ``requested()``, the one place that reads ``DDPM_MS_FAST_KERNELS``.
``ops()`` returns the Custom primitives. Cells decide once, when they are built
(``ddpm_ms.models.layers``), so a graph never mixes paths.
"""

import functools
import hashlib
import os
import platform
import shutil
import subprocess
import sys
import warnings

from ddpm_ms.utils import fileio
from ddpm_ms.utils.cache import DIR_VARIABLES
from ddpm_ms.utils.cache import cache_dir as _cache_dir

ENV_SWITCH = "DDPM_MS_FAST_KERNELS"
ENV_CACHE = DIR_VARIABLES["kernels"]  # "DDPM_MS_KERNEL_CACHE"
_HERE = os.path.dirname(os.path.abspath(__file__))
SOURCE = os.path.join(_HERE, "cpu_kernels.cc")
ATTN_SOURCE = os.path.join(_HERE, "attn_kernels.cc")  # fused attention, always built
CONV_SOURCE = os.path.join(_HERE, "conv_kernels.cc")  # needs OpenBLAS (scipy-openblas32)
OPTIM_SOURCE = os.path.join(_HERE, "optim_kernels.cc")  # the fused EMA update
BASE_SOURCES = (SOURCE, ATTN_SOURCE, OPTIM_SOURCE)  # always built; CONV_SOURCE only with OpenBLAS
HEADERS = (os.path.join(_HERE, "common.h"),)
# -fno-trapping-math: no FP-exception semantics to keep (values and roundings are unchanged); without
# it g++ will not turn the kernels' branch-free selects (x < 0 ? a : b) into vector blends for AVX2
# (AVX-512's mask registers hid this), and GELU, SiLU and exp stay scalar there (4-5x slower)
CXXFLAGS = ("-O3", "-fno-trapping-math", "-fopenmp-simd", "-pthread", "-fPIC", "-shared", "-std=c++17")
# -march value; another (older) one, e.g. DDPM_MS_KERNEL_MARCH=haswell, builds and tests the AVX2
# code paths on an AVX-512 machine
ENV_MARCH = "DDPM_MS_KERNEL_MARCH"
GROUP_NORM_EPS = 1e-5  # the epsilon compiled into the group norm kernel

ENV_CONV = "DDPM_MS_FAST_CONV"  # 0: leave the OpenBLAS convolutions out (built-in conv ops)
_state = {"lib": None, "error": None, "tried": False, "warned": False, "conv": False}


def _cxxflags():
    return (*CXXFLAGS, f"-march={os.environ.get(ENV_MARCH) or 'native'}")


def cache_dir():
    return _cache_dir("kernels")  # $DDPM_MS_KERNEL_CACHE (ENV_CACHE), else ~/.cache/ddpm_ms/kernels


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    return " ".join(sorted(line.split(":", 1)[1].split()))
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _compiler():
    cxx = os.environ.get("CXX") or "g++"
    return shutil.which(cxx)


def _compiler_version(cxx):
    try:
        return subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError):
        return ""


def _off(var):
    return os.environ.get(var, "1").strip().lower() in ("0", "false", "no", "off")


def _openblas():
    """(library dir, library name, version) of the scipy-openblas32 wheel, or None if absent."""
    try:
        import scipy_openblas32 as sob
        return sob.get_lib_dir(), sob.get_library(), getattr(sob, "__version__", "")
    except Exception:  # noqa: BLE001 - not installed or broken: the conv kernels are left out
        return None


def _build_plan():
    """(sources, extra link flags, OpenBLAS wheel or None) for this machine."""
    blas = _openblas()
    if blas is None:
        return [*BASE_SOURCES], [], None
    libdir, name, _ = blas
    return [*BASE_SOURCES, CONV_SOURCE], [f"-L{libdir}", f"-l{name}", f"-Wl,-rpath,{libdir}"], blas


def library_path(cxx, plan=None):
    """Cache path of the library for these sources, compiler, flags, OpenBLAS and CPU."""
    sources, link, blas = plan or _build_plan()
    src = b""
    for path in (*sources, *HEADERS):
        with open(path, "rb") as f:
            src += f.read() + b"\0"
    key = hashlib.sha256()
    for part in (src, " ".join(_cxxflags() + tuple(link)).encode(), _compiler_version(cxx).encode(),
                 _cpu_flags().encode(), platform.machine().encode(), str(blas).encode()):
        key.update(part)
        key.update(b"\0")
    return os.path.join(cache_dir(), f"ddpm_ms_kernels_{key.hexdigest()[:20]}.so")


def build(force=False):
    """Compile the kernels if needed; returns the library path (raises RuntimeError on failure)."""
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler (g++ or $CXX) on PATH")
    plan = _build_plan()
    _state["conv"] = plan[2] is not None
    path = library_path(cxx, plan)
    if os.path.exists(path) and not force:
        return path
    def compile_to(tmp):
        proc = subprocess.run([cxx, *_cxxflags(), "-o", tmp, *plan[0], *plan[1]], capture_output=True,
                              text=True, timeout=600)
        if proc.returncode != 0:
            raise RuntimeError(f"{os.path.basename(cxx)} failed:\n{proc.stderr.strip()[-2000:]}")
        os.chmod(tmp, 0o755)

    # atomic (fileio): other processes see the library's name absent or complete, never half-written
    return fileio.atomic_write(path, compile_to, "compiled kernels", sync=False)


def _device_target():
    import mindspore as ms
    try:
        return ms.get_context("device_target")
    except Exception:  # pragma: no cover - very old/new MindSpore
        return "CPU"


def _warn(msg):
    if not _state["warned"]:
        _state["warned"] = True
        warnings.warn(f"ddpm_ms fast CPU kernels disabled, using MindSpore's built-in ops: {msg}",
                      RuntimeWarning, stacklevel=3)


# the sources use x86 SIMD intrinsics (immintrin.h in common.h and conv_kernels.cc): elsewhere,
# e.g. on the aarch64 (Kunpeng) hosts of Ascend servers, the build would fail every time
X86_64 = ("x86_64", "AMD64")


def _notice_not_x86():
    if not _state["warned"]:
        _state["warned"] = True
        print(f"note: ddpm_ms's fast CPU kernels are x86-64 only; on this {platform.machine()} host "
              "MindSpore's built-in CPU ops run", file=sys.stderr, flush=True)


def switched_off():
    return _off(ENV_SWITCH)


def requested(fast_kernels=None):
    """The caller's choice, or (None) the user's default: on unless ``DDPM_MS_FAST_KERNELS=0``."""
    return not switched_off() if fast_kernels is None else bool(fast_kernels)


def enabled(fast_kernels=None):
    """True if the fast kernels are asked for (``requested``) and usable in the current MindSpore context."""
    if not requested(fast_kernels):
        return False
    if sys.platform != "linux" or _device_target() != "CPU":
        return False
    if platform.machine() not in X86_64:
        _notice_not_x86()
        return False
    if not _state["tried"]:
        _state["tried"] = True
        try:
            _state["lib"] = build()
        except Exception as e:  # noqa: BLE001 - any failure means: use the built-in ops
            _state["error"] = str(e)
    if _state["lib"] is None:
        _warn(_state["error"])
        return False
    return True


def status():
    """One line saying which implementation the U-Net uses (for benchmarks and logs)."""
    if switched_off():
        return f"built-in MindSpore ops ({ENV_SWITCH}=0)"
    if enabled():
        conv = "with OpenBLAS convolutions" if conv_enabled() else \
            f"convolutions built-in (scipy-openblas32 absent or {ENV_CONV}=0)"
        return f"fast CPU kernels, {conv} ({_state['lib']})"
    if platform.machine() not in X86_64:
        return f"built-in MindSpore ops (the kernels are x86-64 only; this host is {platform.machine()})"
    if _state["error"]:
        return f"built-in MindSpore ops (kernel build failed: {_state['error'].splitlines()[0]})"
    return f"built-in MindSpore ops (device {_device_target()})"


def conv_enabled(fast_kernels=None):
    """True if the dense convolution kernels (direct, or im2col + OpenBLAS sgemm) are in the library."""
    return enabled(fast_kernels) and bool(_state.get("conv")) and not _off(ENV_CONV)


@functools.lru_cache(maxsize=None)
def ops():
    """The Custom primitives (call only when ``enabled()``); see ``_ops.py``."""
    from ddpm_ms.models.kernels._ops import make_ops
    return make_ops(_state["lib"], conv=_state["conv"])

"""Build a git revision's kernel source for side-by-side benchmarks (bench_dwconv, bench_convs)."""

import os
import subprocess

from ddpm_ms.models import kernels

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def build_at(rev, source, tmp, link=()):
    """Compile ``ddpm_ms/models/kernels/<source>`` and ``common.h`` of git revision ``rev`` with the
    current flags (plus ``link``) into ``tmp``; returns the .so path."""
    for name in (source, "common.h"):
        src = subprocess.run(["git", "-C", ROOT, "show", f"{rev}:ddpm_ms/models/kernels/{name}"],
                             check=True, capture_output=True).stdout
        with open(os.path.join(tmp, name), "wb") as f:
            f.write(src)
    so = os.path.join(tmp, f"base_{os.path.splitext(source)[0]}.so")
    cxx = kernels._compiler() or "g++"
    subprocess.run([cxx, *kernels._cxxflags(), "-o", so, os.path.join(tmp, source), *link], check=True)
    return so

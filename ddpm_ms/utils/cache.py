"""Per-user cache directories: one rule for every cache ddpm_ms keeps.

    cache_dir(kind)   the directory of one cache: its own environment variable if set, else
                      <root>/<kind>, root = $XDG_CACHE_HOME/ddpm_ms (~/.cache/ddpm_ms)

| kind            | what                                   | environment variable                     |
|-----------------|----------------------------------------|------------------------------------------|
| kernels         | the compiled C++ kernels (.so)         | DDPM_MS_KERNEL_CACHE (the directory)     |
| classifier      | the evaluation classifiers             | DDPM_MS_CACHE (a root: $DDPM_MS_CACHE/classifier) |
| fashion-mnist   | Fashion-MNIST, decompressed/downloaded | DDPM_MS_DATA (the directory)             |
| mnist, cifar-10 | those datasets                         | (XDG_CACHE_HOME only)                    |
"""

import os

DIR_VARIABLES = {"kernels": "DDPM_MS_KERNEL_CACHE", "fashion-mnist": "DDPM_MS_DATA"}  # name the directory
ROOT_VARIABLES = {"classifier": "DDPM_MS_CACHE"}  # name a root that holds <kind>/


def _absolute(path):
    return os.path.abspath(os.path.expanduser(path))


def cache_root():
    """``$XDG_CACHE_HOME/ddpm_ms`` (``~/.cache/ddpm_ms`` when XDG_CACHE_HOME is unset)."""
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(os.path.abspath(base), "ddpm_ms")


def cache_dir(kind):
    """The cache directory of ``kind`` (see the table above); not created here."""
    explicit = os.environ.get(DIR_VARIABLES.get(kind, ""))
    if explicit:
        return _absolute(explicit)
    root = os.environ.get(ROOT_VARIABLES.get(kind, ""))
    return os.path.join(_absolute(root) if root else cache_root(), kind)

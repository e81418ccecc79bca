"""What every layer uses: errors, atomic files, caches, the device, checkpoint files, images."""

# device.py's choices, for ddpm_ms.config and the command line to check without importing
# MindSpore: keep this file free of MindSpore imports.
FALLBACK_ORDER = ("Ascend", "GPU", "CPU")  # device.pick_backend's order when a backend is missing
DEVICES = ("auto",) + FALLBACK_ORDER
MODES = ("graph", "pynative")
DTYPES = ("auto", "float32", "float16")  # device.compute_dtype's choices
JIT_LEVELS = ("O0", "O1")  # device.set_jit_level's choices on every backend ("O2" is Ascend-only, deprecated since 2.9)

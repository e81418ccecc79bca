"""ddpm_ms: Denoising Diffusion Probabilistic Models in MindSpore.

Importing this package caps oneDNN at AVX2 (``ONEDNN_MAX_CPU_ISA=AVX2``) unless the
user already chose a value: MindSpore 2.10's oneDNN runs fp32 convolutions on a slow
reference path on AVX-512 CPUs (a 3x3 conv at batch 64: 1300 ms instead of 19 ms).
The variable only takes effect if it is set before MindSpore is first imported, so
this module must not import MindSpore before setting it.

``ddpm_ms.DDPMPipeline`` (:mod:`ddpm_ms.pipeline`) samples from a trained model in a few lines.
"""

import os as _os
import sys as _sys

__version__ = "0.1.0"

_ONEDNN_VAR = "ONEDNN_MAX_CPU_ISA"
_MINDSPORE_WAS_IMPORTED_FIRST = "mindspore" in _sys.modules and _ONEDNN_VAR not in _os.environ
_os.environ.setdefault(_ONEDNN_VAR, "AVX2")
# MindSpore logs every unavailable backend plugin as a multi-line WARNING; show errors only
# (set GLOG_v=2 to see MindSpore's warnings again). ddpm_ms prints its own device warning.
_os.environ.setdefault("GLOG_v", "3")


def __getattr__(name):
    """``ddpm_ms.DDPMPipeline``, imported on first use (importing ddpm_ms itself loads no MindSpore)."""
    if name == "DDPMPipeline":
        from ddpm_ms.pipeline import DDPMPipeline

        return DDPMPipeline
    raise AttributeError(f"module 'ddpm_ms' has no attribute {name!r}")

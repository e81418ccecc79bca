"""The Ascend/GPU precision policy shared by both U-Nets: float16 compute, GroupNorms and time embeddings in float32."""

import mindspore as ms

from ddpm_ms.models.layers import GroupNorm


def to_mixed_precision(net, dtype=ms.float16):
    """Ascend/GPU precision: ``net`` computes in ``dtype``, its GroupNorms in float32 -> ``net``.

    The policy of ``ms.amp.custom_mixed_precision(net, black_list=[GroupNorm, ...])`` (every
    cell's inputs and parameters cast to ``dtype``, the norms' to float32 and their outputs
    back to ``dtype``; here the cells marked ``keep_float32``, the timestep embeddings, stay
    float32 too), set as flags on the
    cells themselves instead of wrapping
    each norm in an ``_OutputTo16`` cell: parameter names are unchanged, so checkpoints of
    float16 and float32 runs are interchangeable. Changes ``net`` in place.
    """
    net.to_float(dtype)
    for _, cell in net.cells_and_names():
        if isinstance(cell, GroupNorm):
            cell.to_float(ms.float32)
            cell.out_dtype = dtype
        elif getattr(cell, "keep_float32", False):
            # timestep embeddings: in float16 the embedding of t = 999 is off by 0.15 (t * freq rounded)
            cell.to_float(ms.float32)
    return net

"""Export forms of the layers MindSpore 2.10's ONNX exporter cannot write.

``mindspore.export(..., file_format="ONNX")`` has no converter for ``GroupNorm`` ("Exporting
GroupNorm operator is not yet supported") nor for ``Erf`` (the exact GELU), nor for ``Sign`` and
``Reciprocal`` (what ``1 / x`` with a Python-number numerator compiles to). Every other op of the
U-Net exports as it is. ``to_export_forms(model)`` swaps each GroupNorm and GELU cell of a network
for a cell computing the same function from ops the exporter has (reductions, elementwise
arithmetic, exp), sharing the original Parameters; use it only on a network built with
``fast_kernels=False`` and only for export (both forms are slower than the built-in ops).

* GroupNorm: mean and biased variance over each group (as ``ops.group_norm``), then
  ``(x - mean) / sqrt(var + eps) * gamma + beta``.
* erf, two pieces that meet at z = 1 (Abramowitz & Stegun 7.1 for the forms):
  ``erf(z) = z + z P(z^2)`` for |z| < 1 (``P`` = erf(z)/z - 1, degree 8 in z^2), and
  ``erf(z) = 1 - exp(-z^2) Q(s)``, ``s = 2 / (2 + z)``, for |z| >= 1 (``Q`` = erfcx, the scaled
  complementary error function, degree 8 in s), odd in z. The coefficients are float64
  Chebyshev least-squares fits (``scripts/fit_erf.py`` recomputes them with SciPy). Evaluated in
  float32 the result is within 8.0e-8 of the true erf everywhere (float32 rounding alone is
  3e-8), so the exported GELU matches MindSpore's erf GELU to float32 rounding.
"""

import mindspore as ms
from mindspore import nn, ops

from . import unet

# erf(z) / z - 1 = sum_k ERF_SMALL[k] z^(2k), 0 <= z <= 1
ERF_SMALL = (0.12837916612625122, -0.37612637877464294, 0.11283791065216064, -0.02686612866818905,
             0.0052237724885344505, -0.0008542482974007726, 0.00011955513764405623,
             -1.3906891581427772e-05, 1.0591917316560284e-06)
# exp(z^2) erfc(z) = sum_k ERF_LARGE[k] s^k, s = 2 / (2 + z), z >= 1
ERF_LARGE = (9.9617503135363e-10, 0.28209441900253296, 0.2821173369884491, 0.24634885787963867,
             0.18135793507099152, 0.05478635057806969, 0.09113430976867676, -0.2327735722064972,
             0.09552738070487976)
ERF_SPLIT = 1.0


def _horner(coefs, v):
    """sum_k coefs[k] v^k (graph-safe: the loop over a Python tuple unrolls when compiled)."""
    out = coefs[-1]
    for c in coefs[-2::-1]:
        out = out * v + c
    return out


def erf_abs(z):
    """erf(|z|) from exporter-supported ops; error < 1e-7 in float32 (module docstring)."""
    a = ops.abs(z)
    small_z = ops.minimum(a, ERF_SPLIT)  # each piece at an argument in its own range: no inf/nan
    large_z = ops.maximum(a, ERF_SPLIT)
    small = small_z + small_z * _horner(ERF_SMALL, small_z * small_z)
    s = ops.div(ops.full_like(large_z, 2.0), 2.0 + large_z)  # not 2.0 / (...): that compiles to Reciprocal
    large = 1.0 - ops.exp(-(large_z * large_z)) * _horner(ERF_LARGE, s)
    use_small = (a < ERF_SPLIT).astype(z.dtype)
    return use_small * small + (1.0 - use_small) * large  # exact select: one weight is 0, the other 1


def erf(z):
    """erf(z) = sign(z) erf(|z|), with the sign from a comparison (the exporter has no Sign)."""
    return (2.0 * (z >= 0).astype(z.dtype) - 1.0) * erf_abs(z)


class ExportGELU(nn.Cell):
    """Exact GELU ``0.5 x (1 + erf(x / sqrt(2)))`` with the polynomial erf."""

    def construct(self, x):
        x32 = x.astype(ms.float32)
        return (0.5 * x32 * (1.0 + erf(x32 * 0.7071067811865476))).astype(x.dtype)


class ExportGroupNorm(nn.Cell):
    """GroupNorm of a [N, C, H, W] tensor from reductions, in float32; shares ``gn``'s gamma/beta."""

    def __init__(self, gn):
        super().__init__()
        self.num_groups, self.eps = gn.num_groups, float(gn.eps)
        self.gamma, self.beta = gn.gamma, gn.beta

    def construct(self, x):
        n, c, h, w = x.shape
        v = x.astype(ms.float32).reshape(n, self.num_groups, -1)
        centred = v - v.mean(-1, keep_dims=True)
        var = (centred * centred).mean(-1, keep_dims=True)
        y = (centred / ops.sqrt(var + self.eps)).reshape(n, c, h, w)
        y = y * self.gamma.astype(ms.float32).reshape(1, c, 1, 1) + self.beta.astype(ms.float32).reshape(1, c, 1, 1)
        return y.astype(x.dtype)


def _export_form(cell):
    if isinstance(cell, unet.GroupNorm):
        return ExportGroupNorm(cell)
    if isinstance(cell, unet.GELU):
        return ExportGELU()
    return None


def to_export_forms(model):
    """Replace, in place, every GroupNorm and GELU below ``model`` by its export form -> count replaced."""
    count = 0
    for _, parent in list(model.cells_and_names()):
        for key, child in list(parent._cells.items()):  # Cell keeps its children here
            new = _export_form(child)
            if new is not None:
                parent._cells[key] = new
                count += 1
        if isinstance(parent, nn.SequentialCell):
            parent.cell_list = list(parent._cells.values())  # its construct iterates cell_list
    return count

"""Export forms of the layers MindSpore 2.10's ONNX exporter cannot write.

``mindspore.export(..., file_format="ONNX")`` has no converter for ``GroupNorm`` ("Exporting
GroupNorm operator is not yet supported") nor for ``Erf`` (the exact GELU), nor for ``Sign`` and
``Reciprocal`` (what ``1 / x`` with a Python-number numerator compiles to). Every other op of the
U-Net exports as it is. ``to_export_forms(model)`` swaps each GroupNorm and GELU cell of a network
for a cell computing the same function from ops the exporter has (reductions and elementwise
arithmetic), sharing the original Parameters; use it only on a network built with
``fast_kernels=False`` and only for export (both forms are slower than the built-in ops).

* GroupNorm: mean and biased variance over each group (as ``ops.group_norm``), then
  ``(x - mean) / sqrt(var + eps) * gamma + beta``.
* erf as polynomials, odd in z: ``erf(z) = z + z P(z^2)`` for |z| < 1 (``P`` = erf(z)/z - 1,
  degree 8 in z^2), ``erf(z) = 1 - Q_i(|z| - m_i)`` on [1, 2), [2, 3), [3, 4) (``Q_i`` = erfc,
  degree 9 around the midpoint m_i) and 1 from |z| = 4 on (erf(4) = 1 - 1.5e-8). The coefficients
  are float64 Chebyshev least-squares fits (``scripts/fit_erf.py`` recomputes them with SciPy).
  Evaluated in float32 the result is within 8.0e-8 of the true erf on [-9, 9] (float32 rounding
  alone is 3e-8; MindSpore's and onnxruntime's own Erf are within 5.4e-8 and 5.9e-8). Only
  additions, multiplications, comparisons and min/max: no exp, whose float32 accuracy differs
  between runtimes (MindSpore 2.10's CPU exp is off by up to 8e-6 relative).
"""

import mindspore as ms
from mindspore import nn, ops

from ddpm_ms.models import layers

# erf(z) / z - 1 = sum_k ERF_SMALL[k] z^(2k), 0 <= z < 1
ERF_SMALL = (0.12837916612625122, -0.37612637877464294, 0.11283791065216064, -0.02686612866818905,
             0.0052237724885344505, -0.0008542482974007726, 0.00011955513764405623,
             -1.3906891581427772e-05, 1.0591917316560284e-06)
# (lo, hi, m, coefs): erfc(z) = sum_k coefs[k] (z - m)^k, lo <= z < hi
ERF_PIECES = (
    (1.0, 2.0, 1.5, (0.0338948518037796, -0.11893028765916824, 0.17839542031288147, -0.13875216245651245,
                     0.044599369168281555, 0.014870164915919304, -0.01933286152780056, 0.004705177620053291,
                     0.002400669502094388, -0.0015482325106859207)),
    (2.0, 3.0, 2.5, (0.0004069519345648587, -0.002178284339606762, 0.005445730872452259, -0.008350084535777569,
                     0.008621658198535442, -0.006117475219070911, 0.0028072046115994453, -0.0005412239115685225,
                     -0.0003040755691472441, 0.0002456809743307531)),
    (3.0, 4.0, 3.5, (7.431041240124614e-07, -5.399428573582554e-06, 1.8896722394856624e-05, -4.2295352614019066e-05,
                     6.77620992064476e-05, -8.212029933929443e-05, 7.720884605078027e-05, -5.815037729917094e-05,
                     3.689728691824712e-05, -1.553778929519467e-05)),
)
ERF_ONE = 4.0  # erf(z) = 1 in float32 from here on


def _horner(coefs, v):
    """sum_k coefs[k] v^k (graph-safe: the loop over a Python tuple unrolls when compiled)."""
    out = coefs[-1]
    for c in coefs[-2::-1]:
        out = out * v + c
    return out


def erf_abs(z):
    """erf(|z|) from exporter-supported ops; error < 1e-7 in float32 (module docstring)."""
    a = ops.abs(z)
    small_z = ops.minimum(a, 1.0)  # every piece at an argument inside its own interval: all finite
    out = (small_z + small_z * _horner(ERF_SMALL, small_z * small_z)) * (a < 1.0).astype(z.dtype)
    for lo, hi, mid, coefs in ERF_PIECES:
        inside = ((a >= lo).astype(z.dtype)) * ((a < hi).astype(z.dtype))
        out = out + inside * (1.0 - _horner(coefs, ops.clamp(a, lo, hi) - mid))
    return out + (a >= ERF_ONE).astype(z.dtype)  # exactly one term is non-zero: an exact select


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
    if isinstance(cell, layers.GroupNorm):
        return ExportGroupNorm(cell)
    if isinstance(cell, layers.GELU):
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

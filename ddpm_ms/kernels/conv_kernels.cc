// Dense 2-D convolutions for ddpm_ms on CPU (MindSpore "aot" custom operators), as
// im2col + single-precision GEMM from OpenBLAS (the scipy-openblas32 wheel).
//
// Why: MindSpore 2.10 must cap oneDNN at AVX2 on AVX-512 CPUs (its AVX-512 fp32 NCHW
// convolution falls to a reference path, see ddpm_ms/__init__.py), so its convolutions and
// matmuls use half the vector width the CPU has. OpenBLAS picks its kernels at run time for
// the CPU it finds (SkylakeX / Cooperlake / Haswell / Zen ...), AVX-512 included.
//
// Built only when scipy_openblas32 is importable (ddpm_ms/kernels/__init__.py links it).
// OpenBLAS runs single-threaded here; work is split over images with the same std::thread
// helper as the other kernels (no spinning thread pool beside MindSpore's).
//
// Layout: x [N, Ci, H, W], w [Co, Ci, K, K], y [N, Co, Ho, Wo], float32, no bias.
// Two geometries, chosen by the exported name:
//   conv_same_*  stride 1, zero padding K/2 (odd K: "same" size; K = 1 is a 1x1 conv)
//   conv_down_*  stride 2, zero padding 1 (the U-Net's 4x4 down-sampling conv)
// Functions (inputs..., outputs):
//   conv_*_fwd(x, w) -> y
//   conv_*_bwd_input(dy, w) -> dx          dx's shape is the output shape MindSpore passes;
//                                          also the forward pass of the matching transposed conv
//   conv_*_bwd_filter(dy, x, w) -> dw      (w only gives the kernel shape)
// Per image n, with col_n = im2col(x_n) of shape [Ci*K*K, Ho*Wo]:
//   y_n = w . col_n,   dcol_n = w^T . dy_n (dx_n = col2im(dcol_n)),   dw = sum_n dy_n . col_n^T
// Small images are processed several at a time (one GEMM over nb*Ho*Wo columns).

#include "common.h"

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <mutex>
#include <vector>

extern "C" {
void scipy_cblas_sgemm(int order, int trans_a, int trans_b, int m, int n, int k, float alpha,
                       const float *a, int lda, const float *b, int ldb, float beta, float *c, int ldc);
void scipy_openblas_set_num_threads(int n);
}

namespace {

const int kRowMajor = 101, kNoTrans = 111, kTrans = 112;

void single_threaded_blas() {
  static std::once_flag once;
  std::call_once(once, [] { scipy_openblas_set_num_threads(1); });
}

// C[m, n] = alpha * op(A) . op(B) + beta * C, row-major.
inline void gemm(bool ta, bool tb, int64_t m, int64_t n, int64_t k, const float *a, int64_t lda,
                 const float *b, int64_t ldb, float beta, float *c, int64_t ldc) {
  scipy_cblas_sgemm(kRowMajor, ta ? kTrans : kNoTrans, tb ? kTrans : kNoTrans, int(m), int(n), int(k),
                    1.0f, a, int(lda), b, int(ldb), beta, c, int(ldc));
}

struct Geo {
  int64_t N, Ci, H, W, Co, K, S, P, Ho, Wo;
  int64_t rows() const { return Ci * K * K; }
  int64_t hwo() const { return Ho * Wo; }
  bool pointwise() const { return K == 1 && S == 1 && P == 0; }
};

// Valid output columns [lo, hi) for kernel column kx: 0 <= ow*S - P + kx < W.
inline void valid_range(int64_t S, int64_t P, int64_t kx, int64_t W, int64_t Wo, int64_t *lo, int64_t *hi) {
  int64_t a = P - kx;  // need ow*S >= a
  *lo = a <= 0 ? 0 : (a + S - 1) / S;
  int64_t b = W + P - kx;  // need ow*S < b
  *hi = b <= 0 ? 0 : std::min<int64_t>(Wo, (b + S - 1) / S);
  if (*hi < *lo) *hi = *lo;
}

// col[r, j*HWo + p] for images n0 .. n0+nb-1; r = (ci*K + ky)*K + kx, p = oh*Wo + ow.
void im2col(const float *x, const Geo &g, int64_t n0, int64_t nb, float *col) {
  const int64_t hwo = g.hwo(), L = nb * hwo;
  for (int64_t ci = 0; ci < g.Ci; ++ci)
    for (int64_t ky = 0; ky < g.K; ++ky)
      for (int64_t kx = 0; kx < g.K; ++kx) {
        float *row = col + ((ci * g.K + ky) * g.K + kx) * L;
        int64_t lo, hi;
        valid_range(g.S, g.P, kx, g.W, g.Wo, &lo, &hi);
        for (int64_t j = 0; j < nb; ++j) {
          const float *xp = x + ((n0 + j) * g.Ci + ci) * g.H * g.W;
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            float *dst = row + j * hwo + oh * g.Wo;
            const int64_t ih = oh * g.S - g.P + ky;
            if (ih < 0 || ih >= g.H) {
              std::memset(dst, 0, sizeof(float) * g.Wo);
              continue;
            }
            const float *src = xp + ih * g.W - g.P + kx;  // src[ow*S] is x[ih, ow*S - P + kx]
            for (int64_t ow = 0; ow < lo; ++ow) dst[ow] = 0.0f;
            if (g.S == 1) {
              if (hi > lo) std::memcpy(dst + lo, src + lo, sizeof(float) * (hi - lo));
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) dst[ow] = src[ow * g.S];
            }
            for (int64_t ow = hi; ow < g.Wo; ++ow) dst[ow] = 0.0f;
          }
        }
      }
}

// dx[n0 .. n0+nb-1] += col2im(col): the adjoint of im2col.
void col2im_add(const float *col, const Geo &g, int64_t n0, int64_t nb, float *dx) {
  const int64_t hwo = g.hwo(), L = nb * hwo;
  for (int64_t ci = 0; ci < g.Ci; ++ci)
    for (int64_t ky = 0; ky < g.K; ++ky)
      for (int64_t kx = 0; kx < g.K; ++kx) {
        const float *row = col + ((ci * g.K + ky) * g.K + kx) * L;
        int64_t lo, hi;
        valid_range(g.S, g.P, kx, g.W, g.Wo, &lo, &hi);
        for (int64_t j = 0; j < nb; ++j) {
          float *xp = dx + ((n0 + j) * g.Ci + ci) * g.H * g.W;
          for (int64_t oh = 0; oh < g.Ho; ++oh) {
            const int64_t ih = oh * g.S - g.P + ky;
            if (ih < 0 || ih >= g.H) continue;
            const float *src = row + j * hwo + oh * g.Wo;
            float *dst = xp + ih * g.W - g.P + kx;
            if (g.S == 1) {
#pragma omp simd
              for (int64_t ow = lo; ow < hi; ++ow) dst[ow] += src[ow];
            } else {
              for (int64_t ow = lo; ow < hi; ++ow) dst[ow * g.S] += src[ow];
            }
          }
        }
      }
}

// [C, nb*HWo] <-> nb images of [C, HWo] (rows of one image are contiguous in the tensor).
void gather_images(const float *t, int64_t C, int64_t hwo, int64_t n0, int64_t nb, float *out) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < nb; ++j)
      std::memcpy(out + c * nb * hwo + j * hwo, t + ((n0 + j) * C + c) * hwo, sizeof(float) * hwo);
}

// The [C, nb*HWo] matrix of images n0..n0+nb-1: the tensor itself for one image, else a copy in buf.
const float *image_rows(const float *t, int64_t C, int64_t hwo, int64_t n0, int64_t nb, float *buf) {
  if (nb == 1) return t + n0 * C * hwo;
  gather_images(t, C, hwo, n0, nb, buf);
  return buf;
}

void scatter_images(const float *in, int64_t C, int64_t hwo, int64_t n0, int64_t nb, float *t) {
  for (int64_t c = 0; c < C; ++c)
    for (int64_t j = 0; j < nb; ++j)
      std::memcpy(t + ((n0 + j) * C + c) * hwo, in + c * nb * hwo + j * hwo, sizeof(float) * hwo);
}

// Images per GEMM: about `columns` GEMM columns (nb * Ho * Wo), and at least one chunk per thread.
int64_t images_per_chunk(const Geo &g, int64_t columns) {
  const int64_t want = std::max<int64_t>(1, (columns + g.hwo() - 1) / g.hwo());
  const int64_t per_thread = std::max<int64_t>(1, (g.N + num_threads() - 1) / num_threads());
  return std::min(want, per_thread);
}

// Split images into chunks of nb and give each worker a contiguous run of chunks.
template <class F>
void over_chunks(const Geo &g, int64_t nb, F fn) {
  const int64_t chunks = (g.N + nb - 1) / nb;
  const int workers = static_cast<int>(std::min<int64_t>(num_threads(), chunks));
  run_workers(workers, [&](int t) {
    const int64_t c0 = chunks * t / workers, c1 = chunks * (t + 1) / workers;
    fn(t, c0 * nb, std::min(g.N, c1 * nb));
  });
}

bool read_geo(int64_t **shapes, int xi, int wi, int yi, int64_t S, Geo *g) {
  const int64_t *xs = shapes[xi], *ws = shapes[wi], *ys = shapes[yi];
  g->N = xs[0]; g->Ci = xs[1]; g->H = xs[2]; g->W = xs[3];
  g->Co = ws[0]; g->K = ws[2]; g->S = S;
  g->P = S == 1 ? g->K / 2 : 1;
  g->Ho = ys[2]; g->Wo = ys[3];
  if (ws[1] != g->Ci || ws[3] != g->K || ys[0] != g->N || ys[1] != g->Co) return false;
  if (S == 1 && g->K % 2 == 0) return false;
  return g->Ho == (g->H + 2 * g->P - g->K) / S + 1 && g->Wo == (g->W + 2 * g->P - g->K) / S + 1;
}

void forward(const float *x, const float *w, float *y, const Geo &g) {
  single_threaded_blas();
  const int64_t nb_max = images_per_chunk(g, 512), hwo = g.hwo(), R = g.rows();
  over_chunks(g, nb_max, [&](int, int64_t lo, int64_t hi) {
    std::vector<float> col(g.pointwise() && nb_max == 1 ? 0 : R * nb_max * hwo);
    std::vector<float> out(nb_max > 1 ? g.Co * nb_max * hwo : 0);
    for (int64_t n0 = lo; n0 < hi; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, hi - n0), L = nb * hwo;
      const float *b = x + n0 * g.Ci * g.H * g.W;
      if (!(g.pointwise() && nb == 1)) {
        im2col(x, g, n0, nb, col.data());
        b = col.data();
      }
      if (nb == 1) {
        gemm(false, false, g.Co, L, R, w, R, b, L, 0.0f, y + n0 * g.Co * hwo, hwo);
      } else {
        gemm(false, false, g.Co, L, R, w, R, b, L, 0.0f, out.data(), L);
        scatter_images(out.data(), g.Co, hwo, n0, nb, y);
      }
    }
  });
}

void backward_input(const float *dy, const float *w, float *dx, const Geo &g) {
  single_threaded_blas();
  const int64_t nb_max = images_per_chunk(g, 512), hwo = g.hwo(), R = g.rows();
  over_chunks(g, nb_max, [&](int, int64_t lo, int64_t hi) {
    std::vector<float> col(R * nb_max * hwo);
    std::vector<float> dyc(nb_max > 1 ? g.Co * nb_max * hwo : 0);
    std::memset(dx + lo * g.Ci * g.H * g.W, 0, sizeof(float) * (hi - lo) * g.Ci * g.H * g.W);
    for (int64_t n0 = lo; n0 < hi; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, hi - n0), L = nb * hwo;
      const float *a = image_rows(dy, g.Co, hwo, n0, nb, dyc.data());
      if (g.pointwise() && nb == 1) {
        gemm(true, false, R, L, g.Co, w, R, a, L, 0.0f, dx + n0 * g.Ci * g.H * g.W, L);
        continue;
      }
      gemm(true, false, R, L, g.Co, w, R, a, L, 0.0f, col.data(), L);
      col2im_add(col.data(), g, n0, nb, dx);
    }
  });
}

void backward_filter(const float *dy, const float *x, float *dw, const Geo &g) {
  single_threaded_blas();
  // more columns per GEMM here: they are its inner (reduction) dimension
  const int64_t nb_max = images_per_chunk(g, 2048), hwo = g.hwo(), R = g.rows();
  std::vector<std::vector<float>> part(num_threads());  // workers 1.. sum into their own
  over_chunks(g, nb_max, [&](int t, int64_t lo, int64_t hi) {
    std::vector<float> col(R * nb_max * hwo);
    std::vector<float> dyc(nb_max > 1 ? g.Co * nb_max * hwo : 0);
    float *acc = dw;
    if (t > 0) {
      part[t].assign(g.Co * R, 0.0f);
      acc = part[t].data();
    }
    float beta = 0.0f;  // every worker has at least one chunk: its first GEMM overwrites acc
    for (int64_t n0 = lo; n0 < hi; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, hi - n0), L = nb * hwo;
      const float *a = image_rows(dy, g.Co, hwo, n0, nb, dyc.data());
      im2col(x, g, n0, nb, col.data());
      gemm(false, true, g.Co, R, L, a, L, col.data(), L, beta, acc, R);
      beta = 1.0f;
    }
  });
  for (const auto &w : part) {
    const float *p = w.data();
    if (w.empty()) continue;
#pragma omp simd
    for (int64_t i = 0; i < g.Co * R; ++i) dw[i] += p[i];
  }
}

enum Pass { kForward = 0, kBackwardInput = 1, kBackwardFilter = 2 };

// Tensor order per pass: forward (x, w, y), backward input (dy, w, dx), backward filter
// (dy, x, w, dw); all 4-D float32. Returns 0 on success, 1 on a bad call.
int run(Pass pass, int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, int64_t S) {
  static const int kCount[] = {3, 3, 4}, kX[] = {0, 2, 1}, kW[] = {1, 1, 3}, kY[] = {2, 0, 0};
  if (nparam != kCount[pass] || !all_float32(nparam, dtypes)) return 1;
  for (int i = 0; i < nparam; ++i)
    if (ndims[i] != 4) return 1;
  Geo g;
  if (!read_geo(shapes, kX[pass], kW[pass], kY[pass], S, &g)) return 1;
  const float *a = static_cast<const float *>(params[0]);
  const float *b = static_cast<const float *>(params[1]);
  float *out = static_cast<float *>(params[nparam - 1]);
  if (g.N == 0 || g.hwo() == 0) {  // empty batch or image: nothing to sum, dw = 0
    if (pass == kBackwardFilter) std::memset(out, 0, sizeof(float) * g.Co * g.rows());
    if (pass == kBackwardInput) std::memset(out, 0, sizeof(float) * g.N * g.Ci * g.H * g.W);
    return 0;
  }
  if (pass == kForward) forward(a, b, out, g);
  if (pass == kBackwardInput) backward_input(a, b, out, g);
  if (pass == kBackwardFilter) backward_filter(a, b, out, g);
  return 0;
}

}  // namespace

extern "C" {

#define DDPM_MS_CONV_PASS(name, pass, S)                                                        \
  int name(int np, void **p, int *nd, int64_t **sh, const char **dt, void *, void *) {           \
    return run(pass, np, p, nd, sh, dt, S);                                                      \
  }
#define DDPM_MS_CONV(name, S)                                     \
  DDPM_MS_CONV_PASS(conv_##name##_fwd, kForward, S)               \
  DDPM_MS_CONV_PASS(conv_##name##_bwd_input, kBackwardInput, S)   \
  DDPM_MS_CONV_PASS(conv_##name##_bwd_filter, kBackwardFilter, S)

DDPM_MS_CONV(same, 1)
DDPM_MS_CONV(down, 2)

#undef DDPM_MS_CONV
#undef DDPM_MS_CONV_PASS

}  // extern "C"

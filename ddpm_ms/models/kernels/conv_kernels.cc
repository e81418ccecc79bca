// Dense 2-D convolutions for ddpm_ms on CPU (MindSpore "aot" custom operators): im2col +
// single-precision GEMM from OpenBLAS (the scipy-openblas32 wheel), and direct kernels for the
// odd-K stride-1 and the stride-2 passes where those are faster (see "Direct convolution" and
// use_direct below).
//
// Why: MindSpore 2.10 must cap oneDNN at AVX2 on AVX-512 CPUs (its AVX-512 fp32 NCHW
// convolution falls to a reference path, see ddpm_ms/__init__.py), so its convolutions and
// matmuls use half the vector width the CPU has. OpenBLAS picks its kernels at run time for
// the CPU it finds (SkylakeX / Cooperlake / Haswell / Zen ...), AVX-512 included.
//
// Built only when scipy_openblas32 is importable (ddpm_ms/kernels/__init__.py links it).
// OpenBLAS runs single-threaded here; work is split over images on the library's own worker
// threads (common.h), as in the other kernels.
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

#include <immintrin.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
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

// ----------------------------------------------------------------------------------------
// Direct convolution for odd K > 1, stride 1, "same" padding (the U-Net's 3x3 and 7x7 convs),
// and for stride 2, padding 1 (the 4x4 and 3x3 down-sampling convs, the 4x4 transposed conv).
//
// im2col + GEMM copies every input pixel K*K times and OpenBLAS then packs those copies again;
// with the U-Net's few channels (28..224) that memory traffic, not the multiplies, set the
// speed (about 150 GFLOP/s on a 2-core AVX-512 machine). Here the taps are read straight from
// a zero-padded copy of the input: output channels are the vector lanes (kV per vector), a
// register tile holds CV vectors x PX output pixels, and for every input channel and tap the
// tile takes CV weight vectors and PX broadcast input pixels (CV * PX fused multiply-adds).
// The pixels of a tile are any PX output pixels of a group of images, each reached through its
// own offset into the padded planes, so small images (7x7) waste no lanes and a tile may
// cross rows and images; a group's pixel list is padded to a multiple of PX with copies of its
// first pixel, whose results are dropped.
//   forward:         y  = conv(x, w)
//   backward input:  dx = conv(dy, w~) with w~[ci, co, t] = w[co, ci, K*K - 1 - t] (the same
//                    "same" conv with the kernel flipped and the channel roles swapped)
//   backward filter: dw[co, ci, t] = sum over pixels of dy[co, p] * xpad[ci, p + offset(t)],
//                    with the output-channel vectors loaded from a pixel-major copy of dy
// At stride 2 a pixel's offset is that of padded pixel (2 oh, 2 ow); the input gradient is four
// stride-1 convs over the padded dy, one per output phase (direct_backward_input_strided).
#ifdef __AVX512F__
const int kV = 16;    // floats per vector
const int kAcc = 24;  // accumulators per tile (of 32 vector registers)
#else
const int kV = 8;
const int kAcc = 12;  // of 16
#endif
typedef float vecf __attribute__((vector_size(kV * sizeof(float))));

inline vecf splat(float x) {  // one broadcast instruction (a fill loop is not, once unrolled)
#ifdef __AVX512F__
  return (vecf)_mm512_set1_ps(x);
#else
  return (vecf)_mm256_set1_ps(x);
#endif
}

inline vecf loadv(const float *p) {
  vecf r;
  std::memcpy(&r, p, sizeof r);
  return r;
}

inline void storev(float *p, vecf v) { std::memcpy(p, &v, sizeof v); }

// Vectors of output channels per register tile: 2, or 1 for the last one of an odd count.
const int kCV = 2;

// One conv as seen by the direct kernels: C input channels in planes of H x W, zero-padded by P
// on every side (planes of Hp x Wp), O output channels in planes of Ho x Wo, a K x K kernel at
// stride S. Output pixel (oh, ow) reads padded pixel (S * oh + ky, S * ow + kx) at tap (ky, kx).
struct Direct {
  int64_t C, O, H, W, K, P, S, Ho, Wo, Hp, Wp, plane, HW, HWo, KK, nvec, opad;
  int64_t koff[64];  // tap t = ky * K + kx -> offset ky * Wp + kx in a padded plane
  // "same" conv: stride 1, odd K, padding K / 2
  Direct(int64_t c, int64_t o, int64_t h, int64_t w, int64_t k) : Direct(c, o, h, w, k, 1, k / 2, h, w) {}
  Direct(int64_t c, int64_t o, int64_t h, int64_t w, int64_t k, int64_t s, int64_t p, int64_t ho, int64_t wo)
      : C(c), O(o), H(h), W(w), K(k), P(p), S(s), Ho(ho), Wo(wo), Hp(h + 2 * p), Wp(w + 2 * p), plane(Hp * Wp),
        HW(h * w), HWo(ho * wo), KK(k * k), nvec((o + kV - 1) / kV), opad(nvec * kV) {
    for (int64_t t = 0; t < KK; ++t) koff[t] = (t / K) * Wp + t % K;
  }
};

// Split N images over the workers, each taking its run in groups of up to nb images (about
// 1024 pixels, whole images): fn(worker, first image, end image, nb).
template <class F>
void over_groups(const Direct &d, int64_t N, F fn) {
  const int64_t per_worker = (N + num_threads() - 1) / num_threads();
  const int64_t nb = std::max<int64_t>(1, std::min(per_worker, (1023 + d.HWo) / d.HWo));
  Geo split{};
  split.N = N;
  over_chunks(split, nb, [&](int t, int64_t lo, int64_t hi) { fn(t, lo, hi, nb); });
}

enum Pass { kForward = 0, kBackwardInput = 1, kBackwardFilter = 2 };

// Images at least this wide take the forward and input-gradient passes on direct_tile_rows (below).
const int64_t kRowsMinWidth = 12;
const int64_t kSlack = 64;  // floats past the padded planes that direct_tile_rows may read

// Direct or im2col + GEMM, per pass. Measured per layer of the tutorial U-Net at batch 16
// (2-core AVX-512 Xeon): the direct kernels are faster for the filter gradient of every layer
// and, for the forward and input-gradient passes, when the layer narrows (Co <= Ci: the GEMM
// then has a short side of Co); widening layers were as fast or faster with the GEMM until the
// row-ordered tiles (direct_tile_rows), which beat it for images >= 12 wide (quick.yaml's 32->64
// conv at 14x14, batch 64: 3.5 vs 4.7 ms forward, 3.0 vs 4.6 ms input gradient). The stride-2
// convs (4x4 and 3x3) are direct in every pass (about 2x the GEMM's speed forward and for the
// filter gradient; the input gradient by phases, below). Fewer than 8 channels (the 1-channel
// input conv) would leave most vector lanes idle.
bool use_direct(const Geo &g, int pass) {
  if (g.K < 3 || g.K * g.K > 64 || g.Ci < 8 || g.Co < 8) return false;
  if (g.S == 2) return true;
  if (g.K % 2 == 0) return false;
  return pass == kBackwardFilter || g.Co <= g.Ci || g.W >= kRowsMinWidth;
}

// Zero-padded planes of images n0 .. n0+nb-1 of t [N, C, H, W]: buf [nb, C, Hp, Wp].
void pad_planes(const float *t, const Direct &d, int64_t n0, int64_t nb, float *buf) {
  std::memset(buf, 0, sizeof(float) * nb * d.C * d.plane);
  for (int64_t j = 0; j < nb; ++j)
    for (int64_t c = 0; c < d.C; ++c) {
      const float *src = t + ((n0 + j) * d.C + c) * d.HW;
      float *dst = buf + (j * d.C + c) * d.plane + d.P * d.Wp + d.P;
      for (int64_t h = 0; h < d.H; ++h) std::memcpy(dst + h * d.Wp, src + h * d.W, sizeof(float) * d.W);
    }
}

// Pixel q < nb*HW of a group: its offset in the padded planes (channel 0, tap 0) and in an
// [nb, O, HW] output (channel 0); the list is padded to a multiple of `tile` with pixel 0.
void pixel_lists(const Direct &d, int64_t nb, int64_t tile, std::vector<int64_t> *in, std::vector<int64_t> *out) {
  const int64_t nq = nb * d.HWo, padded = (nq + tile - 1) / tile * tile;
  in->resize(padded);
  out->resize(padded);
  for (int64_t q = 0; q < padded; ++q) {
    const int64_t r = q < nq ? q : 0, j = r / d.HWo, p = r % d.HWo;
    (*in)[q] = j * d.C * d.plane + d.S * ((p / d.Wo) * d.Wp + p % d.Wo);
    (*out)[q] = q < nq ? j * d.O * d.HWo + p : -1;
  }
}

// Weights for the direct kernels: per tile of cv vectors of output channels (from vector v0),
// [C, KK, cv * kV] with zeros past O. wsrc(o, c, t) is the weight of output channel o, input
// channel c, tap t. Tile v0 starts at v0 * kV * C * KK.
template <class F>
std::vector<float> pack_weights(const Direct &d, F wsrc) {
  std::vector<float> wt(d.opad * d.C * d.KK, 0.0f);
  for (int64_t v0 = 0; v0 < d.nvec; v0 += kCV) {
    const int64_t lanes = std::min<int64_t>(kCV, d.nvec - v0) * kV;
    float *dst = wt.data() + v0 * kV * d.C * d.KK;
    for (int64_t c = 0; c < d.C; ++c)
      for (int64_t t = 0; t < d.KK; ++t)
        for (int64_t l = 0; l < lanes && v0 * kV + l < d.O; ++l) dst[(c * d.KK + t) * lanes + l] = wsrc(v0 * kV + l, c, t);
  }
  return wt;
}

// The register tile of the direct kernels: acc[i][j] = sum_{c, t} (weight vector i of channel c,
// tap t) * x[c * plane + koff[t] + px(j)] for the PX = kAcc / CV pixels j of the tile, px(j) their
// offsets from x. wt: the tile's packed weights ([C, KK, CV * kV], see pack_weights).
template <int CV, class Px>
inline void tile_sums(const Direct &d, const float *wt, const float *x, Px px, vecf (&acc)[CV][kAcc / CV]) {
  constexpr int PX = kAcc / CV;
  for (int c = 0; c < CV; ++c)
    for (int j = 0; j < PX; ++j) acc[c][j] = vecf{};
  const float *w = wt;
  for (int64_t c = 0; c < d.C; ++c, x += d.plane) {
    for (int64_t t = 0; t < d.KK; ++t, w += CV * kV) {
      vecf wv[CV];
#pragma GCC unroll 4
      for (int i = 0; i < CV; ++i) wv[i] = loadv(w + i * kV);
      const float *xt = x + d.koff[t];
#pragma GCC unroll 32
      for (int j = 0; j < PX; ++j) {
        const vecf xv = splat(xt[px(j)]);
#pragma GCC unroll 4
        for (int i = 0; i < CV; ++i) acc[i][j] += wv[i] * xv;
      }
    }
  }
}

// Pixel j of a tile to o[(o0 + l) * HWo] for its output channels o0 + l < O (o0 = v0 * kV).
template <int CV>
inline void store_pixel(const Direct &d, const vecf (&acc)[CV][kAcc / CV], int j, int64_t v0, float *o) {
  float lanes[CV * kV];
  for (int i = 0; i < CV; ++i) storev(lanes + i * kV, acc[i][j]);
  const int64_t o0 = v0 * kV, n = std::min<int64_t>(CV * kV, d.O - o0);
  for (int64_t l = 0; l < n; ++l) o[(o0 + l) * d.HWo] = lanes[l];
}

// out[pix_out[q] + o * HWo] = sum_{c, t} w[o, c, t] * xp[pix_in[q] + c * plane + koff[t]] for the
// CV * kV output channels o of the tile at vector v0 and all (padded) pixels q < nq.
template <int CV>
void direct_tile(const Direct &d, const float *wt, int64_t v0, const float *xp, const int64_t *pix_in,
                 const int64_t *pix_out, int64_t nq, float *out) {
  constexpr int PX = kAcc / CV;
  for (int64_t q0 = 0; q0 < nq; q0 += PX) {
    vecf acc[CV][PX];
    const int64_t *b = pix_in + q0;
    tile_sums<CV>(d, wt, xp, [b](int j) { return b[j]; }, acc);
    for (int j = 0; j < PX; ++j)
      if (pix_out[q0 + j] >= 0) store_pixel<CV>(d, acc, j, v0, out + pix_out[q0 + j]);
  }
}

// As direct_tile, for the pixels of one image taken in the order of its padded planes: pixel u
// (u = row * Wp + column, u < nu = (H - 1) * Wp + W) reads xb[u + c * plane + koff[t]], so the PX
// pixels of a tile are PX consecutive floats of every (channel, tap) row: one base pointer
// and fixed displacements, no per-pixel offsets to load and add (1.1-1.2x the speed at 28x28).
// The columns u % Wp >= W (the padding between rows) are computed and dropped (2/Wp of the work
// for K = 3); the last tile reads up to PX - 1 floats past the last plane (the buffer has kSlack
// floats more).
template <int CV>
void direct_tile_rows(const Direct &d, const float *wt, int64_t v0, const float *xb, int64_t nu, float *out) {
  constexpr int PX = kAcc / CV;
  for (int64_t u0 = 0; u0 < nu; u0 += PX) {
    vecf acc[CV][PX];
    tile_sums<CV>(d, wt, xb + u0, [](int j) { return j; }, acc);
    for (int j = 0; j < PX; ++j) {
      const int64_t u = u0 + j, col = u % d.Wp;
      if (u < nu && col < d.W) store_pixel<CV>(d, acc, j, v0, out + (u / d.Wp) * d.W + col);
    }
  }
}

// out [N, O, H, W] = conv(in [N, C, H, W]) with the packed weights wt.
void direct_conv(const Direct &d, int64_t N, const float *in, const std::vector<float> &wt, float *out) {
  over_groups(d, N, [&](int, int64_t lo, int64_t hi, int64_t nb_max) {
    std::unique_ptr<float[]> xp(new float[nb_max * d.C * d.plane + kSlack]);  // pad_planes fills it
    std::fill(xp.get() + nb_max * d.C * d.plane, xp.get() + nb_max * d.C * d.plane + kSlack, 0.0f);
    std::vector<int64_t> pin, pout;
    for (int64_t n0 = lo; n0 < hi; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, hi - n0);
      pad_planes(in, d, n0, nb, xp.get());
      if (d.S == 1 && d.W >= kRowsMinWidth) {
        const int64_t nu = (d.H - 1) * d.Wp + d.W;
        for (int64_t j = 0; j < nb; ++j) {
          const float *xb = xp.get() + j * d.C * d.plane;
          float *o = out + (n0 + j) * d.O * d.HWo;
          for (int64_t v0 = 0; v0 < d.nvec; v0 += kCV) {
            const float *w = wt.data() + v0 * kV * d.C * d.KK;
            if (d.nvec - v0 >= 2)
              direct_tile_rows<2>(d, w, v0, xb, nu, o);
            else
              direct_tile_rows<1>(d, w, v0, xb, nu, o);
          }
        }
        continue;
      }
      pixel_lists(d, nb, kAcc, &pin, &pout);
      float *o = out + n0 * d.O * d.HWo;
      for (int64_t v0 = 0; v0 < d.nvec; v0 += kCV) {
        const float *w = wt.data() + v0 * kV * d.C * d.KK;
        if (d.nvec - v0 >= 2)
          direct_tile<2>(d, w, v0, xp.get(), pin.data(), pout.data(), int64_t(pin.size()), o);
        else
          direct_tile<1>(d, w, v0, xp.get(), pin.data(), pout.data(), int64_t(pin.size()), o);
      }
    }
  });
}

// ----------------------------------------------------------------------------------------
// Winograd F(2x2, 3x3) (Lavin and Gray 2016) for the 3x3 "same" convs: every 2x2 block of output
// pixels (a "tile") is Y = A^T [U (.) V] A, with V = B^T d B of the 4x4 padded input patch d under
// it and U = G g G^T of each 3x3 kernel g: 16 multiplies per tile and channel pair instead of 36.
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 1 0 -1],  G = [1 0 0; .5 .5 .5; .5 -.5 .5; 0 0 1],
//   A^T = [1 1 1 0; 0 1 -1 -1].
// Tiles are the vector lanes throughout. Per block of tile rows (sized for L2): V[xi][c][t] for
// the 16 positions xi, one row of tiles at a time (vector ops over the tiles of the row); for
// every xi the product M[xi][o][t] = sum_c U[xi][o][c] V[xi][c][t] on a register tile of OB output
// channels (broadcast weights) x TV vectors of tiles; then Y per vector of tiles and output
// channel, scattered to the 2x2 pixels. Sums are taken in another order than the direct
// kernels' (results differ in the last bits; tests/test_kernels.py compares both with float64).
const int kWinoTV = 3;                // vectors of tiles per register tile
const int kWinoOB = kAcc / kWinoTV;   // output channels per register tile (8; 4 for AVX2)
const int64_t kWinoCols = kWinoTV * kV;

typedef int veci __attribute__((vector_size(kV * sizeof(int))));

struct Winograd {
  int64_t C, O, H, W, TH, TW, TWV;  // tiles TH x TW; TWV vectors of tiles per tile row
  Winograd(int64_t c, int64_t o, int64_t h, int64_t w)
      : C(c), O(o), H(h), W(w), TH((h + 1) / 2), TW((w + 1) / 2), TWV((TW + kV - 1) / kV) {}
  int64_t tiles() const { return TH * TW; }
};

// Loads of kV floats of an image row from column x, the lanes outside [0, W) zero and not read
// (masked loads: x may be -1 or reach past W).
struct RowLoad {
  int64_t x;
#ifdef __AVX512F__
  __mmask16 m;
  RowLoad(int64_t x0, int64_t W) : x(x0) {
    const int64_t lo = std::max<int64_t>(0, -x0), hi = std::max<int64_t>(lo, std::min<int64_t>(kV, W - x0));
    m = static_cast<__mmask16>(((1u << hi) - 1) & ~((1u << lo) - 1));
  }
  vecf operator()(const float *row) const { return (vecf)_mm512_maskz_loadu_ps(m, row + x); }
#else
  __m256i m;
  RowLoad(int64_t x0, int64_t W) : x(x0) {
    const __m256i lane = _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7), col = _mm256_add_epi32(lane, _mm256_set1_epi32(int(x0)));
    m = _mm256_and_si256(_mm256_cmpgt_epi32(col, _mm256_set1_epi32(-1)), _mm256_cmpgt_epi32(_mm256_set1_epi32(int(W)), col));
  }
  vecf operator()(const float *row) const { return (vecf)_mm256_maskload_ps(row + x, m); }
#endif
};

// The row loads of winograd_input, 4 per vector q of tiles: padded columns 2 kV q .. as (A, B) from
// 2 kV q and (A2, B2) from 2 kV q + 2 (input columns one less).
std::vector<RowLoad> winograd_row_loads(const Winograd &g) {
  std::vector<RowLoad> loads;
  for (int64_t q = 0; q < g.TWV; ++q)
    for (int64_t off : {-1, kV - 1, 1, kV + 1}) loads.emplace_back(2 * kV * q + off, g.W);
  return loads;
}

// V[(xi * C + c) * ld + (r - r0) * TW + tx] for the tile rows r0 .. r0+nr-1 of the images from n0
// of in [N, C, H, W] (tile row r: image n0 + r / TH, input rows 2 (r % TH) - 1 .. + 2), kV tiles at
// a time straight from the input (padded column x is input column x - 1): per input row, d B
// (columns 2 tx .. 2 tx + 3 from its even and odd columns), then B^T (d B) over the 4 rows. Each
// row of tiles is written as whole vectors: the lanes past TW land in the next row's place
// (written after) or in the slack after the block (ld >= nr TW + TWV kV). loads: winograd_row_loads(g).
void winograd_input(const Winograd &g, const std::vector<RowLoad> &loads, const float *in, int64_t n0, int64_t r0,
                    int64_t nr, int64_t ld, float *v) {
  veci even, odd;
  for (int l = 0; l < kV; ++l) {
    even[l] = 2 * l;
    odd[l] = 2 * l + 1;
  }
  const int64_t xs = g.C * ld;
  for (int64_t c = 0; c < g.C; ++c)
    for (int64_t r = r0; r < r0 + nr; ++r) {
      const int64_t ty = r % g.TH;
      const float *plane = in + ((n0 + r / g.TH) * g.C + c) * g.H * g.W;
      float *const vrow = v + c * ld + (r - r0) * g.TW;
      for (int64_t q = 0; q < g.TWV; ++q) {
        const RowLoad *ld4 = loads.data() + 4 * q;
        vecf col[4][4];  // d B of the 4 input rows
        for (int k = 0; k < 4; ++k) {
          const int64_t h = 2 * ty - 1 + k;
          if (h < 0 || h >= g.H) {
            for (int l = 0; l < 4; ++l) col[k][l] = vecf{};
            continue;
          }
          const float *row = plane + h * g.W;
          const vecf a = ld4[0](row), b = ld4[1](row), a2 = ld4[2](row), b2 = ld4[3](row);
          const vecf e0 = __builtin_shuffle(a, b, even), d0 = __builtin_shuffle(a, b, odd);
          const vecf e1 = __builtin_shuffle(a2, b2, even), d1 = __builtin_shuffle(a2, b2, odd);
          col[k][0] = e0 - e1;
          col[k][1] = d0 + e1;
          col[k][2] = e1 - d0;
          col[k][3] = d0 - d1;
        }
        float *vq = vrow + q * kV;
        for (int l = 0; l < 4; ++l) {  // B^T (d B): position xi = 4 k + l
          storev(vq + l * xs, col[0][l] - col[2][l]);
          storev(vq + (4 + l) * xs, col[1][l] + col[2][l]);
          storev(vq + (8 + l) * xs, col[2][l] - col[1][l]);
          storev(vq + (12 + l) * xs, col[1][l] - col[3][l]);
        }
      }
    }
}

// M[o][t] = sum_c U[o][c] V[c][t] for OB output channels from packed u ([C][kWinoOB]) and the
// kWinoCols tiles from v (rows of ld floats); m: rows of ld floats.
template <int OB>
inline void winograd_product(const float *u, const float *v, int64_t C, int64_t ld, float *m) {
  vecf acc[OB][kWinoTV];
  for (int i = 0; i < OB; ++i)
    for (int j = 0; j < kWinoTV; ++j) acc[i][j] = vecf{};
  for (int64_t c = 0; c < C; ++c, v += ld, u += kWinoOB) {
    vecf x[kWinoTV];
#pragma GCC unroll 4
    for (int j = 0; j < kWinoTV; ++j) x[j] = loadv(v + j * kV);
#pragma GCC unroll 8
    for (int i = 0; i < OB; ++i) {
      const vecf w = splat(u[i]);
#pragma GCC unroll 4
      for (int j = 0; j < kWinoTV; ++j) acc[i][j] += w * x[j];
    }
  }
  for (int i = 0; i < OB; ++i)
    for (int j = 0; j < kWinoTV; ++j) storev(m + i * ld + j * kV, acc[i][j]);
}

template <int OB = kWinoOB>
void winograd_product_n(int ob, const float *u, const float *v, int64_t C, int64_t ld, float *m) {
  if constexpr (OB > 1) {
    if (ob < OB) return winograd_product_n<OB - 1>(ob, u, v, C, ld, m);
  }
  winograd_product<OB>(u, v, C, ld, m);
}

// out [N, O, H, W] = the 3x3 "same" conv of in [N, C, H, W] with weights wsrc(o, c, t).
template <class F>
void winograd_conv(const Winograd &g, int64_t N, const float *in, F wsrc, float *out) {
  const int64_t nob = (g.O + kWinoOB - 1) / kWinoOB;
  // U[xi][o block][c][kWinoOB] = G g G^T, computed in float64; zero past O
  std::vector<float> U(16 * nob * g.C * kWinoOB, 0.0f);
  for (int64_t o = 0; o < g.O; ++o)
    for (int64_t c = 0; c < g.C; ++c) {
      double k[3][3], gk[4][3];
      for (int t = 0; t < 9; ++t) k[t / 3][t % 3] = wsrc(o, c, t);
      for (int col = 0; col < 3; ++col) {
        gk[0][col] = k[0][col];
        gk[1][col] = 0.5 * (k[0][col] + k[1][col] + k[2][col]);
        gk[2][col] = 0.5 * (k[0][col] - k[1][col] + k[2][col]);
        gk[3][col] = k[2][col];
      }
      for (int r = 0; r < 4; ++r) {
        const double row[4] = {gk[r][0], 0.5 * (gk[r][0] + gk[r][1] + gk[r][2]), 0.5 * (gk[r][0] - gk[r][1] + gk[r][2]),
                               gk[r][2]};
        for (int q = 0; q < 4; ++q)
          U[(((r * 4 + q) * nob + o / kWinoOB) * g.C + c) * kWinoOB + o % kWinoOB] = float(row[q]);
      }
    }
  // Tile rows per block: V (16 C ld floats) and M (16 O ld floats) of a block stay in L2 (about
  // 768 KB), and the block's tiles fill the register tiles' kWinoCols columns well.
  const int64_t budget = std::max<int64_t>(kWinoCols, 12288 / (g.C + g.O));
  int64_t rows_per_block = 1;
  double best = 0.0;
  for (int64_t rows = std::max<int64_t>(1, budget / g.TW); rows >= 1 && rows * 2 * g.TW >= budget; --rows) {
    const int64_t nt = rows * g.TW;
    const double fill = double(nt) / double((nt + kWinoCols - 1) / kWinoCols * kWinoCols);
    if (fill > best + 1e-9) {
      best = fill;
      rows_per_block = rows;
    }
  }
  const int64_t ld = (rows_per_block * g.TW + kWinoCols - 1) / kWinoCols * kWinoCols + g.TWV * kV;
  const std::vector<RowLoad> loads = winograd_row_loads(g);
  Direct split(g.C, g.O, g.H, g.W, 3);  // images per group as for the direct kernels
  over_groups(split, N, [&](int, int64_t lo, int64_t hi, int64_t nb_max) {
    std::unique_ptr<float[]> v(new float[16 * g.C * ld]), m(new float[16 * g.O * ld + kWinoOB * ld]);
    std::vector<int64_t> pos(ld);
    std::vector<unsigned char> part(ld);
    std::fill(v.get(), v.get() + 16 * g.C * ld, 0.0f);  // lanes past a block's tiles stay finite
    for (int64_t n0 = lo; n0 < hi; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, hi - n0);
      for (int64_t r0 = 0; r0 < nb * g.TH; r0 += rows_per_block) {
        const int64_t nr = std::min(rows_per_block, nb * g.TH - r0), nt = nr * g.TW;
        winograd_input(g, loads, in, n0, r0, nr, ld, v.get());
        for (int xi = 0; xi < 16; ++xi)
          for (int64_t ob = 0; ob < nob; ++ob) {
            const float *u = U.data() + (xi * nob + ob) * g.C * kWinoOB;
            const int n = int(std::min<int64_t>(kWinoOB, g.O - ob * kWinoOB));
            for (int64_t t0 = 0; t0 < nt; t0 += kWinoCols)
              winograd_product_n(n, u, v.get() + xi * g.C * ld + t0, g.C, ld,
                                 m.get() + (xi * g.O + ob * kWinoOB) * ld + t0);
          }
        // Y = A^T M A for kV tiles at a time, scattered to their 2x2 pixels
        for (int64_t t = 0; t < nt; ++t) {  // where each tile's pixels go; bit 0: a right column, 1: a row below
          const int64_t r = r0 + t / g.TW, ty = r % g.TH, tx = t % g.TW;
          pos[t] = (n0 + r / g.TH) * g.O * g.H * g.W + 2 * ty * g.W + 2 * tx;
          part[t] = (2 * tx + 1 < g.W ? 1 : 0) | (2 * ty + 1 < g.H ? 2 : 0);
        }
        const int64_t HW = g.H * g.W, xs = g.O * ld;
        for (int64_t o = 0; o < g.O; ++o)
          for (int64_t t0 = 0; t0 < nt; t0 += kV) {
            const float *mo = m.get() + o * ld + t0;
            vecf s0[4], s1[4];
            for (int q = 0; q < 4; ++q) {
              const vecf a0 = loadv(mo + q * xs), a1 = loadv(mo + (4 + q) * xs), a2 = loadv(mo + (8 + q) * xs),
                         a3 = loadv(mo + (12 + q) * xs);
              s0[q] = a0 + a1 + a2;
              s1[q] = a1 - a2 - a3;
            }
            float y[4][kV];
            storev(y[0], s0[0] + s0[1] + s0[2]);
            storev(y[1], s0[1] - s0[2] - s0[3]);
            storev(y[2], s1[0] + s1[1] + s1[2]);
            storev(y[3], s1[1] - s1[2] - s1[3]);
            const int64_t n = std::min<int64_t>(kV, nt - t0);
            for (int64_t l = 0; l < n; ++l) {
              float *p = out + pos[t0 + l] + o * HW;
              p[0] = y[0][l];
              if (part[t0 + l] == 3) {
                p[1] = y[1][l];
                p[g.W] = y[2][l];
                p[g.W + 1] = y[3][l];
              } else {
                if (part[t0 + l] & 1) p[1] = y[1][l];
                if (part[t0 + l] & 2) p[g.W] = y[2][l];
              }
            }
          }
      }
    }
  });
}

// Winograd for the 3x3 stride-1 convs of images at least this wide. Measured against the direct
// kernels (python benchmarks/bench_convs.py --config configs/quick.yaml --batch 64, interleaved;
// 2-core Intel Xeon VM): 1.3-1.4x as fast at 28x28 and 14x14 (32 and 64 channels), as fast for
// 128 -> 32 channels at 14x14, 0.75-0.8x at 7x7 (16 tiles of 2x2 for 49 pixels, and rows of 4 tiles
// in vectors of 16 lanes in the input transform).
const int64_t kWinogradMinWidth = 12;

// The stride-1 "same" conv of in with weights wsrc(o, c, t): Winograd or the direct tiles.
template <class F>
void same_conv(const Direct &d, int64_t N, const float *in, F wsrc, float *out) {
  if (d.K == 3 && d.W >= kWinogradMinWidth)
    winograd_conv(Winograd(d.C, d.O, d.H, d.W), N, in, wsrc, out);
  else
    direct_conv(d, N, in, pack_weights(d, wsrc), out);
}

void direct_forward(const float *x, const float *w, float *y, const Geo &g) {
  const Direct d(g.Ci, g.Co, g.H, g.W, g.K, g.S, g.P, g.Ho, g.Wo);
  const int64_t KK = d.KK;
  auto wsrc = [&](int64_t o, int64_t c, int64_t t) { return w[(o * g.Ci + c) * KK + t]; };
  if (g.S == 1)
    same_conv(d, g.N, x, wsrc, y);
  else
    direct_conv(d, g.N, x, pack_weights(d, wsrc), y);
}

void direct_backward_input(const float *dy, const float *w, float *dx, const Geo &g) {
  const Direct d(g.Co, g.Ci, g.H, g.W, g.K);  // reads dy's Co channels, writes dx's Ci
  const int64_t KK = d.KK;
  same_conv(d, g.N, dy, [&](int64_t o, int64_t c, int64_t t) { return w[(c * g.Ci + o) * KK + KK - 1 - t]; }, dx);
}

// The input gradient of a stride-2 conv (and so the forward pass of the transposed conv) as four
// small stride-1 convs, one per phase (a, b) = ((ih + P) % 2, (iw + P) % 2) of the dx pixels:
// pixel (ih, iw) of phase (a, b), with m = (ih + P - a) / 2 and n = (iw + P - b) / 2, takes only the
// taps ky = a + 2e, kx = b + 2f (e, f >= 0, inside the kernel), each reading dy[m - e, n - f]:
//   dx[ci, ih, iw] = sum_{co, e, f} w[co, ci, a + 2e, b + 2f] * dy[co, m - e, n - f].
// dy is zero-padded by Q on every side (enough for every e, f and the last m, n); the direct tile
// reads it through per-pixel offsets as the forward pass does, with the taps of the phase.
void direct_backward_input_strided(const float *dy, const float *w, float *dx, const Geo &g) {
  const int64_t Q = std::max<int64_t>({(g.K - 1) / 2, (g.H - 1 + g.P) / 2 - (g.Ho - 1),
                                       (g.W - 1 + g.P) / 2 - (g.Wo - 1), 0});
  // planes of dy (Co channels, Ho x Wo, padded by Q), outputs dx (Ci channels, H x W)
  const Direct base(g.Co, g.Ci, g.Ho, g.Wo, 1, 1, Q, g.H, g.W);
  struct Phase {
    Direct d;
    int64_t a, b, ne, nf;
    std::vector<float> wt;
  };
  std::vector<Phase> phases;
  for (int64_t a = 0; a < 2; ++a)
    for (int64_t b = 0; b < 2; ++b) {
      Phase ph{base, a, b, (g.K - a + 1) / 2, (g.K - b + 1) / 2, {}};
      ph.d.KK = ph.ne * ph.nf;
      for (int64_t t = 0; t < ph.d.KK; ++t) ph.d.koff[t] = (ph.ne - 1 - t / ph.nf) * base.Wp + (ph.nf - 1 - t % ph.nf);
      ph.wt = pack_weights(ph.d, [&](int64_t o, int64_t c, int64_t t) {
        return w[((c * g.Ci + o) * g.K + a + 2 * (t / ph.nf)) * g.K + b + 2 * (t % ph.nf)];
      });
      phases.push_back(std::move(ph));
    }
  over_groups(base, g.N, [&](int, int64_t lo, int64_t hi, int64_t nb_max) {
    std::unique_ptr<float[]> xp(new float[nb_max * base.C * base.plane]);  // pad_planes fills it
    std::vector<int64_t> pin, pout;
    for (int64_t n0 = lo; n0 < hi; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, hi - n0);
      pad_planes(dy, base, n0, nb, xp.get());
      for (const Phase &ph : phases) {
        pin.clear();
        pout.clear();
        for (int64_t j = 0; j < nb; ++j)
          for (int64_t ih = (ph.a + 2 - g.P % 2) % 2; ih < g.H; ih += 2)
            for (int64_t iw = (ph.b + 2 - g.P % 2) % 2; iw < g.W; iw += 2) {
              const int64_t m = (ih + g.P - ph.a) / 2, n = (iw + g.P - ph.b) / 2;
              pin.push_back(j * base.C * base.plane + (m - (ph.ne - 1) + Q) * base.Wp + n - (ph.nf - 1) + Q);
              pout.push_back(j * base.O * base.HWo + ih * g.W + iw);
            }
        if (pin.empty()) continue;
        while (pin.size() % kAcc) {  // pad to whole tiles with copies of the first pixel, dropped
          pin.push_back(pin[0]);
          pout.push_back(-1);
        }
        float *o = dx + n0 * base.O * base.HWo;
        for (int64_t v0 = 0; v0 < base.nvec; v0 += kCV) {
          const float *wv = ph.wt.data() + v0 * kV * base.C * ph.d.KK;
          if (base.nvec - v0 >= 2)
            direct_tile<2>(ph.d, wv, v0, xp.get(), pin.data(), pout.data(), int64_t(pin.size()), o);
          else
            direct_tile<1>(ph.d, wv, v0, xp.get(), pin.data(), pout.data(), int64_t(pin.size()), o);
        }
      }
    }
  });
}

// The planes of one image src [C, H, W] as pixel-major channel vectors: dst[(h * ld + w) * cpad + c],
// kV channels at a time (kV sequential reads, one vector store per pixel); lanes past C are left alone.
void to_channel_vectors(const float *src, int64_t C, int64_t H, int64_t W, int64_t ld, int64_t cpad, float *dst) {
  const int64_t HW = H * W;
  for (int64_t c0 = 0; c0 < C; c0 += kV) {
    const int64_t nc = std::min<int64_t>(kV, C - c0);
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const float *s = src + c0 * HW + h * W + w;
        float *d = dst + (h * ld + w) * cpad + c0;
        if (nc == kV) {
          float lanes[kV];
          for (int l = 0; l < kV; ++l) lanes[l] = s[l * HW];
          storev(d, loadv(lanes));
        } else {
          for (int64_t l = 0; l < nc; ++l) d[l] = s[l * HW];
        }
      }
  }
}

// acc[r, i * kV + l] += sum_q dyt[q, o0 + i * kV + l] * xp[pix_in[q] + roff[r]] for r < R, i < CV.
template <int CV, int R>
void filter_tile(const float *dyt, int64_t opad, int64_t o0, const float *xp, const int64_t *pix_in,
                 int64_t nq, const int64_t *roff, float *acc_out) {
  vecf acc[CV][R];
  for (int i = 0; i < CV; ++i)
    for (int r = 0; r < R; ++r) acc[i][r] = vecf{};
  for (int64_t q = 0; q < nq; ++q) {
    vecf dv[CV];
#pragma GCC unroll 4
    for (int i = 0; i < CV; ++i) dv[i] = loadv(dyt + q * opad + o0 + i * kV);
    const float *x = xp + pix_in[q];
#pragma GCC unroll 32
    for (int r = 0; r < R; ++r) {
      const vecf xv = splat(x[roff[r]]);
#pragma GCC unroll 4
      for (int i = 0; i < CV; ++i) acc[i][r] += dv[i] * xv;
    }
  }
  for (int r = 0; r < R; ++r)
    for (int i = 0; i < CV; ++i) {
      float *p = acc_out + r * CV * kV + i * kV;
      storev(p, loadv(p) + acc[i][r]);
    }
}

void direct_backward_filter(const float *dy, const float *x, float *dw, const Geo &g) {
  const Direct d(g.Ci, g.Co, g.H, g.W, g.K, g.S, g.P, g.Ho, g.Wo);  // planes of x (Ci channels), lanes over Co
  constexpr int R = kAcc / kCV;  // (input channel, tap) pairs per tile
  const int64_t rows = d.C * d.KK, rpad = (rows + R - 1) / R * R;
  std::vector<int64_t> roff(rpad, 0);  // padded rows read plane offset 0 and are dropped
  for (int64_t r = 0; r < rows; ++r) roff[r] = (r / d.KK) * d.plane + d.koff[r % d.KK];
  const int64_t qchunk = 128;  // pixels per pass: a pass's dy rows stay in L1
  // per worker: acc[tile at v0][r][cv * kV], the tiles one after another as in pack_weights
  std::vector<std::vector<float>> part(num_threads());
  over_groups(d, g.N, [&](int t, int64_t lo, int64_t hi, int64_t nb_max) {
    std::vector<float> &acc = part[t];
    acc.assign(d.opad * rpad, 0.0f);
    std::unique_ptr<float[]> xp(new float[nb_max * d.C * d.plane]);  // pad_planes fills it
    std::vector<float> dyt;
    std::vector<int64_t> pin, pout;
    for (int64_t n0 = lo; n0 < hi; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, hi - n0), nq = nb * d.HWo;
      pad_planes(x, d, n0, nb, xp.get());
      pixel_lists(d, nb, 1, &pin, &pout);
      dyt.assign(nq * d.opad, 0.0f);  // pixel-major dy, zero in the padded channels
      for (int64_t j = 0; j < nb; ++j)
        to_channel_vectors(dy + (n0 + j) * d.O * d.HWo, d.O, d.Ho, d.Wo, d.Wo, d.opad, dyt.data() + j * d.HWo * d.opad);
      for (int64_t q0 = 0; q0 < nq; q0 += qchunk) {
        const int64_t nqc = std::min(qchunk, nq - q0);
        const float *dq = dyt.data() + q0 * d.opad;
        for (int64_t v0 = 0; v0 < d.nvec; v0 += kCV) {
          float *a = acc.data() + v0 * kV * rpad;
          for (int64_t r0 = 0; r0 < rpad; r0 += R) {
            if (d.nvec - v0 >= 2)
              filter_tile<kCV, R>(dq, d.opad, v0 * kV, xp.get(), pin.data() + q0, nqc, roff.data() + r0,
                                  a + r0 * kCV * kV);
            else
              filter_tile<1, R>(dq, d.opad, v0 * kV, xp.get(), pin.data() + q0, nqc, roff.data() + r0, a + r0 * kV);
          }
        }
      }
    }
  });
  // dw[o, c, t] = sum over workers of acc[tile(o)][r = c * KK + t][lane(o)]
  for (int64_t v0 = 0; v0 < d.nvec; v0 += kCV) {
    const int64_t lanes = std::min<int64_t>(kCV, d.nvec - v0) * kV;
    for (int64_t l = 0; l < lanes && v0 * kV + l < d.O; ++l)
      for (int64_t r = 0; r < rows; ++r) {
        float s = 0.0f;
        for (const auto &a : part)
          if (!a.empty()) s += a[v0 * kV * rpad + r * lanes + l];
        dw[(v0 * kV + l) * rows + r] = s;
      }
  }
}

// ----------------------------------------------------------------------------------------
// Images at least this wide take the filter gradient of their 3x3 stride-1 convs on Winograd
// (python benchmarks/bench_convs.py --config configs/fashion_mnist_20min.yaml --batch 32 --base REV,
// 2-core AMD EPYC Zen 5 VM): 1.3-1.5x the direct kernel's speed at 28x28 and 14x14 (32 to 128
// input channels), 0.75-0.9x at 7x7 (16 tiles for 49 pixels).
const int64_t kWinogradFilterMinWidth = 12;

// Winograd F(3x3, 2x2) for the filter gradient of the 3x3 "same" convs. Over every 2x2 block of
// output pixels (a tile), dw[o, c] gains the 3x3 correlation of the 4x4 padded input patch d under
// the tile with the tile's 2x2 dy values g, which is dw_tile = A^T [(G g G^T) (.) (B^T d B)] A with
//   B^T = [1 0 -1 0; 0 1 1 0; 0 -1 1 0; 0 -1 0 1],  G = [1 0; .5 .5; .5 -.5; 0 1],
//   A^T = [1 1 1 0; 0 1 -1 0; 0 1 1 1]
// (points 0, 1, -1 and infinity). The sum over tiles is taken before A^T . A, so per position xi
// of the 4x4 transformed tile it is a matrix product M[xi][o][c] = sum_t U[xi][t][o] V[xi][t][c]:
// 16 multiplies per tile and channel pair instead of the direct kernels' 36. The transforms run
// on channel vectors of NHWC copies of x (zero-padded) and dy; the products on filter_tile, with
// the tiles in place of the pixels and the channels c in place of the (channel, tap) rows.
void winograd_backward_filter(const float *dy, const float *x, float *dw, const Geo &g) {
  const int64_t C = g.Ci, O = g.Co, H = g.H, W = g.W, TH = (H + 1) / 2, TW = (W + 1) / 2, tiles = TH * TW;
  const int64_t cpad = (C + kV - 1) / kV * kV, opad = (O + kV - 1) / kV * kV, nvec = opad / kV;
  const int64_t Hp = 2 * TH + 2, Wp = 2 * TW + 2;  // x padded by one before, to the last tile's end after
  constexpr int R = kAcc / kCV;
  const int64_t rpad = (C + R - 1) / R * R;
  std::vector<int64_t> roff(rpad, 0);  // row r of a tile reads channel r; padded rows read 0 and are dropped
  for (int64_t r = 0; r < C; ++r) roff[r] = r;
  const int64_t ablock = opad * rpad;  // accumulators per position xi, laid out as in direct_backward_filter
  std::vector<std::vector<float>> part(num_threads());
  // tiles per pass: their transforms (16 tq (cpad + opad) floats) stay in L2 (about 1 MB); images
  // per group: as many as fill a pass (at least one, whose tiles then take several passes)
  const int64_t budget = std::max<int64_t>(4 * kAcc, 16384 / (cpad + opad));
  const int64_t per_worker = (g.N + num_threads() - 1) / num_threads();
  const int64_t nb_max = std::max<int64_t>(1, std::min(per_worker, budget / tiles));
  const int64_t tq = std::min(nb_max * tiles, budget);
  Geo split{};
  split.N = g.N;
  over_chunks(split, nb_max, [&](int t, int64_t lo, int64_t hi) {
    std::vector<float> &acc = part[t];
    acc.assign(16 * ablock, 0.0f);
    std::vector<float> xh(nb_max * Hp * Wp * cpad), dh(nb_max * 4 * tiles * opad);
    std::vector<float> V(16 * tq * cpad), U(16 * tq * opad);
    std::vector<int64_t> pin(tq);
    for (int64_t q = 0; q < tq; ++q) pin[q] = q * cpad;
    for (int64_t n0 = lo; n0 < hi; n0 += nb_max) {
      const int64_t nb = std::min(nb_max, hi - n0), nt = nb * tiles;
      std::fill(xh.begin(), xh.end(), 0.0f);
      std::fill(dh.begin(), dh.end(), 0.0f);
      for (int64_t j = 0; j < nb; ++j) {
        to_channel_vectors(x + (n0 + j) * C * H * W, C, H, W, Wp, cpad, xh.data() + ((j * Hp + 1) * Wp + 1) * cpad);
        to_channel_vectors(dy + (n0 + j) * O * H * W, O, H, W, 2 * TW, opad, dh.data() + j * 4 * tiles * opad);
      }
      for (int64_t q0 = 0; q0 < nt; q0 += tq) {
        const int64_t nq = std::min(tq, nt - q0);
        // V[xi][q][c] = B^T d B and U[xi][q][o] = G g G^T for tile q0 + q = (image j, row ty, column tx)
        for (int64_t q = 0; q < nq; ++q) {
          const int64_t j = (q0 + q) / tiles, ty = ((q0 + q) % tiles) / TW, tx = (q0 + q) % TW;
          const float *d0 = xh.data() + ((j * Hp + 2 * ty) * Wp + 2 * tx) * cpad;
          for (int64_t c = 0; c < cpad; c += kV) {
            vecf e[4][4];  // B^T d over the rows, then (B^T d) B over the columns
            for (int l = 0; l < 4; ++l) {
              const float *p = d0 + l * cpad + c;
              const vecf r0 = loadv(p), r1 = loadv(p + Wp * cpad), r2 = loadv(p + 2 * Wp * cpad), r3 = loadv(p + 3 * Wp * cpad);
              e[0][l] = r0 - r2;
              e[1][l] = r1 + r2;
              e[2][l] = r2 - r1;
              e[3][l] = r3 - r1;
            }
            for (int k = 0; k < 4; ++k) {
              float *v = V.data() + ((4 * k) * tq + q) * cpad + c;
              const int64_t xs = tq * cpad;
              storev(v, e[k][0] - e[k][2]);
              storev(v + xs, e[k][1] + e[k][2]);
              storev(v + 2 * xs, e[k][2] - e[k][1]);
              storev(v + 3 * xs, e[k][3] - e[k][1]);
            }
          }
          const float *g0 = dh.data() + ((j * 2 * TH + 2 * ty) * 2 * TW + 2 * tx) * opad;
          const vecf half = splat(0.5f);
          for (int64_t o = 0; o < opad; o += kV) {
            const vecf a = loadv(g0 + o), b = loadv(g0 + opad + o), c2 = loadv(g0 + 2 * TW * opad + o),
                       d2 = loadv(g0 + (2 * TW + 1) * opad + o);
            const vecf rows[4][2] = {{a, b}, {(a + c2) * half, (b + d2) * half}, {(a - c2) * half, (b - d2) * half}, {c2, d2}};
            const int64_t xs = tq * opad;
            for (int k = 0; k < 4; ++k) {
              float *u = U.data() + ((4 * k) * tq + q) * opad + o;
              storev(u, rows[k][0]);
              storev(u + xs, (rows[k][0] + rows[k][1]) * half);
              storev(u + 2 * xs, (rows[k][0] - rows[k][1]) * half);
              storev(u + 3 * xs, rows[k][1]);
            }
          }
        }
        for (int xi = 0; xi < 16; ++xi) {
          const float *u = U.data() + xi * tq * opad, *v = V.data() + xi * tq * cpad;
          for (int64_t v0 = 0; v0 < nvec; v0 += kCV) {
            float *a = acc.data() + xi * ablock + v0 * kV * rpad;
            for (int64_t r0 = 0; r0 < rpad; r0 += R) {
              if (nvec - v0 >= 2)
                filter_tile<kCV, R>(u, opad, v0 * kV, v, pin.data(), nq, roff.data() + r0, a + r0 * kCV * kV);
              else
                filter_tile<1, R>(u, opad, v0 * kV, v, pin.data(), nq, roff.data() + r0, a + r0 * kV);
            }
          }
        }
      }
    }
  });
  // dw[o, c] = A^T M A, M[xi] summed over the workers (float64)
  for (int64_t o = 0; o < O; ++o) {
    const int64_t v0 = o / kV / kCV * kCV, lanes = std::min<int64_t>(kCV, nvec - v0) * kV, l = o - v0 * kV;
    for (int64_t c = 0; c < C; ++c) {
      double m[4][4];
      for (int xi = 0; xi < 16; ++xi) {
        double s = 0.0;
        for (const auto &a : part)
          if (!a.empty()) s += a[xi * ablock + v0 * kV * rpad + c * lanes + l];
        m[xi / 4][xi % 4] = s;
      }
      double t[3][4];
      for (int k = 0; k < 4; ++k) {
        t[0][k] = m[0][k] + m[1][k] + m[2][k];
        t[1][k] = m[1][k] - m[2][k];
        t[2][k] = m[1][k] + m[2][k] + m[3][k];
      }
      float *out = dw + (o * C + c) * 9;
      for (int k = 0; k < 3; ++k) {
        out[k * 3] = float(t[k][0] + t[k][1] + t[k][2]);
        out[k * 3 + 1] = float(t[k][1] - t[k][2]);
        out[k * 3 + 2] = float(t[k][1] + t[k][2] + t[k][3]);
      }
    }
  }
}

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
  const bool direct = use_direct(g, pass);
  if (pass == kForward) (direct ? direct_forward : forward)(a, b, out, g);
  if (pass == kBackwardInput)
    (direct ? (g.S == 1 ? direct_backward_input : direct_backward_input_strided) : backward_input)(a, b, out, g);
  if (pass == kBackwardFilter)
    (direct ? (g.S == 1 && g.K == 3 && g.W >= kWinogradFilterMinWidth ? winograd_backward_filter : direct_backward_filter)
            : backward_filter)(a, b, out, g);
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

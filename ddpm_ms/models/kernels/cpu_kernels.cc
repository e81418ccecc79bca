// Exact float32 CPU kernels for ddpm_ms (MindSpore "aot" custom operators).
//
// Compiled on the machine that runs them (see ddpm_ms/kernels/__init__.py) with
// g++ -O3 -march=native -fopenmp-simd -pthread; never shipped as a binary. Every function has the
// MindSpore aot signature
//     int name(int nparam, void **params, int *ndims, int64_t **shapes,
//              const char **dtypes, void *stream, void *extra)
// where params holds the inputs followed by the outputs, all contiguous float32.
//
// Threads: large kernels split their work over the library's own worker threads (common.h:
// started once, a wake-up per call instead of starting a std::thread per call, about 30 us;
// they spin at most 50 us after a job, then sleep). No OpenMP runtime is used for this:
// libgomp's long spin-waiting worker threads fight MindSpore's own thread pool for the cores
// and made a whole train step 2x slower. ``#pragma omp simd`` (-fopenmp-simd) only asks for
// vectorisation. The thread count is the number of CPUs this process may run on, or
// DDPM_MS_KERNEL_THREADS if set.
//
// Kernels (all compute the same mathematical function as the MindSpore op they replace):
//   gelu_fwd(x) -> y                      y = x * Phi(x), Phi = standard normal CDF (erf form)
//   gelu_bwd(x, dy) -> dx                 dx = dy * (Phi(x) + x * phi(x))
//   silu_fwd(x) -> y                      y = x * sigmoid(x)
//   silu_bwd(x, dy) -> dx                 dx = dy * s * (1 + x * (1 - s))
//   group_norm_fwd(x[N,G,Cg,HW], gamma[C], beta[C]) -> y[N,G,Cg,HW], mean[N,G], rstd[N,G]
//   group_norm_bwd(dy, x, mean, rstd, gamma) -> dx, dgamma[C], dbeta[C]
//   dwconv_fwd(x[N,C,H,W], w[C,1,K,K]) -> y          depthwise, stride 1, zero pad K/2
//   dwconv_bwd_input(dy, w) -> dx
//   dwconv_bwd_filter(dy, x, w) -> dw[C,1,K,K]  (w only gives the kernel shape)
//   plane_add_fwd(x[N,C,H,W], b[N,C]) -> y   y = x + b[:, :, None, None] (the U-Net's time shift)
//   plane_sum_fwd(dy[N,C,H,W]) -> db[N,C]    its b-gradient: sum over H, W
//   bias_add_fwd(x[N,C,H,W], b[C]) -> y      y = x + b[None, :, None, None] (a convolution's bias)
//   bias_grad(dy[N,C,H,W]) -> db[C]          its b-gradient: sum over N, H, W
//   upsample2x_fwd(x[N,C,H,W]) -> y[N,C,2H,2W]   nearest-neighbour x2: y[.., i, j] = x[.., i/2, j/2]
//   upsample2x_bwd(dy[N,C,2H,2W]) -> dx[N,C,H,W] its adjoint: the sum of each 2x2 block
//   all_finite(t_1, ..., t_k) -> ok[1]      1.0 if every element of every tensor is finite, else 0.0
//                                          (one op for all gradients, instead of two per tensor)
// The group norm epsilon is 1e-5 (nn.GroupNorm's default), or the value of an extra eps input.
//
// Elementwise special functions are written branch-free so that the compiler vectorises
// the loops; their accuracy (relative error of a few float32 ulps, well under 1e-6) is
// checked against float64 references in tests/test_kernels.py.

#include "common.h"

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

const float kEps = 1e-5f;

// erfc(z) for z >= 0, relative error < 1.2e-7 (Chebyshev-fitted form of exp(-z^2) * poly).
// The z*z rounding error is corrected with an fma so large z keep their relative accuracy.
inline float erfc_pos(float z) {
  float t = 1.0f / (1.0f + 0.5f * z);
  float p = 0.17087277f;
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  float z2 = z * z;
  float z2_err = std::fma(z, z, -z2);
  return t * exp_f(p - z2) * (1.0f - z2_err);
}

const float kInvSqrt2 = 0.70710678118654752f;
const float kInvSqrt2Pi = 0.39894228040143268f;

// Phi(x) = 0.5 * erfc(-x / sqrt(2)), accurate in both tails.
inline float norm_cdf(float x) {
  float z = (x < 0.0f ? -x : x) * kInvSqrt2;
  float h = 0.5f * erfc_pos(z);
  return x < 0.0f ? h : 1.0f - h;
}

inline float sigmoid(float x) {
  float e = exp_f(x < 0.0f ? x : -x);  // exp(-|x|) never overflows
  float inv = 1.0f / (1.0f + e);
  return x < 0.0f ? e * inv : inv;
}

}  // namespace

namespace {

// Elementwise kernels: y[i] = f(x[i]) (2 tensors) or dx[i] = f(x[i], dy[i]) (3 tensors), all of
// the first tensor's size, split over threads in chunks; f must be vectorisable.
template <class F>
int unary(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, F f) {
  if (nparam != 2 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  const int64_t n = numel(ndims[0], shapes[0]);
  parallel_for(n, 16384, n, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) y[i] = f(x[i]);
  });
  return 0;
}

template <class F>
int binary(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, F f) {
  if (nparam != 3 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *dy = static_cast<const float *>(params[1]);
  float *dx = static_cast<float *>(params[2]);
  const int64_t n = numel(ndims[0], shapes[0]);
  parallel_for(n, 16384, n, [&](int64_t lo, int64_t hi) {
#pragma omp simd
    for (int64_t i = lo; i < hi; ++i) dx[i] = f(x[i], dy[i]);
  });
  return 0;
}

// the sum of one H*W plane, accumulated in double
inline double plane_total(const float *xp, int64_t HW) {
  double s = 0.0;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < HW; ++i) s += xp[i];
  return s;
}

// y = x + v(p) on every H*W plane p of x (params: x, _, y), for the time shift and the conv bias
template <class V>
void add_per_plane(void **params, int64_t planes, int64_t HW, V v_of) {
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[2]);
  parallel_for(planes, std::max<int64_t>(1, 16384 / HW), planes * HW, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const float v = v_of(p);
      const float *xp = x + p * HW;
      float *yp = y + p * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) yp[i] = xp[i] + v;
    }
  });
}

}  // namespace

extern "C" {

int gelu_fwd(int np, void **p, int *nd, int64_t **sh, const char **dt, void *, void *) {
  return unary(np, p, nd, sh, dt, [](float v) { return v * norm_cdf(v); });
}

int gelu_bwd(int np, void **p, int *nd, int64_t **sh, const char **dt, void *, void *) {
  return binary(np, p, nd, sh, dt, [](float v, float g) {
    const float pdf = kInvSqrt2Pi * exp_f(-0.5f * v * v);
    return g * (norm_cdf(v) + v * pdf);
  });
}

int silu_fwd(int np, void **p, int *nd, int64_t **sh, const char **dt, void *, void *) {
  return unary(np, p, nd, sh, dt, [](float v) { return v * sigmoid(v); });
}

int silu_bwd(int np, void **p, int *nd, int64_t **sh, const char **dt, void *, void *) {
  return binary(np, p, nd, sh, dt, [](float v, float g) {
    const float sg = sigmoid(v);
    return g * sg * (1.0f + v * (1.0f - sg));
  });
}

int plane_add_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                  void *, void *) {
  if (nparam != 3 || ndims[0] != 4 || ndims[1] != 2 || !all_float32(nparam, dtypes)) return 1;
  const int64_t planes = shapes[0][0] * shapes[0][1], HW = shapes[0][2] * shapes[0][3];
  if (shapes[1][0] * shapes[1][1] != planes) return 1;
  const float *b = static_cast<const float *>(params[1]);
  add_per_plane(params, planes, HW, [&](int64_t p) { return b[p]; });
  return 0;
}

int plane_sum_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                  void *, void *) {
  if (nparam != 2 || ndims[0] != 4 || !all_float32(nparam, dtypes)) return 1;
  const int64_t planes = shapes[0][0] * shapes[0][1], HW = shapes[0][2] * shapes[0][3];
  const float *x = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  parallel_for(planes, std::max<int64_t>(1, 16384 / HW), planes * HW, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      out[p] = static_cast<float>(plane_total(x + p * HW, HW));
    }
  });
  return 0;
}

int bias_add_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                 void *, void *) {
  if (nparam != 3 || ndims[0] != 4 || ndims[1] != 1 || !all_float32(nparam, dtypes)) return 1;
  const int64_t C = shapes[0][1], planes = shapes[0][0] * C, HW = shapes[0][2] * shapes[0][3];
  if (shapes[1][0] != C) return 1;
  const float *b = static_cast<const float *>(params[1]);
  add_per_plane(params, planes, HW, [&](int64_t p) { return b[p % C]; });
  return 0;
}

int bias_grad(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
              void *) {
  if (nparam != 2 || ndims[0] != 4 || ndims[1] != 1 || !all_float32(nparam, dtypes)) return 1;
  const int64_t N = shapes[0][0], C = shapes[0][1], HW = shapes[0][2] * shapes[0][3];
  if (shapes[1][0] != C) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  float *db = static_cast<float *>(params[1]);
  parallel_for(C, std::max<int64_t>(1, 16384 / (N * HW)), N * C * HW, [&](int64_t lo, int64_t hi) {
    for (int64_t c = lo; c < hi; ++c) {
      double s = 0.0;
      for (int64_t n = 0; n < N; ++n) s += plane_total(dy + (n * C + c) * HW, HW);
      db[c] = static_cast<float>(s);
    }
  });
  return 0;
}

int upsample2x_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                   void *, void *) {
  if (nparam != 2 || ndims[0] != 4 || ndims[1] != 4 || !all_float32(nparam, dtypes)) return 1;
  const int64_t planes = shapes[0][0] * shapes[0][1], H = shapes[0][2], W = shapes[0][3];
  if (shapes[1][0] * shapes[1][1] != planes || shapes[1][2] != 2 * H || shapes[1][3] != 2 * W) return 1;
  const float *x = static_cast<const float *>(params[0]);
  float *y = static_cast<float *>(params[1]);
  parallel_for(planes, std::max<int64_t>(1, 16384 / (4 * H * W)), 4 * planes * H * W, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const float *xp = x + p * H * W;
      float *yp = y + p * 4 * H * W;
      for (int64_t i = 0; i < H; ++i) {
        float *row = yp + 2 * i * 2 * W;
#pragma omp simd
        for (int64_t j = 0; j < 2 * W; ++j) row[j] = xp[i * W + j / 2];
        std::memcpy(row + 2 * W, row, 2 * W * sizeof(float));
      }
    }
  });
  return 0;
}

int upsample2x_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                   void *, void *) {
  if (nparam != 2 || ndims[0] != 4 || ndims[1] != 4 || !all_float32(nparam, dtypes)) return 1;
  const int64_t planes = shapes[1][0] * shapes[1][1], H = shapes[1][2], W = shapes[1][3];
  if (shapes[0][0] * shapes[0][1] != planes || shapes[0][2] != 2 * H || shapes[0][3] != 2 * W) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  float *dx = static_cast<float *>(params[1]);
  parallel_for(planes, std::max<int64_t>(1, 16384 / (4 * H * W)), 4 * planes * H * W, [&](int64_t lo, int64_t hi) {
    for (int64_t p = lo; p < hi; ++p) {
      const float *dp = dy + p * 4 * H * W;
      float *xp = dx + p * H * W;
      for (int64_t i = 0; i < H; ++i) {
        const float *r0 = dp + 2 * i * 2 * W, *r1 = r0 + 2 * W;
#pragma omp simd
        for (int64_t j = 0; j < W; ++j)
          xp[i * W + j] = (r0[2 * j] + r0[2 * j + 1]) + (r1[2 * j] + r1[2 * j + 1]);
      }
    }
  });
  return 0;
}

int all_finite(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
               void *) {
  if (nparam < 2 || !all_float32(nparam, dtypes)) return 1;
  // a float32 is inf or nan exactly when its 8 exponent bits are all ones
  std::atomic<bool> bad(false);
  parallel_for(nparam - 1, 1, 1 << 20, [&](int64_t lo, int64_t hi) {
    for (int64_t k = lo; k < hi && !bad.load(std::memory_order_relaxed); ++k) {
      const uint32_t *v = static_cast<const uint32_t *>(params[k]);
      const int64_t n = numel(ndims[k], shapes[k]);
      uint32_t any = 0;
#pragma omp simd reduction(| : any)
      for (int64_t i = 0; i < n; ++i) any |= static_cast<uint32_t>((v[i] & 0x7f800000u) == 0x7f800000u);
      if (any) bad.store(true, std::memory_order_relaxed);
    }
  });
  static_cast<float *>(params[nparam - 1])[0] = bad.load() ? 0.0f : 1.0f;
  return 0;
}

// x viewed as [N, G, Cg, HW]; gamma, beta [G*Cg]; outputs y (same view), mean, rstd [N, G].
// With a fourth input eps [1] (group_norm_eps in _ops.py) that epsilon replaces kEps.
int group_norm_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                   void *, void *) {
  if ((nparam != 6 && nparam != 7) || ndims[0] != 4 || !all_float32(nparam, dtypes)) return 1;
  const float *x = static_cast<const float *>(params[0]);
  const float *gamma = static_cast<const float *>(params[1]);
  const float *beta = static_cast<const float *>(params[2]);
  const int out = nparam - 3;  // index of the first output
  const float eps = nparam == 7 ? *static_cast<const float *>(params[3]) : kEps;
  float *y = static_cast<float *>(params[out]);
  float *mean_out = static_cast<float *>(params[out + 1]);
  float *rstd_out = static_cast<float *>(params[out + 2]);
  const int64_t N = shapes[0][0], G = shapes[0][1], Cg = shapes[0][2], HW = shapes[0][3];
  const int64_t M = Cg * HW;
  const int64_t total = N * G;
  parallel_for(total, 1, total * M, [&](int64_t lo, int64_t hi) {
  for (int64_t ng = lo; ng < hi; ++ng) {
    const float *xp = x + ng * M;
    float *yp = y + ng * M;
    const int64_t g = ng % G;
    // two-pass mean / variance, double accumulation
    double s = 0.0;
#pragma omp simd reduction(+ : s)
    for (int64_t i = 0; i < M; ++i) s += xp[i];
    const double mean = s / static_cast<double>(M);
    const float meanf = static_cast<float>(mean);
    double ss = 0.0;
#pragma omp simd reduction(+ : ss)
    for (int64_t i = 0; i < M; ++i) {
      double d = static_cast<double>(xp[i]) - mean;
      ss += d * d;
    }
    const double var = ss / static_cast<double>(M);
    const float rstd = static_cast<float>(1.0 / std::sqrt(var + static_cast<double>(eps)));
    mean_out[ng] = meanf;
    rstd_out[ng] = rstd;
    for (int64_t c = 0; c < Cg; ++c) {
      const int64_t ch = g * Cg + c;
      const float a = gamma[ch] * rstd;
      const float b = beta[ch] - meanf * a;
      const float *xc = xp + c * HW;
      float *yc = yp + c * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) yc[i] = xc[i] * a + b;
    }
  }
  });
  return 0;
}

// inputs dy, x (both [N, G, Cg, HW]), mean, rstd [N, G], gamma [C]; outputs dx, dgamma, dbeta.
int group_norm_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                   void *, void *) {
  if (nparam != 8 || ndims[0] != 4 || !all_float32(nparam, dtypes)) return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  const float *mean = static_cast<const float *>(params[2]);
  const float *rstd = static_cast<const float *>(params[3]);
  const float *gamma = static_cast<const float *>(params[4]);
  float *dx = static_cast<float *>(params[5]);
  float *dgamma = static_cast<float *>(params[6]);
  float *dbeta = static_cast<float *>(params[7]);
  const int64_t N = shapes[0][0], G = shapes[0][1], Cg = shapes[0][2], HW = shapes[0][3];
  const int64_t C = G * Cg, M = Cg * HW;
  // per (n, c): s1 = sum dy, s2 = sum dy * x
  std::vector<double> s1(N * C), s2(N * C);
  const int64_t total = N * G;
  parallel_for(total, 1, total * M, [&](int64_t lo, int64_t hi) {
  for (int64_t ng = lo; ng < hi; ++ng) {
    const int64_t n = ng / G, g = ng % G;
    const float *dyp = dy + ng * M;
    const float *xp = x + ng * M;
    float *dxp = dx + ng * M;
    const double mu = mean[ng], rs = rstd[ng];
    double A = 0.0, B = 0.0;  // sum gamma*dy, sum gamma*dy*xhat over the group
    for (int64_t c = 0; c < Cg; ++c) {
      const float *dyc = dyp + c * HW;
      const float *xc = xp + c * HW;
      double a = 0.0, b = 0.0;
#pragma omp simd reduction(+ : a, b)
      for (int64_t i = 0; i < HW; ++i) {
        a += dyc[i];
        b += static_cast<double>(dyc[i]) * xc[i];
      }
      const int64_t ch = g * Cg + c;
      s1[n * C + ch] = a;
      s2[n * C + ch] = b;
      A += gamma[ch] * a;
      B += gamma[ch] * (b - mu * a) * rs;
    }
    const float rsf = static_cast<float>(rs);
    const float k1 = static_cast<float>(A / static_cast<double>(M));
    const float k2 = static_cast<float>(B / static_cast<double>(M));
    const float muf = static_cast<float>(mu);
    for (int64_t c = 0; c < Cg; ++c) {
      const float gm = gamma[g * Cg + c];
      const float *dyc = dyp + c * HW;
      const float *xc = xp + c * HW;
      float *dxc = dxp + c * HW;
#pragma omp simd
      for (int64_t i = 0; i < HW; ++i) {
        const float xhat = (xc[i] - muf) * rsf;
        dxc[i] = rsf * (gm * dyc[i] - k1 - xhat * k2);
      }
    }
  }
  });
  for (int64_t ch = 0; ch < C; ++ch) {
    const int64_t g = ch / Cg;
    double dg = 0.0, db = 0.0;
    for (int64_t n = 0; n < N; ++n) {
      const double a = s1[n * C + ch], b = s2[n * C + ch];
      dg += (b - static_cast<double>(mean[n * G + g]) * a) * rstd[n * G + g];
      db += a;
    }
    dgamma[ch] = static_cast<float>(dg);
    dbeta[ch] = static_cast<float>(db);
  }
  return 0;
}

}  // extern "C"

namespace {

// Depthwise convolution on flattened padded planes. A plane is copied into a zeroed buffer
// with row stride Wp = W + K - 1 and P = K / 2 zero rows above and below (x[h, w] goes to
// buf[(h + P) * Wp + w + P]): the right padding of one row and the left padding of the next
// are adjacent, so every row is surrounded by enough zeros. Then for q = h * Wp + w
//     out[q] = sum_{i,j} k[i, j] * buf[q + i * Wp + j]
// is one vector loop over q in [0, H * Wp) instead of H loops of length W (7..28 in the
// U-Net: short, badly vectorised); the results at w >= W (K - 1 per row) are discarded.
// The loop runs in blocks of kBlock outputs that stay in registers over all K * K taps
// (one broadcast weight, kBlock / 16 loads and FMAs per tap), then one shorter block of a
// multiple of kTail outputs.
const int64_t kBlock = 64;  // 4 AVX-512 / 8 AVX2 registers of accumulators
const int64_t kTail = 16;
static_assert(kBlock == 4 * kTail, "correlate_plane's tail handles up to 4 * kTail outputs");

// Layout of the flattened padded plane of an H x W plane for a K x K kernel.
struct FlatPlane {
  int64_t H, W, K, P, Wp;
  int64_t len;     // H * Wp: outputs computed, pad columns included
  int64_t padded;  // len rounded up to kTail: what the block loops write / read
  int64_t size;    // buffer floats: every tap of every (rounded) output stays inside
  FlatPlane(int64_t h, int64_t w, int64_t k)
      : H(h), W(w), K(k), P(k / 2), Wp(w + k - 1), len(h * (w + k - 1)),
        padded((len + kTail - 1) / kTail * kTail), size(padded + (k - 1) * Wp + k - 1) {}

  // Copy src[H, W] into the interior of buf (whose padding is zero and stays zero).
  void load(const float *src, float *buf) const {
    for (int64_t h = 0; h < H; ++h) std::memcpy(buf + (h + P) * Wp + P, src + h * W, sizeof(float) * W);
  }
};

// out[t] = sum_{i,j} k[i, j] * in[t + i * Wp + j] for t in [0, B): B accumulators over all taps.
template <int64_t B>
inline void correlate_block(const float *in, const float *k, int64_t K, int64_t Wp, float *out) {
  float acc[B];
#pragma omp simd
  for (int64_t t = 0; t < B; ++t) acc[t] = 0.0f;
  for (int64_t i = 0; i < K; ++i) {
    for (int64_t j = 0; j < K; ++j) {
      const float kv = k[i * K + j];
      const float *r = in + i * Wp + j;
#pragma omp simd
      for (int64_t t = 0; t < B; ++t) acc[t] += kv * r[t];
    }
  }
#pragma omp simd
  for (int64_t t = 0; t < B; ++t) out[t] = acc[t];
}

// out[h, w] = sum_{i,j} k[i, j] * xpad[h + i, w + j] for the plane loaded in buf; tmp holds
// fp.padded floats (the flat result before the pad columns are dropped).
inline void correlate_plane(const FlatPlane &fp, const float *buf, const float *k, float *tmp,
                            float *out) {
  int64_t q = 0;
  for (; q + kBlock <= fp.len; q += kBlock) correlate_block<kBlock>(buf + q, k, fp.K, fp.Wp, tmp + q);
  // the rest (under kBlock) rounded up to kTail, in one block (one accumulator chain per kTail floats:
  // fewer chains would wait on the FMA latency)
  switch ((fp.padded - q) / kTail) {
    case 1: correlate_block<kTail>(buf + q, k, fp.K, fp.Wp, tmp + q); break;
    case 2: correlate_block<2 * kTail>(buf + q, k, fp.K, fp.Wp, tmp + q); break;
    case 3: correlate_block<3 * kTail>(buf + q, k, fp.K, fp.Wp, tmp + q); break;
    case 4: correlate_block<kBlock>(buf + q, k, fp.K, fp.Wp, tmp + q); break;
    default: break;  // 0: nothing left
  }
  for (int64_t h = 0; h < fp.H; ++h) std::memcpy(out + h * fp.W, tmp + h * fp.Wp, sizeof(float) * fp.W);
}

// Batch-lane layout, for small planes: the planes of one channel for kLanes consecutive images
// (which share the kernel) are interleaved, buf[(r * Wb + s) * kLanes + b] = xpad_b[r, s] for
// padded rows r < H + K - 1 and padded columns s < Wb, so that a vector holds the same pixel of
// kLanes images. No lane is spent on padding, where the flat layout computes H * (W + K - 1)
// outputs per plane (13 / 7 times the useful ones at W = 7). Outputs are computed kRowBlock
// pixels of a row at a time (kRowBlock x kLanes accumulators over all taps); W is rounded up
// to Wr, a multiple of kRowBlock (Wb = Wr + K - 1), and the extra outputs are discarded.
const int64_t kLanes = 16;
#ifdef __AVX512F__
const int64_t kRowBlock = 8;  // 8 zmm accumulators
#else
const int64_t kRowBlock = 4;  // 8 ymm accumulators (AVX2 has 16 registers)
#endif

struct LanePlanes {
  int64_t H, W, K, P, Wr, Wb;
  int64_t size;  // buffer floats
  LanePlanes(int64_t h, int64_t w, int64_t k)
      : H(h), W(w), K(k), P(k / 2), Wr((w + kRowBlock - 1) / kRowBlock * kRowBlock),
        Wb(Wr + k - 1), size((h + k - 1) * Wb * kLanes) {}

  // Interleave the planes src + b * stride (b < nb) into the interior of buf (padding zero);
  // lanes from nb on keep what they held.
  void load(const float *src, int64_t stride, int64_t nb, float *buf) const {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        float *d = buf + ((h + P) * Wb + w + P) * kLanes;
        const float *s = src + h * W + w;
        for (int64_t b = 0; b < nb; ++b) d[b] = s[b * stride];
      }
  }

  // The inverse for the [H, Wr, kLanes] result: dst + b * stride gets lane b (b < nb).
  void store(const float *res, int64_t stride, int64_t nb, float *dst) const {
    for (int64_t h = 0; h < H; ++h)
      for (int64_t w = 0; w < W; ++w) {
        const float *r = res + (h * Wr + w) * kLanes;
        float *d = dst + h * W + w;
        for (int64_t b = 0; b < nb; ++b) d[b * stride] = r[b];
      }
  }
};

// res[(h * Wr + w) * kLanes + l] = sum_{i,j} k[i, j] * buf[((h + i) * Wb + w + j) * kLanes + l]
inline void correlate_lanes(const LanePlanes &lp, const float *buf, const float *k, float *res) {
  const int64_t K = lp.K;
  for (int64_t h = 0; h < lp.H; ++h) {
    for (int64_t w0 = 0; w0 < lp.Wr; w0 += kRowBlock) {
      float acc[kRowBlock][kLanes];
      for (int64_t u = 0; u < kRowBlock; ++u)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[u][l] = 0.0f;
      for (int64_t i = 0; i < K; ++i) {
        const float *row = buf + ((h + i) * lp.Wb + w0) * kLanes;
        for (int64_t j = 0; j < K; ++j) {
          const float kv = k[i * K + j];
          const float *r = row + j * kLanes;
          for (int64_t u = 0; u < kRowBlock; ++u)
#pragma omp simd
            for (int64_t l = 0; l < kLanes; ++l) acc[u][l] += kv * r[u * kLanes + l];
        }
      }
      float *o = res + (h * lp.Wr + w0) * kLanes;
      for (int64_t u = 0; u < kRowBlock; ++u)
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) o[u * kLanes + l] = acc[u][l];
    }
  }
}

// True if the batch-lane layout computes fewer outputs than the flat one (the lanes of a
// last, partial group of images count). Measured at N = 64, K = 7 on one AVX-512 core, the
// lanes take 0.51x / 0.82x / 0.94x the flat forward time at W = 7 / 14 / 28 (the interleaving
// included); with N = 1 or 2 (the tests) the flat layout runs.
inline bool use_lanes(int64_t N, int64_t H, int64_t W, int64_t K) {
  const int64_t groups = (N + kLanes - 1) / kLanes;
  const double lane_work = static_cast<double>(groups * kLanes) * H * LanePlanes(H, W, K).Wr;
  const double flat_work = static_cast<double>(N) * FlatPlane(H, W, K).padded;
  return lane_work < flat_work;
}

// Planes per parallel_for chunk: about 2^17 multiply-adds, so that the chunks are worth a
// thread but there are enough of them to balance the threads.
inline int64_t plane_grain(int64_t H, int64_t W, int64_t K) {
  return std::max<int64_t>(1, (int64_t(1) << 17) / (H * W * K * K));
}

int dwconv_common(void **params, int64_t **shapes, bool flip) {
  const float *x = static_cast<const float *>(params[0]);
  const float *wt = static_cast<const float *>(params[1]);
  float *y = static_cast<float *>(params[2]);
  const int64_t N = shapes[0][0], C = shapes[0][1], H = shapes[0][2], W = shapes[0][3];
  const int64_t K = shapes[1][3], KK = K * K, HW = H * W;
  if (shapes[1][0] != C || shapes[1][1] != 1 || shapes[1][2] != K || K % 2 == 0) return 1;
  const auto load_kernel = [&](int64_t c, float *kern) {
    const float *kc = wt + c * KK;
    for (int64_t i = 0; i < KK; ++i) kern[i] = flip ? kc[KK - 1 - i] : kc[i];
  };
  const int64_t work = N * C * HW * KK / 8;
  if (use_lanes(N, H, W, K)) {
    // items: (channel, group of kLanes images), channel-major
    const LanePlanes lp(H, W, K);
    const int64_t groups = (N + kLanes - 1) / kLanes;
    const int64_t grain = std::max<int64_t>(1, plane_grain(H, W, K) / kLanes);
    parallel_for(C * groups, grain, work, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(lp.size, 0.0f), res(H * lp.Wr * kLanes), kern(KK);
      for (int64_t item = lo; item < hi; ++item) {
        const int64_t c = item / groups, n0 = item % groups * kLanes;
        const int64_t nb = std::min(kLanes, N - n0);
        if (item == lo || n0 == 0) load_kernel(c, kern.data());
        lp.load(x + (n0 * C + c) * HW, C * HW, nb, buf.data());
        correlate_lanes(lp, buf.data(), kern.data(), res.data());
        lp.store(res.data(), C * HW, nb, y + (n0 * C + c) * HW);
      }
    });
    return 0;
  }
  const FlatPlane fp(H, W, K);
  const int64_t planes = N * C;
  parallel_for(planes, plane_grain(H, W, K), work, [&](int64_t lo, int64_t hi) {
    std::vector<float> buf(fp.size, 0.0f), tmp(fp.padded), kern(KK);
    for (int64_t p = lo; p < hi; ++p) {
      load_kernel(p % C, kern.data());
      fp.load(x + p * HW, buf.data());
      correlate_plane(fp, buf.data(), kern.data(), tmp.data(), y + p * HW);
    }
  });
  return 0;
}

// a[0] + ... + a[kLanes - 1], added pairwise (a is overwritten).
inline float sum_lanes(float *a) {
  for (int64_t width = kLanes / 2; width > 0; width /= 2)
    for (int64_t l = 0; l < width; ++l) a[l] += a[l + width];
  return a[0];
}

// Filter gradient taps are reduced kTaps at a time: kTaps accumulator vectors share each
// load of dy (kTaps + 1 loads per kTaps FMAs); kLanes floats per accumulator. The float sums
// run over a group of planes of about kGroupLen flat outputs (one 28 x 28 plane, three
// 14 x 14 or ten 7 x 7 ones): at most 64 products per lane, then added to double.
const int64_t kTaps = 7;
const int64_t kGroupLen = 1024;

// s[u] = sum_{p < planes} sum_{q < len} g[p * len + q] * in[p * in_stride + q + off[u]] for u in
// [0, T) (len a multiple of kLanes), in float: kLanes partial sums per tap, added pairwise.
template <int64_t T>
inline void dot_taps(const float *g, const float *in, int64_t planes, int64_t len, int64_t in_stride,
                     const int64_t *off, float *s) {
  float acc[T][kLanes];
  for (int64_t u = 0; u < T; ++u)
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) acc[u][l] = 0.0f;
  for (int64_t p = 0; p < planes; ++p) {
    const float *gp = g + p * len, *ip = in + p * in_stride;
    for (int64_t q = 0; q < len; q += kLanes) {
      for (int64_t u = 0; u < T; ++u) {
        const float *r = ip + q + off[u];
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[u][l] += gp[q + l] * r[l];
      }
    }
  }
  for (int64_t u = 0; u < T; ++u) s[u] = sum_lanes(acc[u]);
}

// The batch-lane filter gradient over the rows [h0, h1): s[u] = sum_{h,w,l} g[(h * W + w) *
// kLanes + l] * buf[((h * Wb + w) + off[u]) * kLanes + l] for u in [0, T) (off[u] = i * Wb + j
// for tap (i, j)), in float: the (h1 - h0) * W products of each image, then the kLanes images
// pairwise.
template <int64_t T>
inline void dot_taps_lanes(const LanePlanes &lp, const float *g, const float *buf, const int64_t *off,
                           int64_t h0, int64_t h1, float *s) {
  float acc[T][kLanes];
  for (int64_t u = 0; u < T; ++u)
#pragma omp simd
    for (int64_t l = 0; l < kLanes; ++l) acc[u][l] = 0.0f;
  for (int64_t h = h0; h < h1; ++h) {
    for (int64_t w = 0; w < lp.W; ++w) {
      const float *gp = g + (h * lp.W + w) * kLanes;
      const float *xp = buf + (h * lp.Wb + w) * kLanes;
      for (int64_t u = 0; u < T; ++u) {
        const float *r = xp + off[u] * kLanes;
#pragma omp simd
        for (int64_t l = 0; l < kLanes; ++l) acc[u][l] += gp[l] * r[l];
      }
    }
  }
  for (int64_t u = 0; u < T; ++u) s[u] = sum_lanes(acc[u]);
}

}  // namespace

extern "C" {

int dwconv_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
               void *, void *) {
  if (nparam != 3 || ndims[0] != 4 || ndims[1] != 4 || !all_float32(nparam, dtypes)) return 1;
  return dwconv_common(params, shapes, false);
}

// dx = correlation of dy with the 180-degree rotated kernel (same zero padding K/2).
int dwconv_bwd_input(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                     void *, void *) {
  if (nparam != 3 || ndims[0] != 4 || ndims[1] != 4 || !all_float32(nparam, dtypes)) return 1;
  return dwconv_common(params, shapes, true);
}

// dw[c, 0, i, j] = sum_{n, h, w} dy[n, c, h, w] * xpad[n, c, h + i, w + j]; inputs dy, x, w.
// Per plane: x in a flat padded buffer, dy in the same flat layout (zeros in the pad columns,
// so the discarded outputs of the forward pass contribute nothing); every tap is a dot product
// of length H * Wp (dot_taps), over groups of planes in float and over the batch in double.
int dwconv_bwd_filter(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes,
                      void *, void *) {
  if (nparam != 4 || ndims[0] != 4 || ndims[1] != 4 || ndims[3] != 4 || !all_float32(nparam, dtypes))
    return 1;
  const float *dy = static_cast<const float *>(params[0]);
  const float *x = static_cast<const float *>(params[1]);
  float *dw = static_cast<float *>(params[3]);  // params[2] is w: its shape only
  const int64_t N = shapes[0][0], C = shapes[0][1], H = shapes[0][2], W = shapes[0][3];
  const int64_t K = shapes[3][3], KK = K * K, HW = H * W;
  if (shapes[3][0] != C || shapes[3][1] != 1 || shapes[3][2] != K || K % 2 == 0) return 1;
  std::vector<int64_t> off(KK);  // tap (i, j) reads pixel (h + i, w + j) of the padded plane
  if (use_lanes(N, H, W, K)) {
    // per channel: groups of kLanes images interleaved (LanePlanes), dy in the same lanes
    // without padding; lanes past the last image are zero in both. Float sums over blocks of
    // `rows` rows (at most 64 products per lane, as in the flat path), then double.
    const LanePlanes lp(H, W, K);
    const int64_t rows = std::max<int64_t>(1, kGroupLen / kLanes / W);
    for (int64_t t = 0; t < KK; ++t) off[t] = t / K * lp.Wb + t % K;
    parallel_for(C, 1, N * C * H * W * KK / 8, [&](int64_t lo, int64_t hi) {
      std::vector<float> buf(lp.size, 0.0f), g(H * W * kLanes, 0.0f), s(KK);
      std::vector<double> acc(KK);
      for (int64_t c = lo; c < hi; ++c) {
        std::fill(acc.begin(), acc.end(), 0.0);
        for (int64_t n0 = 0; n0 < N; n0 += kLanes) {
          const int64_t nb = std::min(kLanes, N - n0), p = n0 * C + c;
          if (nb < kLanes) {  // the last, partial group (the buffers' interiors are rewritten)
            std::fill(buf.begin(), buf.end(), 0.0f);
            std::fill(g.begin(), g.end(), 0.0f);
          }
          lp.load(x + p * HW, C * HW, nb, buf.data());
          for (int64_t q = 0; q < HW; ++q)
            for (int64_t b = 0; b < nb; ++b) g[q * kLanes + b] = dy[(p + b * C) * HW + q];
          for (int64_t h0 = 0; h0 < H; h0 += rows) {
            const int64_t h1 = std::min(H, h0 + rows);
            int64_t u = 0;
            for (; u + kTaps <= KK; u += kTaps)
              dot_taps_lanes<kTaps>(lp, g.data(), buf.data(), &off[u], h0, h1, &s[u]);
            for (; u < KK; ++u) dot_taps_lanes<1>(lp, g.data(), buf.data(), &off[u], h0, h1, &s[u]);
            for (int64_t t = 0; t < KK; ++t) acc[t] += s[t];
          }
        }
        for (int64_t t = 0; t < KK; ++t) dw[c * KK + t] = static_cast<float>(acc[t]);
      }
    });
    return 0;
  }
  const FlatPlane fp(H, W, K);
  const int64_t len = (fp.len + kLanes - 1) / kLanes * kLanes;  // the dot products' length
  for (int64_t t = 0; t < KK; ++t) off[t] = t / K * fp.Wp + t % K;
  const int64_t xs = std::max(fp.size, len + off[KK - 1]);  // floats per x plane (all reads inside)
  const int64_t group = std::max<int64_t>(1, std::min(N, kGroupLen / len));
  parallel_for(C, 1, N * C * HW * KK / 8, [&](int64_t lo, int64_t hi) {
    // `group` planes of x (flat, padded) and of dy (flat, zero outside [h * Wp, h * Wp + W))
    std::vector<float> xbuf(group * xs, 0.0f), gbuf(group * len, 0.0f), s(KK);
    std::vector<double> acc(KK);
    for (int64_t c = lo; c < hi; ++c) {
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t n0 = 0; n0 < N; n0 += group) {
        const int64_t planes = std::min(group, N - n0);
        for (int64_t b = 0; b < planes; ++b) {
          const int64_t p = (n0 + b) * C + c;
          fp.load(x + p * HW, xbuf.data() + b * xs);
          for (int64_t h = 0; h < H; ++h)
            std::memcpy(gbuf.data() + b * len + h * fp.Wp, dy + p * HW + h * W, sizeof(float) * W);
        }
        int64_t u = 0;
        for (; u + kTaps <= KK; u += kTaps)
          dot_taps<kTaps>(gbuf.data(), xbuf.data(), planes, len, xs, &off[u], &s[u]);
        for (; u < KK; ++u) dot_taps<1>(gbuf.data(), xbuf.data(), planes, len, xs, &off[u], &s[u]);
        for (int64_t t = 0; t < KK; ++t) acc[t] += s[t];
      }
      for (int64_t t = 0; t < KK; ++t) dw[c * KK + t] = static_cast<float>(acc[t]);
    }
  });
  return 0;
}

}  // extern "C"

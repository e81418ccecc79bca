// Fused float32 attention kernels for the ddpm_ms U-Net (MindSpore "aot" custom operators).
//
// One op forward and one backward for everything between the qkv projection and the output
// projection of LinearAttention and Attention (ddpm_ms/unet.py), instead of a split, two
// softmaxes, a scale, two batched matmuls (forward) and a concat, softmax backwards and four
// matmuls (backward), each a separate MindSpore launch. Same signature, threading and build as
// cpu_kernels.cc (plain loops that -O3 -march=native vectorises, no BLAS, worker threads over
// (batch, head) pairs). All tensors contiguous float32; per head q, k, v are [D, N] blocks
// (D = dim_head, N = H*W), scale = D ** -0.5:
//
//   linear_attn_fwd(qkv[B,3,Hd,D,N]) -> out[B,Hd,D,N], ctx[B,Hd,D,D]
//       qs = softmax over d of q, ks = softmax over n of k, ctx = ks v^T,
//       out = scale * ctx^T qs (= ctx^T (qs * scale))
//   linear_attn_bwd(qkv, ctx, dout) -> dqkv[B,3,Hd,D,N]   (recomputes qs and ks: cheaper than
//       writing them out and reading them back, and the forward alone is what sampling runs)
//   full_attn_fwd(qkv[B,3,Hd,D,N]) -> out[B,Hd,D,N], attn[B,Hd,N,N]
//       attn = softmax over keys j of sim[i, j] = scale * sum_d q[d,i] k[d,j],
//       out[d, i] = sum_j v[d, j] attn[i, j]
//   full_attn_bwd(qkv, attn, dout) -> dqkv
//
// Matrix products: gemm(), C = alpha * A B with B's rows contiguous (A any strides), register-
// blocked 4 rows x 32 columns; and gemm_nt(), C = alpha * A B^T as dot products along the long
// axis n (linear attention's context and its gradient). The full attention's A B^T products
// (over n) transpose the [n, n] matrix into a per-thread scratch buffer and use gemm().

#include "common.h"

#include <cmath>
#include <cstdint>
#include <memory>

namespace {

// C[r*ldc + j] = alpha * sum_k A(r, k) B[k*ldb + j], r < MR, j < NR (or < nr when NR is 0),
// with A(r, k) = a[r*sai + k*sak]. The accumulators stay in vector registers.
template <int MR, int NR>
inline void gemm_block(int64_t K, int64_t nr, const float *a, int64_t sai, int64_t sak, const float *b,
                       int64_t ldb, float *c, int64_t ldc, float alpha) {
  constexpr int W = NR > 0 ? NR : 16;
  const int64_t n = NR > 0 ? NR : nr;
  float acc[MR][W] = {};
  for (int64_t k = 0; k < K; ++k) {
    const float *bk = b + k * ldb;
    for (int r = 0; r < MR; ++r) {
      const float av = a[r * sai + k * sak];
#pragma omp simd
      for (int64_t j = 0; j < n; ++j) acc[r][j] += av * bk[j];
    }
  }
  for (int r = 0; r < MR; ++r) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) c[r * ldc + j] = alpha * acc[r][j];
  }
}

template <int MR>
void gemm_rows(int64_t N, int64_t K, const float *a, int64_t sai, int64_t sak, const float *b, int64_t ldb,
               float *c, int64_t ldc, float alpha) {
  int64_t j = 0;
  for (; j + 32 <= N; j += 32) gemm_block<MR, 32>(K, 32, a, sai, sak, b + j, ldb, c + j, ldc, alpha);
  for (; j + 16 <= N; j += 16) gemm_block<MR, 16>(K, 16, a, sai, sak, b + j, ldb, c + j, ldc, alpha);
  if (j < N) gemm_block<MR, 0>(K, N - j, a, sai, sak, b + j, ldb, c + j, ldc, alpha);
}

// C [M, N] (row stride ldc) = alpha * A B, A(i, k) = a[i*sai + k*sak] [M, K], B [K, N] (row stride ldb).
void gemm(int64_t M, int64_t N, int64_t K, const float *a, int64_t sai, int64_t sak, const float *b,
          int64_t ldb, float *c, int64_t ldc, float alpha = 1.0f) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) gemm_rows<4>(N, K, a + i * sai, sai, sak, b, ldb, c + i * ldc, ldc, alpha);
  for (; i < M; ++i) gemm_rows<1>(N, K, a + i * sai, sai, sak, b, ldb, c + i * ldc, ldc, alpha);
}

// C[r*ldc + j] = alpha * sum_k a[r*lda + k] b[j*ldb + k], r < MR, j < NR: dot products along the
// contiguous k, MR x NR of them at once in 8-float accumulators
template <int MR, int NR>
inline void dot_block(int64_t K, const float *a, int64_t lda, const float *b, int64_t ldb, float *c,
                      int64_t ldc, float alpha) {
  constexpr int V = 8;
  float acc[MR][NR][V] = {};
  int64_t k = 0;
  for (; k + V <= K; k += V)
    for (int r = 0; r < MR; ++r)
      for (int j = 0; j < NR; ++j) {
#pragma omp simd
        for (int v = 0; v < V; ++v) acc[r][j][v] += a[r * lda + k + v] * b[j * ldb + k + v];
      }
  for (int r = 0; r < MR; ++r)
    for (int j = 0; j < NR; ++j) {
      float sum = 0.0f;
      for (int v = 0; v < V; ++v) sum += acc[r][j][v];
      for (int64_t t = k; t < K; ++t) sum += a[r * lda + t] * b[j * ldb + t];
      c[r * ldc + j] = alpha * sum;
    }
}

template <int MR>
void gemm_nt_rows(int64_t N, int64_t K, const float *a, int64_t lda, const float *b, int64_t ldb, float *c,
                  int64_t ldc, float alpha) {
  int64_t j = 0;
  for (; j + 4 <= N; j += 4) dot_block<MR, 4>(K, a, lda, b + j * ldb, ldb, c + j, ldc, alpha);
  for (; j < N; ++j) dot_block<MR, 1>(K, a, lda, b + j * ldb, ldb, c + j, ldc, alpha);
}

// C [M, N] = alpha * A B^T for A [M, K], B [N, K] (row strides lda, ldb): for long K, where
// gemm() would need B transposed first
void gemm_nt(int64_t M, int64_t N, int64_t K, const float *a, int64_t lda, const float *b, int64_t ldb,
             float *c, int64_t ldc, float alpha = 1.0f) {
  int64_t i = 0;
  for (; i + 4 <= M; i += 4) gemm_nt_rows<4>(N, K, a + i * lda, lda, b, ldb, c + i * ldc, ldc, alpha);
  for (; i < M; ++i) gemm_nt_rows<1>(N, K, a + i * lda, lda, b, ldb, c + i * ldc, ldc, alpha);
}

// t [C, R] = x^T for x [R, C]
void transpose(const float *x, int64_t R, int64_t C, float *t) {
  for (int64_t r = 0; r < R; ++r)
    for (int64_t c = 0; c < C; ++c) t[c * R + r] = x[r * C + c];
}

// y = softmax of x [L] (y may be x)
void softmax_row(const float *x, float *y, int64_t L) {
  float mx = x[0];
#pragma omp simd reduction(max : mx)
  for (int64_t l = 1; l < L; ++l) mx = x[l] > mx ? x[l] : mx;
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t l = 0; l < L; ++l) {
    y[l] = exp_f(x[l] - mx);
    sum += y[l];
  }
  const float inv = 1.0f / sum;
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) y[l] *= inv;
}

// g <- y * (g - sum(g * y)): the softmax backward of one row, in place
void softmax_row_bwd(const float *y, float *g, int64_t L) {
  float s = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t l = 0; l < L; ++l) s += y[l] * g[l];
#pragma omp simd
  for (int64_t l = 0; l < L; ++l) g[l] = y[l] * (g[l] - s);
}

// y = softmax over the rows of x [L, C], for every column (loops along the contiguous C);
// `tmp` holds 2*C floats
void softmax_cols(const float *x, float *y, int64_t L, int64_t C, float *tmp) {
  float *mx = tmp, *inv = tmp + C;
  std::copy(x, x + C, mx);
  for (int64_t l = 1; l < L; ++l) {
    const float *r = x + l * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) mx[c] = r[c] > mx[c] ? r[c] : mx[c];
  }
  std::fill(inv, inv + C, 0.0f);
  for (int64_t l = 0; l < L; ++l) {
    const float *r = x + l * C;
    float *o = y + l * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) {
      o[c] = exp_f(r[c] - mx[c]);
      inv[c] += o[c];
    }
  }
#pragma omp simd
  for (int64_t c = 0; c < C; ++c) inv[c] = 1.0f / inv[c];
  for (int64_t l = 0; l < L; ++l) {
    float *o = y + l * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) o[c] *= inv[c];
  }
}

// g <- y * (g - sum over rows(g * y)) for y, g [L, C]; `tmp` holds C floats
void softmax_cols_bwd(const float *y, float *g, int64_t L, int64_t C, float *tmp) {
  std::fill(tmp, tmp + C, 0.0f);
  for (int64_t l = 0; l < L; ++l) {
    const float *yr = y + l * C, *gr = g + l * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) tmp[c] += yr[c] * gr[c];
  }
  for (int64_t l = 0; l < L; ++l) {
    const float *yr = y + l * C;
    float *gr = g + l * C;
#pragma omp simd
    for (int64_t c = 0; c < C; ++c) gr[c] = yr[c] * (gr[c] - tmp[c]);
  }
}

// The shapes and per-head pointers of one call: qkv [B, 3, Hd, D, N] first in params.
struct Heads {
  int64_t B = 0, Hd = 0, D = 0, N = 0;
  float scale = 1.0f;

  bool parse(int nparam, int expected, int *ndims, int64_t **shapes, const char **dtypes) {
    if (nparam != expected || ndims[0] != 5 || shapes[0][1] != 3 || !all_float32(nparam, dtypes)) return false;
    B = shapes[0][0], Hd = shapes[0][2], D = shapes[0][3], N = shapes[0][4];
    scale = static_cast<float>(1.0 / std::sqrt(static_cast<double>(D)));
    return D > 0 && N > 0;
  }
  // q, k or v (part 0, 1, 2) of head u = b * Hd + h in a [B, 3, Hd, D, N] tensor
  template <class T>
  T *part(T *qkv, int64_t u, int part) const {
    return qkv + ((u / Hd * 3 + part) * Hd + u % Hd) * D * N;
  }
  // fn(u, scratch) for every head u in [0, B*Hd), over threads; `scratch` floats per thread
  template <class F>
  void for_each(int64_t scratch, int64_t work_per_head, F fn) const {
    const int64_t heads = B * Hd;
    const int64_t grain = std::max<int64_t>(1, heads / (4 * num_threads()));
    parallel_for(heads, grain, heads * work_per_head, [&](int64_t lo, int64_t hi) {
      std::unique_ptr<float[]> buf(new float[scratch]);  // uninitialised: every use writes first
      for (int64_t u = lo; u < hi; ++u) fn(u, buf.get());
    });
  }
};

// qs = softmax over d of q, ks = softmax over n of k for head u (linear attention); tmp: 2*N floats
void linear_softmaxes(const Heads &s, const float *qkv, int64_t u, float *qs, float *ks, float *tmp) {
  softmax_cols(s.part(qkv, u, 0), qs, s.D, s.N, tmp);
  const float *k = s.part(qkv, u, 1);
  for (int64_t d = 0; d < s.D; ++d) softmax_row(k + d * s.N, ks + d * s.N, s.N);
}

}  // namespace

extern "C" {

int linear_attn_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                    void *) {
  Heads s;
  if (!s.parse(nparam, 3, ndims, shapes, dtypes)) return 1;
  const int64_t D = s.D, N = s.N, DN = D * N;
  const float *qkv = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  float *ctx_all = static_cast<float *>(params[2]);
  s.for_each(2 * DN + 2 * N, 2 * D * DN, [&](int64_t u, float *qs) {
    float *ks = qs + DN, *ctx = ctx_all + u * D * D;
    linear_softmaxes(s, qkv, u, qs, ks, ks + DN);
    gemm_nt(D, D, N, ks, N, s.part(qkv, u, 2), N, ctx, D);  // ctx[d, e] = sum_n ks[d, n] v[e, n]
    gemm(D, N, D, ctx, 1, D, qs, N, out + u * DN, N, s.scale);  // out[e, n] = scale sum_d ctx[d, e] qs[d, n]
  });
  return 0;
}

int linear_attn_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                    void *) {
  Heads s;
  if (!s.parse(nparam, 4, ndims, shapes, dtypes)) return 1;
  const int64_t D = s.D, N = s.N, DN = D * N;
  const float *qkv = static_cast<const float *>(params[0]);
  const float *ctx_all = static_cast<const float *>(params[1]);
  const float *dout = static_cast<const float *>(params[2]);
  float *dqkv = static_cast<float *>(params[3]);
  s.for_each(2 * DN + D * D + 2 * N, 4 * D * DN, [&](int64_t u, float *qs) {
    float *ks = qs + DN, *dctx = ks + DN, *tmp = dctx + D * D;
    const float *ctx = ctx_all + u * D * D, *g = dout + u * DN;
    float *dq = s.part(dqkv, u, 0), *dk = s.part(dqkv, u, 1), *dv = s.part(dqkv, u, 2);
    linear_softmaxes(s, qkv, u, qs, ks, tmp);
    gemm_nt(D, D, N, qs, N, g, N, dctx, D, s.scale);        // dctx[d, e] = scale sum_n qs[d, n] g[e, n]
    gemm(D, N, D, ctx, D, 1, g, N, dq, N, s.scale);         // d(qs)[d, n] = scale sum_e ctx[d, e] g[e, n]
    softmax_cols_bwd(qs, dq, D, N, tmp);
    gemm(D, N, D, dctx, D, 1, s.part(qkv, u, 2), N, dk, N);  // d(ks)[d, n] = sum_e dctx[d, e] v[e, n]
    for (int64_t d = 0; d < D; ++d) softmax_row_bwd(ks + d * N, dk + d * N, N);
    gemm(D, N, D, dctx, 1, D, ks, N, dv, N);                // dv[e, n] = sum_d dctx[d, e] ks[d, n]
  });
  return 0;
}

int full_attn_fwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                  void *) {
  Heads s;
  if (!s.parse(nparam, 3, ndims, shapes, dtypes)) return 1;
  const int64_t D = s.D, N = s.N, DN = D * N, NN = N * N;
  const float *qkv = static_cast<const float *>(params[0]);
  float *out = static_cast<float *>(params[1]);
  float *attn_all = static_cast<float *>(params[2]);
  s.for_each(NN, 2 * D * NN, [&](int64_t u, float *at) {
    float *attn = attn_all + u * NN;
    gemm(N, N, D, s.part(qkv, u, 0), 1, N, s.part(qkv, u, 1), N, attn, N, s.scale);  // sim[i, j]
    for (int64_t i = 0; i < N; ++i) softmax_row(attn + i * N, attn + i * N, N);
    transpose(attn, N, N, at);
    gemm(D, N, N, s.part(qkv, u, 2), N, 1, at, N, out + u * DN, N);  // out[d, i] = sum_j v[d, j] attn[i, j]
  });
  return 0;
}

int full_attn_bwd(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
                  void *) {
  Heads s;
  if (!s.parse(nparam, 4, ndims, shapes, dtypes)) return 1;
  const int64_t D = s.D, N = s.N, DN = D * N, NN = N * N;
  const float *qkv = static_cast<const float *>(params[0]);
  const float *attn_all = static_cast<const float *>(params[1]);
  const float *dout = static_cast<const float *>(params[2]);
  float *dqkv = static_cast<float *>(params[3]);
  s.for_each(2 * NN, 4 * D * NN, [&](int64_t u, float *ds) {
    const float *attn = attn_all + u * NN, *g = dout + u * DN;
    const float *q = s.part(qkv, u, 0), *k = s.part(qkv, u, 1);
    float *dq = s.part(dqkv, u, 0), *dk = s.part(dqkv, u, 1), *dv = s.part(dqkv, u, 2);
    float *dst = ds + NN;
    gemm(N, N, D, g, 1, N, s.part(qkv, u, 2), N, ds, N);   // d(attn)[i, j] = sum_d g[d, i] v[d, j]
    for (int64_t i = 0; i < N; ++i) softmax_row_bwd(attn + i * N, ds + i * N, N);  // d(sim)
    gemm(D, N, N, g, N, 1, attn, N, dv, N);                 // dv[d, j] = sum_i g[d, i] attn[i, j]
    transpose(ds, N, N, dst);
    gemm(D, N, N, k, N, 1, dst, N, dq, N, s.scale);         // dq[d, i] = scale sum_j k[d, j] dsim[i, j]
    gemm(D, N, N, q, N, 1, ds, N, dk, N, s.scale);          // dk[d, j] = scale sum_i q[d, i] dsim[i, j]
  });
  return 0;
}

}  // extern "C"

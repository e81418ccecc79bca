// Optimizer-side CPU kernels for ddpm_ms (MindSpore "aot" custom operators); the calling
// convention, build and threading notes are those of cpu_kernels.cc.
//
//   ema_update(decay[1], s_1..s_k, p_1..p_k) -> s'_1..s'_k
//       s'_i = s_i * decay + p_i * (1 - decay), elementwise in float32 with the same two
//       roundings of the products, one of 1 - decay and one of the sum as MindSpore's
//       Mul/Sub/Mul/Add ops, so the result is bit-identical to the per-tensor ops it replaces
//       (the loop is kept from fusing a * b + c into an fma, which g++ does by default
//       for C++). One op for every EMA shadow of the model instead of four per tensor.

#include "common.h"

#include <cstdint>
#include <vector>

namespace {

struct Span {
  int tensor;
  int64_t begin, end;
};

// The elements of the k tensors at params[first..first+k) cut into pieces of at most `grain`.
std::vector<Span> spans(int first, int k, int *ndims, int64_t **shapes, int64_t grain, int64_t *total) {
  std::vector<Span> out;
  *total = 0;
  for (int i = 0; i < k; ++i) {
    const int64_t n = numel(ndims[first + i], shapes[first + i]);
    *total += n;
    for (int64_t b = 0; b < n; b += grain) out.push_back({i, b, std::min(n, b + grain)});
  }
  return out;
}

// out = s * decay + p * rest over [begin, end), each product and the sum rounded to float32.
#if defined(__clang__)
void ema_span(const float *s, const float *p, float *out, int64_t begin, int64_t end, float decay,
              float rest) {
#pragma clang fp contract(off)
#else
__attribute__((noinline, optimize("fp-contract=off"))) void ema_span(const float *s, const float *p, float *out,
                                                                     int64_t begin, int64_t end, float decay,
                                                                     float rest) {
#endif
#pragma omp simd
  for (int64_t i = begin; i < end; ++i) {
    const float a = s[i] * decay;
    const float b = p[i] * rest;
    out[i] = a + b;
  }
}

}  // namespace

extern "C" {

int ema_update(int nparam, void **params, int *ndims, int64_t **shapes, const char **dtypes, void *,
               void *) {
  if (nparam < 4 || (nparam - 1) % 3 != 0 || !all_float32(nparam, dtypes)) return 1;
  const int k = (nparam - 1) / 3;
  for (int i = 0; i < k; ++i)
    if (numel(ndims[1 + i], shapes[1 + i]) != numel(ndims[1 + k + i], shapes[1 + k + i])) return 1;
  const float decay = static_cast<const float *>(params[0])[0];
  const float rest = 1.0f - decay;
  int64_t total = 0;
  const std::vector<Span> work = spans(1, k, ndims, shapes, 1 << 16, &total);
  parallel_for(static_cast<int64_t>(work.size()), 1, total, [&](int64_t lo, int64_t hi) {
    for (int64_t w = lo; w < hi; ++w) {
      const Span &sp = work[w];
      ema_span(static_cast<const float *>(params[1 + sp.tensor]), static_cast<const float *>(params[1 + k + sp.tensor]),
               static_cast<float *>(params[1 + 2 * k + sp.tensor]), sp.begin, sp.end, decay, rest);
    }
  });
  return 0;
}

}  // extern "C"

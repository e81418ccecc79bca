// Helpers shared by the ddpm_ms CPU kernel sources (see cpu_kernels.cc for the threading notes).
#pragma once

#include <sched.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <thread>
#include <vector>

namespace {

int num_threads() {
  const char *env = std::getenv("DDPM_MS_KERNEL_THREADS");  // read per call: cheap, switchable
  if (env && std::atoi(env) > 0) return std::atoi(env);
  static const int n = [] {
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0) return std::max(1, CPU_COUNT(&set));
    return static_cast<int>(std::max(1u, std::thread::hardware_concurrency()));
  }();
  return n;
}

// Run fn(begin, end) over [0, n) in chunks of `grain` items, on up to num_threads()
// threads (the caller included) that take chunks from a shared counter. `work` is the
// total cost estimate (elements touched): small jobs run on the calling thread only.
template <class F>
void parallel_for(int64_t n, int64_t grain, int64_t work, F fn) {
  const int64_t chunks = (n + grain - 1) / grain;
  int threads = static_cast<int>(std::min<int64_t>(num_threads(), chunks));
  if (work < 65536 || threads <= 1) {
    fn(int64_t(0), n);
    return;
  }
  std::atomic<int64_t> next(0);
  auto worker = [&] {
    for (;;) {
      const int64_t c = next.fetch_add(1);
      if (c >= chunks) return;
      fn(c * grain, std::min(n, (c + 1) * grain));
    }
  };
  std::vector<std::thread> pool;
  pool.reserve(threads - 1);
  for (int i = 1; i < threads; ++i) pool.emplace_back(worker);
  worker();
  for (auto &t : pool) t.join();
}

inline int64_t numel(int nd, const int64_t *shape) {
  int64_t n = 1;
  for (int i = 0; i < nd; ++i) n *= shape[i];
  return n;
}

bool all_float32(int nparam, const char **dtypes) {
  for (int i = 0; i < nparam; ++i)
    if (std::strcmp(dtypes[i], "float32") != 0) return false;
  return true;
}

// Run fn(t) for t in [0, workers) on `workers` threads (the caller is worker 0).
template <class F>
void run_workers(int workers, F fn) {
  std::vector<std::thread> pool;
  pool.reserve(workers > 1 ? workers - 1 : 0);
  for (int t = 1; t < workers; ++t) pool.emplace_back(fn, t);
  fn(0);
  for (auto &th : pool) th.join();
}

inline float bits_to_float(int32_t i) {
  float f;
  std::memcpy(&f, &i, sizeof f);
  return f;
}

// exp(x) for float32, relative error ~2 ulp; x clamped to [-87.3, 88.7].
inline float exp_f(float x) {
  x = x < -87.3f ? -87.3f : x;
  x = x > 88.7f ? 88.7f : x;
  const float round_magic = 12582912.0f;                 // 1.5 * 2^23
  float n = (x * 1.44269504088896341f + round_magic) - round_magic;
  float r = x - n * 0.693359375f;                        // Cody-Waite: ln2 = hi + lo
  r = r + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;                            // minimax polynomial of exp on [-ln2/2, ln2/2]
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  int32_t e = (static_cast<int32_t>(n) + 127) << 23;
  return p * bits_to_float(e);
}

}  // namespace

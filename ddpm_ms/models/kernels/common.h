// Helpers shared by the ddpm_ms CPU kernel sources (see cpu_kernels.cc for the threading notes).
#pragma once

#include <immintrin.h>
#include <sched.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

// The worker threads shared by every kernel of the library: started on first use and kept,
// so a kernel call costs a wake-up (a few us) instead of starting and joining a std::thread
// (about 30 us, paid by every threaded kernel call: several ms per training step). After a
// job a worker spins for kSpinUs (the next kernel of a step usually comes sooner), then
// sleeps on its own condition variable (a job wakes only its workers): no busy thread stays
// beside MindSpore's own pool. One
// pool per process (an inline function's static, shared by all the library's sources); not
// used in a child process after fork (the threads did not survive it).
namespace ddpm_ms_pool {

class Pool {
 public:
  explicit Pool(int threads) : pid_(getpid()), size_(threads), tickets_(threads + 1) {
    for (int i = 1; i <= threads; ++i) std::thread([this, i] { loop(i); }).detach();
  }

  // Run job(t), t in [0, workers), with the caller as t = 0; false (nothing run) if the pool
  // is in use, too small, or inherited through fork.
  bool run(int workers, const std::function<void(int)> &job) {
    if (workers - 1 > size_ || getpid() != pid_ || busy_.exchange(true, std::memory_order_acquire)) return false;
    job_ = &job;
    pending_.store(workers - 1, std::memory_order_relaxed);
    for (int i = 1; i < workers; ++i) {  // wake only this job's workers
      Ticket &ticket = tickets_[i];
      {
        std::lock_guard<std::mutex> lock(ticket.mutex);  // a worker about to sleep sees it move
        ticket.value.fetch_add(1, std::memory_order_release);
      }
      ticket.wake.notify_one();
    }
    job(0);
    // wait for the workers: spin briefly, then yield the core (a descheduled worker needs it)
    const auto spin_until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinUs);
    for (int i = 0; pending_.load(std::memory_order_acquire) != 0; ++i) {
      _mm_pause();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > spin_until) std::this_thread::yield();
    }
    busy_.store(false, std::memory_order_release);
    return true;
  }

 private:
  static constexpr int64_t kSpinUs = 50;
  struct alignas(64) Ticket {  // worker i runs a job each time its own ticket moves
    std::atomic<uint64_t> value{0};
    std::mutex mutex;
    std::condition_variable wake;
  };

  void loop(int index) {
    Ticket &mine = tickets_[index];
    std::atomic<uint64_t> &ticket = mine.value;
    uint64_t seen = 0;
    for (;;) {
      if (!spin_until_moved(ticket, seen)) {
        std::unique_lock<std::mutex> lock(mine.mutex);
        mine.wake.wait(lock, [&] { return ticket.load(std::memory_order_acquire) != seen; });
      }
      ++seen;  // one job per move: run() waits for this worker before it posts the next
      (*job_)(index);
      pending_.fetch_sub(1, std::memory_order_release);
    }
  }

  static bool spin_until_moved(const std::atomic<uint64_t> &ticket, uint64_t seen) {
    const auto until = std::chrono::steady_clock::now() + std::chrono::microseconds(kSpinUs);
    for (int i = 0;; ++i) {
      if (ticket.load(std::memory_order_acquire) != seen) return true;
      _mm_pause();
      if ((i & 63) == 63 && std::chrono::steady_clock::now() > until) return false;
    }
  }

  const pid_t pid_;
  const int size_;
  std::vector<Ticket> tickets_;
  std::atomic<bool> busy_{false};
  std::atomic<int> pending_{0};
  const std::function<void(int)> *job_ = nullptr;
};

inline Pool &pool() {  // one worker per CPU this process may run on, besides the caller
  static Pool *p = new Pool([] {
    cpu_set_t set;
    const int cpus = sched_getaffinity(0, sizeof set, &set) == 0 ? CPU_COUNT(&set)
                                                                 : static_cast<int>(std::thread::hardware_concurrency());
    return std::max(1, cpus - 1);
  }());
  return *p;  // never destroyed: its threads run until the process exits
}

}  // namespace ddpm_ms_pool

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

// Run fn(t) for t in [0, workers) on `workers` threads (the caller is worker 0): on the
// process-wide pool's threads, or on std::threads started for this call when the pool is
// busy (another kernel running on another MindSpore thread) or has too few threads.
template <class F>
void run_workers(int workers, F fn) {
  if (workers <= 1) {
    fn(0);
    return;
  }
  if (ddpm_ms_pool::pool().run(workers, [&](int t) { fn(t); })) return;
  std::vector<std::thread> threads;
  threads.reserve(workers - 1);
  for (int t = 1; t < workers; ++t) threads.emplace_back(fn, t);
  fn(0);
  for (auto &th : threads) th.join();
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
  run_workers(threads, [&](int) {
    for (;;) {
      const int64_t c = next.fetch_add(1);
      if (c >= chunks) return;
      fn(c * grain, std::min(n, (c + 1) * grain));
    }
  });
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

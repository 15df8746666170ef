#include "cpu/thread_pool.h"

#include <atomic>
#include <condition_variable>
#include <cstdlib>
#include <mutex>
#include <string>
#include <thread>
#include <vector>

#if defined(__linux__)
#include <pthread.h>
#include <sched.h>
#endif
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
#include <xmmintrin.h>
#endif

namespace fastsgd {
namespace cpu {
namespace {

int detect_threads() {
  if (const char* env = std::getenv("FASTSGD_NUM_THREADS")) {
    const int n = std::atoi(env);
    if (n >= 1) return n;
  }
#if defined(__linux__)
  cpu_set_t set;
  if (sched_getaffinity(0, sizeof(set), &set) == 0) {
    const int n = CPU_COUNT(&set);
    if (n >= 1) return n;
  }
#endif
  const unsigned n = std::thread::hardware_concurrency();
  return n ? int(n) : 1;
}

// The floating-point mode of the SSE/NEON unit: flush-to-zero, denormals-are-zero and the
// rounding mode (MXCSR on x86, FPCR on aarch64). It is per thread, so a caller that set
// flush-to-zero (torch.set_flush_denormal(True)) would get different bits from its own
// thread and from the workers; the workers take the caller's mode for each task.
using FpMode = unsigned long long;

FpMode fp_mode() {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  return _mm_getcsr();
#elif defined(__aarch64__)
  unsigned long long fpcr;
  __asm__ __volatile__("mrs %0, fpcr" : "=r"(fpcr));
  return fpcr;
#else
  return 0;
#endif
}

void set_fp_mode(FpMode mode) {
#if defined(__x86_64__) || defined(_M_X64) || defined(__i386__)
  _mm_setcsr(static_cast<unsigned int>(mode));
#elif defined(__aarch64__)
  __asm__ __volatile__("msr fpcr, %0" : : "r"(mode));
#else
  (void)mode;
#endif
}

class Pool {
 public:
  explicit Pool(int threads) {
    for (int i = 1; i < threads; ++i) workers_.emplace_back([this, i] { work(i); });
  }

  int size() const { return int(workers_.size()) + 1; }

  void run(int count, void (*task)(void*, int), void* context) {
    {
      std::lock_guard<std::mutex> lock(mutex_);
      task_ = task;
      context_ = context;
      count_ = count;
      fp_mode_ = fp_mode();
      pending_.store(count - 1, std::memory_order_relaxed);
      ++generation_;
    }
    wake_.notify_all();
    task(context, 0);
    std::unique_lock<std::mutex> lock(mutex_);
    done_.wait(lock, [this] { return pending_.load(std::memory_order_acquire) == 0; });
  }

  std::mutex busy;  // held by the step that owns the pool

 private:
  void work(int index) {
    unsigned long seen = 0;
    for (;;) {
      void (*task)(void*, int);
      void* context;
      int count;
      FpMode mode;
      {
        std::unique_lock<std::mutex> lock(mutex_);
        wake_.wait(lock, [&] { return generation_ != seen; });
        seen = generation_;
        task = task_;
        context = context_;
        count = count_;
        mode = fp_mode_;
      }
      if (index < count) {
        if (fp_mode() != mode) set_fp_mode(mode);
        task(context, index);
        if (pending_.fetch_sub(1, std::memory_order_acq_rel) == 1) {
          std::lock_guard<std::mutex> lock(mutex_);
          done_.notify_one();
        }
      }
    }
  }

  std::vector<std::thread> workers_;
  std::mutex mutex_;
  std::condition_variable wake_, done_;
  unsigned long generation_ = 0;
  void (*task_)(void*, int) = nullptr;
  void* context_ = nullptr;
  int count_ = 0;
  FpMode fp_mode_ = 0;
  std::atomic<int> pending_{0};
};

// The pool is created on first use and deliberately never destroyed: its threads would have
// to be joined during interpreter shutdown, and after fork() they do not exist in the child.
std::atomic<Pool*> g_pool{nullptr};
std::mutex g_create;

void forget_pool_in_child() { g_pool.store(nullptr); }

Pool& pool() {
  Pool* p = g_pool.load(std::memory_order_acquire);
  if (p) return *p;
  std::lock_guard<std::mutex> lock(g_create);
  p = g_pool.load(std::memory_order_acquire);
  if (!p) {
#if defined(__linux__)
    static std::once_flag once;
    std::call_once(once, [] { pthread_atfork(nullptr, nullptr, &forget_pool_in_child); });
#endif
    p = new Pool(configured_threads());
    g_pool.store(p, std::memory_order_release);
  }
  return *p;
}

}  // namespace

int configured_threads() {
  static const int n = detect_threads();
  return n;
}

std::atomic<int> g_limit{0};

void set_thread_limit(int threads) { g_limit.store(threads > 0 ? threads : 0); }

int thread_limit() {
  // The pool has configured_threads() threads; asking for more would only serialise.
  const int limit = g_limit.load();
  return limit > 0 && limit < configured_threads() ? limit : configured_threads();
}

void parallel_run(int count, void (*task)(void*, int), void* context) {
  if (count <= 1) {
    if (count == 1) task(context, 0);
    return;
  }
  Pool& p = pool();
  std::unique_lock<std::mutex> owner(p.busy, std::try_to_lock);
  if (!owner.owns_lock() || count > p.size()) {
    for (int i = 0; i < count; ++i) task(context, i);
    return;
  }
  p.run(count, task, context);
}

}  // namespace cpu
}  // namespace fastsgd

// The CPU backend: picks the kernel table for this CPU once, measures gradients for norm
// clipping in fixed blocks, and splits the total element count of a step across threads.
#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <new>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend.h"
#include "cpu/kernels.h"
#include "cpu/thread_pool.h"
#include "fastsgd/math.h"
#include "fastsgd/sgd.h"

namespace fastsgd {
namespace cpu {
namespace {

struct Level {
  const char* name;
  const KernelSet& (*kernels)();
  bool (*supported)();
};

#if defined(__x86_64__) || defined(_M_X64)
bool always() { return true; }
bool has_v3() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("f16c");
}
bool has_v4() {
  __builtin_cpu_init();
  return has_v3() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
         __builtin_cpu_supports("avx512cd");
}
const Level kLevels[] = {{"x86-64", &kernels_x86_64, &always},
                         {"x86-64-v3", &kernels_x86_64_v3, &has_v3},
                         {"x86-64-v4", &kernels_x86_64_v4, &has_v4}};
#elif defined(__aarch64__)
bool always() { return true; }
const Level kLevels[] = {{"neon", &kernels_neon, &always}};
#else
bool always() { return true; }
const Level kLevels[] = {{"generic", &kernels_generic, &always}};
#endif

// The best level this CPU runs, or the one FASTSGD_CPU_ISA names (an error if unavailable).
const Level& choose_level() {
  if (const char* forced = std::getenv("FASTSGD_CPU_ISA")) {
    if (*forced) {
      for (const Level& l : kLevels) {
        if (std::strcmp(l.name, forced) != 0) continue;
        if (!l.supported())
          throw std::runtime_error(std::string("FASTSGD_CPU_ISA=") + forced +
                                   ": this CPU does not support that instruction set level");
        return l;
      }
      std::string known;
      for (const Level& l : kLevels) known += std::string(known.empty() ? "" : ", ") + l.name;
      throw std::runtime_error(std::string("FASTSGD_CPU_ISA=") + forced +
                               ": unknown level (known here: " + known + ")");
    }
  }
  const Level* best = &kLevels[0];
  for (const Level& l : kLevels)
    if (l.supported()) best = &l;
  return *best;
}

const Level& active_level() {
  static const Level& level = choose_level();
  return level;
}

// Norm partial sums cover fixed blocks counted from each tensor's start, so the result is
// the same for any number of threads.
constexpr int64_t kNormBlock = 8192;
// Below this many elements per thread, waking another thread costs more than it saves.
constexpr int64_t kMinElementsPerThread = 1 << 16;
// Thread boundaries inside a tensor fall on multiples of this many elements (>= one cache line).
constexpr int64_t kSplitAlign = 64;

struct NormBlock {
  int task;
  int64_t begin, end;
};

class CpuBackend final : public detail::Backend {
 public:
  CpuBackend() : kernels_(active_level().kernels()) {}

  void* allocate_zeroed(int64_t bytes) override {
    const size_t size = size_t((bytes + 63) / 64 * 64);
    void* p = std::aligned_alloc(64, size ? size : 64);
    if (!p) throw std::bad_alloc();
    std::memset(p, 0, size);
    return p;
  }
  void release(void* p) noexcept override { std::free(p); }
  // Empty tensors may come with null pointers, which memcpy must never see.
  void copy_to_host(void* dst, const void* src, int64_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, size_t(bytes));
  }
  void copy_from_host(void* dst, const void* src, int64_t bytes) override {
    if (bytes > 0) std::memcpy(dst, src, size_t(bytes));
  }

  void measure(detail::StepPlan& plan) override {
    plan_ = &plan;
    blocks_.clear();
    int64_t total = 0;
    for (size_t t = 0; t < plan.tasks.size(); ++t) {
      const auto& task = plan.tasks[t];
      if (task.kind != PassKind::update && task.kind != PassKind::accumulate) continue;
      for (int64_t b = 0; b < task.numel; b += kNormBlock)
        blocks_.push_back({int(t), b, std::min(task.numel, b + kNormBlock)});
      total += task.numel;
    }
    block_sums_.assign(blocks_.size(), BlockSum{});
    const int threads = std::min<int>(threads_for(total), int(std::max<size_t>(1, blocks_.size())));
    workers_ = threads;
    parallel_run(threads, &CpuBackend::sum_task, this);
    detail::GradMeasure& m = plan.measured;
    m.task_sums.assign(plan.tasks.size(), 0.0);
    m.nonfinite = false;
    for (size_t b = 0; b < blocks_.size(); ++b) {
      m.task_sums[size_t(blocks_[b].task)] += block_sums_[b].sum_squares;
      m.nonfinite = m.nonfinite || block_sums_[b].nonfinite;
    }
    m.total = 0.0;
    for (double v : m.task_sums) m.total += v;
    plan_ = nullptr;
  }

  void execute(detail::StepPlan& plan) override {
    if (plan.norm_clip != detail::NormClip::none) set_clip(plan);
    plan_ = &plan;
    run_passes(plan);
    plan_ = nullptr;
  }

 private:
  int threads_for(int64_t elements) const {
    const int64_t want = elements / kMinElementsPerThread;
    return int(std::max<int64_t>(1, std::min<int64_t>(want, thread_limit())));
  }

  // Norm-clip coefficients of every update task, from this step's sums (measured now unless
  // the engine measured already) or from a global sum computed outside.
  void set_clip(detail::StepPlan& plan) {
    const bool global = plan.norm_clip == detail::NormClip::global;
    if (!plan.measured_valid && !(global && plan.external_global)) {
      measure(plan);
      plan.measured_valid = true;
    }
    if (!global) {
      for (size_t t = 0; t < plan.tasks.size(); ++t) {
        auto& task = plan.tasks[t];
        if (task.kind != PassKind::update) continue;
        math::clipnorm_coeffs<double>(
            math::keras_sum_squares(plan.measured.task_sums[t], task.var_dtype != DType::float64), plan.clipnorm,
            task.ts.clip_mul, task.ts.clip_div);
      }
      return;
    }
    const double sum = plan.external_global ? plan.global_sum_squares : plan.measured.total;
    const double scale =
        math::global_clip_scale<double>(math::keras_sum_squares(sum, plan.narrow_global_norm), plan.clipnorm);
    for (auto& task : plan.tasks) {
      task.ts.clip_mul = scale;
      task.ts.clip_div = 1.0;
    }
  }

  static void sum_task(void* self_ptr, int worker) {
    auto* self = static_cast<CpuBackend*>(self_ptr);
    const size_t n = self->blocks_.size();
    const size_t lo = n * size_t(worker) / size_t(self->workers_);
    const size_t hi = n * size_t(worker + 1) / size_t(self->workers_);
    const auto& plan = *self->plan_;
    for (size_t b = lo; b < hi; ++b) {
      const NormBlock& blk = self->blocks_[b];
      const auto& task = plan.tasks[size_t(blk.task)];
      const SumSquaresFn fn = self->kernels_.select_sum_squares(task, plan.features.merge_window);
      self->block_sums_[b] = fn(task, plan.scalars, blk.begin, blk.end);
    }
  }

  void run_passes(detail::StepPlan& plan) {
    const size_t n = plan.tasks.size();
    fns_.resize(n);
    offsets_.resize(n + 1);
    offsets_[0] = 0;
    for (size_t t = 0; t < n; ++t) {
      fns_[t] = kernels_.select_pass(plan.tasks[t], plan.features);
      offsets_[t + 1] = offsets_[t] + plan.tasks[t].numel;
    }
    workers_ = threads_for(offsets_[n]);
    parallel_run(workers_, &CpuBackend::pass_task, this);
  }

  // Global element index -> (task, offset), with the offset rounded down to kSplitAlign.
  void locate(int64_t global, size_t& task, int64_t& offset) const {
    const size_t n = plan_->tasks.size();
    task = size_t(std::upper_bound(offsets_.begin(), offsets_.begin() + long(n) + 1, global) -
                  offsets_.begin()) - 1;
    if (task >= n) {
      task = n;
      offset = 0;
      return;
    }
    offset = (global - offsets_[task]) / kSplitAlign * kSplitAlign;
  }

  static void pass_task(void* self_ptr, int worker) {
    auto* self = static_cast<CpuBackend*>(self_ptr);
    const auto& plan = *self->plan_;
    const size_t n = plan.tasks.size();
    const int64_t total = self->offsets_[n];
    size_t t0, t1;
    int64_t o0, o1;
    self->locate(total * worker / self->workers_, t0, o0);
    if (worker + 1 == self->workers_) {
      t1 = n;
      o1 = 0;
    } else {
      self->locate(total * (worker + 1) / self->workers_, t1, o1);
    }
    for (size_t t = t0; t <= t1 && t < n; ++t) {
      const int64_t begin = (t == t0) ? o0 : 0;
      const int64_t end = (t == t1) ? o1 : plan.tasks[t].numel;
      if (begin < end) self->fns_[t](plan.tasks[t], plan.scalars, begin, end);
    }
  }

  const KernelSet& kernels_;
  const detail::StepPlan* plan_ = nullptr;
  int workers_ = 1;
  std::vector<NormBlock> blocks_;
  std::vector<BlockSum> block_sums_;
  std::vector<PassFn> fns_;
  std::vector<int64_t> offsets_;
};

}  // namespace
}  // namespace cpu

namespace detail {
std::unique_ptr<Backend> make_cpu_backend() { return std::make_unique<cpu::CpuBackend>(); }
}  // namespace detail

void set_num_threads(int threads) { cpu::set_thread_limit(threads); }

CpuInfo cpu_info() {
  CpuInfo info;
  for (const cpu::Level& l : cpu::kLevels)
    if (l.supported()) info.available.emplace_back(l.name);
  info.active = cpu::active_level().name;
  info.threads = cpu::thread_limit();
  return info;
}

}  // namespace fastsgd

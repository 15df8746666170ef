// The CUDA backend's algorithm, run on the host, against the CPU engine -- no GPU needed.
//
// The CUDA kernels are thin: every block calls SgdFunctor<W, S, Op>::block (an element loop
// over math.h) or SumSquaresFunctor::thread_sum, and reductions follow a fixed tree. Those
// functions are __host__ __device__, so this test packs each random StepPlan exactly as the
// backend does (step_launches.h), runs the same launch sequence with a host runner that calls
// the block functions thread by thread, and compares with the CPU backend:
//
//   * passes without a norm clip: every buffer bit for bit (all pass kinds, momentum kinds,
//     window merging, EMA, clipvalue, weight decay, loss scale, all six storage combinations,
//     misaligned buffers, tails, many tensors per launch and many launches);
//   * 16-bit variables with master weights (float32 or remainder) and stochastic rounding:
//     several steps of a planned optimizer, every buffer bit for bit after each step, and the
//     random bits across a 2^32-element segment boundary;
//   * with clipnorm / global_clipnorm: the norm stages' clip coefficients within 1e-12 of the
//     CPU's (both sum in double, in different orders), the update with the CPU's coefficients
//     bit for bit, and the full emulated step within a few units in the last place.
//
// Usage: test_cuda_functor_host [cases] [seed]
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <random>
#include <string>
#include <vector>

#include "backend.h"
#include "fastsgd/dtype.h"
#include "fastsgd/math.h"
#include "multi_tensor_apply.cuh"
#include "plan.h"
#include "sgd_functor.cuh"
#include "step_launches.h"

using namespace fastsgd;
using fastsgd::detail::NormClip;
using fastsgd::detail::PassTask;
using fastsgd::detail::StepPlan;
using fastsgd::gpu::Combo;
using fastsgd::gpu::LaunchMeta;
using fastsgd::gpu::PassVariant;

namespace {

int failures = 0;

#define CHECK(cond, ...)                                  \
  do {                                                    \
    if (!(cond)) {                                        \
      ++failures;                                         \
      if (failures <= 20) {                               \
        std::printf("FAIL %s:%d: ", __FILE__, __LINE__);  \
        std::printf(__VA_ARGS__);                         \
        std::printf("\n");                                \
      }                                                   \
    }                                                     \
  } while (0)

// ---- the host runner: the backend's launches, thread by thread ------------------------------

struct HostRunner {
  gpu::Pair* partials = nullptr;
  gpu::Pair* sums = nullptr;
  double* clip = nullptr;

  void sum_squares(Combo c, bool merge, const LaunchMeta& meta, const StepScalars& s) {
    gpu::visit_combo(c, [&](auto wt, auto st) {
      using W = typename decltype(wt)::type;
      using S = typename decltype(st)::type;
      gpu::visit_sum_squares<W, S>(merge, [&](auto ft) {
        using F = typename decltype(ft)::type;
        gpu::Pair buf[gpu::kBlockThreads];
        for (int64_t b = 0; b < gpu::launch_chunks(meta); ++b) {
          for (int tid = 0; tid < gpu::kBlockThreads; ++tid) buf[tid] = F::thread_sum(meta, b, tid, s);
          partials[meta.partial_base + b] = gpu::block_reduce_host(buf);
        }
      });
    });
  }

  void tensor_norms(const LaunchMeta& meta, bool per_tensor, double clipnorm) {
    gpu::Pair buf[gpu::kBlockThreads];
    for (int b = 0; b < meta.count; ++b) {
      for (int tid = 0; tid < gpu::kBlockThreads; ++tid)
        buf[tid] = gpu::TensorNormStage::thread_sum(meta, b, tid, partials);
      gpu::TensorNormStage::finish(meta, b, gpu::block_reduce_host(buf), per_tensor, clipnorm, sums, clip);
    }
  }

  void global_clip(int32_t rows, double clipnorm, bool narrow) {
    gpu::GlobalNormStage::finish(gpu::GlobalNormStage::total(rows, sums), clipnorm, narrow, clip);
  }

  void pass(Combo c, const PassVariant& v, const LaunchMeta& meta, const StepScalars& s, bool uses_clip) {
    gpu::visit_combo(c, [&](auto wt, auto st) {
      using W = typename decltype(wt)::type;
      using S = typename decltype(st)::type;
      gpu::visit_pass<W, S>(v, [&](auto ft) {
        using F = typename decltype(ft)::type;
        for (int64_t b = 0; b < gpu::launch_chunks(meta); ++b)
          for (int tid = 0; tid < gpu::kBlockThreads; ++tid) F::block(meta, b, tid, s, uses_clip ? clip : nullptr);
      });
    });
  }
};

// Device scratch of one emulated backend call, sized as the backend sizes it.
struct Scratch {
  std::vector<gpu::Pair> partials, sums;
  std::vector<double> clip;
  HostRunner runner(const gpu::StepLaunches& L) {
    partials.assign(size_t(L.norm_chunks) + 1, gpu::Pair{-555.0, -555.0});
    sums.assign(size_t(L.norm_rows) + 1, gpu::Pair{-666.0, -666.0});
    clip.assign(size_t(2 * L.clip_rows()), -777.0);
    return HostRunner{partials.data(), sums.data(), clip.data()};
  }
};

// ---- random worlds ----------------------------------------------------------------------------

struct Buffer {
  std::vector<unsigned char> raw;
  unsigned char* p = nullptr;
  size_t bytes = 0;
  void make(size_t n_bytes, size_t misalign) {
    raw.assign(n_bytes + 128, 0);
    const uintptr_t base = (reinterpret_cast<uintptr_t>(raw.data()) + 63) / 64 * 64;
    p = reinterpret_cast<unsigned char*>(base) + misalign;
    bytes = n_bytes;
  }
};

// One parameter group's hyper-parameters, as the engine turns them into TensorScalars.
struct GroupSpec {
  double lr = 0.01, momentum = 0.0, dampening = 0.0, wd = 0.0;
  bool nesterov = false, l2 = false, maximize = false;
};

// What one task looks like, independent of the copy it lives in.
struct TaskSpec {
  PassKind kind;
  DType var, slot;
  int64_t numel;
  int group;
  bool decays, fresh;
  size_t misalign_var, misalign_slot;  // bytes
};

struct World {
  std::vector<Buffer> bufs;  // 5 per task: w g m acc avg
  StepPlan plan;
};

float random_value(std::mt19937_64& rng, double special_rate) {
  std::uniform_real_distribution<double> u(0.0, 1.0);
  if (u(rng) < special_rate) {
    static const float specials[] = {0.0f, -0.0f, 1e-40f, -3e-39f, 65504.0f, 7e4f, -1e30f,
                                     INFINITY, -INFINITY, NAN, 1.0f, -1.0f, 6e-8f, 1e-45f};
    return specials[std::uniform_int_distribution<int>(0, int(sizeof(specials) / sizeof(float)) - 1)(rng)];
  }
  std::normal_distribution<float> n(0.0f, 1.0f);
  const float scale = std::pow(10.0f, std::uniform_int_distribution<int>(-3, 2)(rng));
  return n(rng) * scale;
}

void fill(void* p, DType t, int64_t n, std::mt19937_64& rng, double special_rate) {
  for (int64_t i = 0; i < n; ++i) {
    const float v = random_value(rng, special_rate);
    switch (t) {
      case DType::float32: static_cast<float*>(p)[i] = v; break;
      case DType::float64: static_cast<double*>(p)[i] = double(v) * (1.0 + 1e-9 * double(i % 7)); break;
      case DType::float16: static_cast<half_t*>(p)[i] = to_half(v); break;
      case DType::bfloat16: static_cast<bfloat16_t*>(p)[i] = to_bfloat16(v); break;
    }
  }
}

double as_double(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::float32: return static_cast<const float*>(p)[i];
    case DType::float64: return static_cast<const double*>(p)[i];
    case DType::float16: return to_float(static_cast<const half_t*>(p)[i]);
    case DType::bfloat16: return to_float(static_cast<const bfloat16_t*>(p)[i]);
  }
  return 0;
}

struct Case {
  StepScalars scalars;
  detail::PassFeatures features;
  NormClip norm_clip = NormClip::none;
  double clipnorm = 0.0;
  Convention rule = Convention::keras;
  std::vector<GroupSpec> groups;
  std::vector<TaskSpec> tasks;
  bool has_acc = false, has_avg = false;
  double special_rate = 0.01;  // share of Inf/NaN/extreme gradient values
  std::string describe() const {
    char s[320];
    const GroupSpec& g = groups[0];
    std::snprintf(s, sizeof(s),
                  "tasks=%zu groups=%zu rule=%d merge=%d ema=%d clip=%d kind0=%d lr=%g mom=%g nest=%d damp=%g "
                  "wd=%g l2=%d max=%d cv=%g keep=%g ow=%d gs=%g",
                  tasks.size(), groups.size(), int(rule), int(features.merge_window), int(features.ema),
                  int(norm_clip), tasks.empty() ? -1 : int(tasks[0].kind), g.lr, g.momentum, int(g.nesterov),
                  g.dampening, g.wd, int(g.l2), int(g.maximize), scalars.clip_value, scalars.ema_keep,
                  int(scalars.ema_overwrite), scalars.grad_scale);
    return s;
  }
};

GroupSpec random_group(std::mt19937_64& rng, Convention rule) {
  auto coin = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  auto uni = [&](double lo, double hi) { return std::uniform_real_distribution<double>(lo, hi)(rng); };
  GroupSpec g;
  g.lr = uni(1e-4, 0.5);
  if (coin(0.7)) g.momentum = coin(0.5) ? 0.9 : uni(0.0, 1.0);
  g.nesterov = g.momentum != 0.0 && coin(0.4);
  if (rule == Convention::torch && g.momentum != 0.0 && !g.nesterov && coin(0.4)) g.dampening = uni(0.0, 1.0);
  if (coin(0.5)) g.wd = uni(1e-4, 0.1);
  g.l2 = rule == Convention::torch ? coin(0.8) : coin(0.2);
  g.maximize = coin(0.25);
  return g;
}

// A plan the engine could produce (sgd.cpp's rules), with random groups, sizes, dtypes and
// alignment.
Case random_case(std::mt19937_64& rng, int index) {
  auto coin = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  auto pick = [&](int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng); };
  Case c;
  c.rule = coin(0.5) ? Convention::torch : Convention::keras;
  const bool finalize = coin(0.06);
  const bool accumulating = coin(0.35);
  const bool update_call = !accumulating || coin(0.5);
  const bool ema = coin(0.4);
  c.has_acc = accumulating;
  c.has_avg = ema || finalize;
  c.special_rate = coin(0.5) ? 0.01 : 0.0;
  const int n_groups = 1 + pick(3);
  for (int g = 0; g < n_groups; ++g) c.groups.push_back(random_group(rng, c.rule));
  StepScalars& s = c.scalars;
  if (!finalize) {
    s.grad_scale = coin(0.3) ? 1.0 / 1024.0 : (coin(0.2) ? 1.0 / 3.0 : 1.0);
    s.window = (accumulating && update_call) ? double(2 + pick(4)) : 1.0;
    s.ema_keep = ema && coin(0.8) ? (coin(0.5) ? 0.99 : std::uniform_real_distribution<double>(0.0, 1.0)(rng)) : 0.0;
    s.merge_window = accumulating && update_call;
    s.reset_accumulator = accumulating && update_call;
    s.ema_overwrite = ema && coin(0.2);
    c.features.merge_window = s.merge_window;
    c.features.ema = ema;
    const int clip = pick(4);  // none, clipvalue, clipnorm, global_clipnorm
    if (clip == 1) s.clip_value = std::uniform_real_distribution<double>(0.01, 2.0)(rng);
    if (update_call && clip >= 2) {
      c.norm_clip = clip == 2 ? NormClip::per_tensor : NormClip::global;
      c.clipnorm = std::uniform_real_distribution<double>(0.05, 50.0)(rng);
    }
    c.features.norm_clip = c.norm_clip != NormClip::none;
    c.features.grad_transforms = s.grad_scale != 1.0 || s.clip_value > 0;
  }
  const bool touches_all = ema || (accumulating && update_call);
  // Sizes: tails, exact chunks, several chunks; sometimes > kMaxTensors tensors.
  static const int64_t sizes[] = {1, 2, 3, 4, 5, 7, 31, 64, 100, 511, 2048, 2049, 4095,
                                  gpu::kChunk - 1, gpu::kChunk, gpu::kChunk + 1, 3 * gpu::kChunk + 13, 50001};
  const int n_tasks = (index % 23 == 0) ? 140 + pick(20) : 1 + pick(9);
  for (int t = 0; t < n_tasks; ++t) {
    TaskSpec ts;
    if (finalize) {
      ts.kind = PassKind::finalize;
    } else if (coin(0.8) || !touches_all) {
      ts.kind = update_call ? PassKind::update : PassKind::accumulate;
    } else {
      ts.kind = PassKind::idle;
    }
    static const DType vars[] = {DType::float32, DType::float64, DType::float16, DType::bfloat16};
    ts.var = vars[pick(4)];
    ts.slot = ts.var;
    if ((ts.var == DType::float16 || ts.var == DType::bfloat16) && coin(0.5)) ts.slot = DType::float32;
    ts.numel = n_tasks > 100 ? 1 + pick(3000) : sizes[pick(int(sizeof(sizes) / sizeof(sizes[0])))];
    ts.group = pick(n_groups);
    ts.decays = coin(0.8);
    ts.fresh = coin(0.3);
    ts.misalign_var = coin(0.25) ? size_t(dtype_size(ts.var)) * size_t(1 + pick(3)) : 0;
    ts.misalign_slot = coin(0.1) ? size_t(dtype_size(ts.slot)) : 0;
    c.tasks.push_back(ts);
  }
  // At least one gradient, as the engine requires.
  if (!finalize) {
    bool any = false;
    for (auto& t : c.tasks) any |= t.kind != PassKind::idle;
    if (!any) c.tasks[0].kind = update_call ? PassKind::update : PassKind::accumulate;
  }
  return c;
}

// Builds the case's buffers: random contents, or the contents of `like` (same layout). The
// tasks' TensorScalars follow sgd.cpp's plan_step.
void make_world(const Case& c, uint64_t seed, World& world, const World* like = nullptr) {
  std::mt19937_64 rng(seed);
  world.bufs.assign(c.tasks.size() * 5, Buffer{});
  world.plan = StepPlan{};
  world.plan.scalars = c.scalars;
  world.plan.features = c.features;
  world.plan.norm_clip = c.norm_clip;
  world.plan.clipnorm = c.clipnorm;
  for (size_t i = 0; i < c.tasks.size(); ++i) {
    const TaskSpec& ts = c.tasks[i];
    const GroupSpec& g = c.groups[size_t(ts.group)];
    PassTask t;
    t.kind = ts.kind;
    t.index = i;
    if (ts.kind != PassKind::finalize) {
      t.rule = c.rule;
      t.momentum = g.momentum == 0.0 ? MomentumKind::none : g.nesterov ? MomentumKind::nesterov : MomentumKind::heavy_ball;
      t.ts.learning_rate = g.lr;
      t.ts.momentum = g.momentum;
      t.ts.dampening = g.dampening;
      t.ts.weight_decay = ts.decays ? g.wd : 0.0;
      t.ts.decay_l2 = g.l2;
      t.ts.maximize = g.maximize;
      t.ts.fresh_momentum = c.rule == Convention::torch && t.momentum != MomentumKind::none && ts.fresh;
    }
    Buffer* b = &world.bufs[i * 5];
    const size_t vb = size_t(ts.numel) * size_t(dtype_size(ts.var));
    const size_t sb = size_t(ts.numel) * size_t(dtype_size(ts.slot));
    const bool present[5] = {true, true, t.momentum != MomentumKind::none, c.has_acc, c.has_avg};
    for (int k = 0; k < 5; ++k) {
      if (!present[k]) continue;
      b[k].make(k < 2 ? vb : sb, k < 2 ? ts.misalign_var : ts.misalign_slot);
      if (like) std::memcpy(b[k].p, like->bufs[i * 5 + size_t(k)].p, b[k].bytes);
      else fill(b[k].p, k < 2 ? ts.var : ts.slot, ts.numel, rng, k < 2 ? c.special_rate : c.special_rate / 2);
    }
    t.var_dtype = ts.var;
    t.slot_dtype = ts.slot;
    t.numel = ts.numel;
    t.w = b[0].p;
    t.g = (ts.kind == PassKind::update || ts.kind == PassKind::accumulate) ? b[1].p : nullptr;
    t.m = b[2].p;
    t.acc = b[3].p;
    t.avg = b[4].p;
    world.plan.tasks.push_back(t);
  }
}

// The packing invariants: every task in exactly one pass launch of its own variant, chunk
// tables consistent.
void check_packing(const gpu::StepLaunches& launches, const StepPlan& plan) {
  int64_t tensors = 0;
  for (size_t i = 0; i < launches.pass_count; ++i) {
    const gpu::Launch& l = launches.pass(i);
    const LaunchMeta& m = l.meta;
    CHECK(m.count > 0 && m.count <= gpu::kMaxTensors, "launch with %d tensors", m.count);
    for (int t = 0; t < m.count; ++t) {
      CHECK(m.chunk_start[t + 1] - m.chunk_start[t] == gpu::chunks_of(m.tensors[t].numel), "chunk table");
      CHECK(m.tensors[t].numel > 0, "empty tensor packed");
    }
    tensors += m.count;
  }
  CHECK(tensors == int64_t(plan.tasks.size()), "packed %lld of %zu tasks", (long long)tensors, plan.tasks.size());
}

// Runs the CUDA backend's execute() on the host: host clip coefficients when the plan has
// measured sums or an external global sum, else the device norm stages.
void run_emulated(World& world, std::vector<double>* clip_out = nullptr) {
  gpu::StepLaunches launches;
  const bool host_clip = gpu::host_clip_coefficients(world.plan);
  launches.build(world.plan, world.plan.norm_clip != NormClip::none && !host_clip);
  Scratch scratch;
  HostRunner r = scratch.runner(launches);
  gpu::run_step(launches, r);
  if (clip_out) *clip_out = scratch.clip;
  check_packing(launches, world.plan);
}

// The CUDA backend's measure() on the host.
void measure_emulated(World& world) {
  gpu::StepLaunches launches;
  launches.build_measure(world.plan);
  Scratch scratch;
  HostRunner r = scratch.runner(launches);
  gpu::run_measure(launches, r);
  gpu::collect_measure(launches, scratch.sums.data(), world.plan.measured);
}

size_t elem_size_of(const Case& c, size_t task, int slot) {
  return size_t(dtype_size(slot < 2 ? c.tasks[task].var : c.tasks[task].slot));
}

DType dtype_of(const Case& c, size_t task, int slot) { return slot < 2 ? c.tasks[task].var : c.tasks[task].slot; }

// Bitwise comparison of every buffer of two worlds.
bool same_bits(const Case& c, const World& a, const World& b, const char* what, int case_index) {
  static const char* names[5] = {"w", "g", "m", "acc", "avg"};
  for (size_t i = 0; i < c.tasks.size(); ++i) {
    for (int k = 0; k < 5; ++k) {
      const Buffer& x = a.bufs[i * 5 + size_t(k)];
      const Buffer& y = b.bufs[i * 5 + size_t(k)];
      if (!x.p) continue;
      if (std::memcmp(x.p, y.p, x.bytes) != 0) {
        // NaN payloads and signs are not part of the contract (x86 propagates the first
        // operand's NaN, and compilers may swap operands; GPUs produce a canonical NaN).
        const size_t es = elem_size_of(c, i, k);
        const DType t = dtype_of(c, i, k);
        int64_t first = -1;
        for (int64_t e = 0; e < c.tasks[i].numel && first < 0; ++e) {
          if (std::memcmp(x.p + size_t(e) * es, y.p + size_t(e) * es, es) == 0) continue;
          if (std::isnan(as_double(x.p, t, e)) && std::isnan(as_double(y.p, t, e))) continue;
          first = e;
        }
        if (first < 0) continue;
        CHECK(false, "case %d (%s): %s task %zu (kind %d, %s/%s, n=%lld) buffer %s differs at %lld: cpu %.9g, cuda %.9g",
              case_index, c.describe().c_str(), what, i, int(c.tasks[i].kind), dtype_name(c.tasks[i].var),
              dtype_name(c.tasks[i].slot), (long long)c.tasks[i].numel, names[k], (long long)first,
              as_double(x.p, dtype_of(c, i, k), first), as_double(y.p, dtype_of(c, i, k), first));
        return false;
      }
    }
  }
  return true;
}

// Values within a few units in the last place of the storage type (norm clip: the CPU and the
// GPU sum squares in different orders).
bool close_values(const Case& c, const World& a, const World& b, int case_index) {
  for (size_t i = 0; i < c.tasks.size(); ++i) {
    for (int k = 0; k < 5; ++k) {
      const Buffer& x = a.bufs[i * 5 + size_t(k)];
      const Buffer& y = b.bufs[i * 5 + size_t(k)];
      if (!x.p) continue;
      const DType t = dtype_of(c, i, k);
      const double eps = t == DType::float64 ? 1e-13 : t == DType::float32 ? 4e-6 : t == DType::float16 ? 4e-3 : 3e-2;
      for (int64_t e = 0; e < c.tasks[i].numel; ++e) {
        const double u = as_double(x.p, t, e), v = as_double(y.p, t, e);
        if (std::isnan(u) && std::isnan(v)) continue;
        if (u == v) continue;
        const double tol = eps * std::max(std::fabs(u), std::fabs(v)) + eps * 1e-3;
        if (!(std::fabs(u - v) <= tol)) {
          CHECK(false, "case %d (%s): norm-clipped task %zu slot %d element %lld: cpu %.17g, cuda %.17g", case_index,
                c.describe().c_str(), i, k, (long long)e, u, v);
          return false;
        }
      }
    }
  }
  return true;
}

bool near(double a, double b, double rel) {
  return (std::isnan(a) && std::isnan(b)) || a == b || std::fabs(a - b) <= rel * std::max(std::fabs(a), std::fabs(b));
}

// measure(): per-task sums close to the CPU's (both sum in double, in different orders), the
// non-finite flag and which tasks were measured exactly the same.
void compare_measure(const Case& c, const World& world, int i) {
  World cpu_w, gpu_w;
  auto cpu = detail::make_cpu_backend();
  make_world(c, 1, cpu_w, &world);
  make_world(c, 1, gpu_w, &world);
  cpu->measure(cpu_w.plan);
  measure_emulated(gpu_w);
  const auto& a = cpu_w.plan.measured;
  const auto& b = gpu_w.plan.measured;
  CHECK(a.nonfinite == b.nonfinite, "case %d (%s): measure nonfinite cpu %d cuda %d", i, c.describe().c_str(),
        int(a.nonfinite), int(b.nonfinite));
  CHECK(a.task_sums.size() == b.task_sums.size(), "case %d: measure sizes", i);
  for (size_t t = 0; t < a.task_sums.size() && t < b.task_sums.size(); ++t)
    CHECK(near(a.task_sums[t], b.task_sums[t], 1e-12), "case %d (%s): task %zu sum cpu %.17g cuda %.17g", i,
          c.describe().c_str(), t, a.task_sums[t], b.task_sums[t]);
  CHECK(near(a.total, b.total, 1e-12), "case %d: total cpu %.17g cuda %.17g", i, a.total, b.total);
  // Nothing changed.
  same_bits(c, world, gpu_w, "buffers after measure", i);
}

// ---- 16-bit variables: master weights, remainders, stochastic rounding ----------------------
//
// Several steps of one optimizer, planned as sgd.cpp's plan_step plans them (forms, slots,
// random streams per raw step, stepless for remainders, torch's fresh momentum, accumulation
// windows, clipvalue, loss scale, per-tensor clipnorm with the CPU's measured sums), run by
// the CPU engine and by the emulated CUDA backend from the same buffers; after every step
// every buffer must hold the same bits.

enum class LowpMode { plain_sr, master, master_sr, remainder, remainder_sr };
const char* const kLowpModeNames[] = {"plain+SR", "master", "master+SR", "remainder", "remainder+SR"};

struct LowpTensor {
  DType var, slot;
  int64_t numel;
  int group;
  bool decays;
  size_t misalign;  // bytes, of every buffer of the tensor
};

struct LowpCase {
  Convention rule = Convention::keras;
  LowpMode mode = LowpMode::plain_sr;
  uint64_t seed = 0;
  int window = 0;  // gradient_accumulation_steps (0: none)
  double grad_scale = 1.0, clip_value = 0.0, clipnorm = 0.0;
  int steps = 3;
  double special_rate = 0.0;
  std::vector<GroupSpec> groups;
  std::vector<LowpTensor> tensors;
  std::string describe() const {
    char s[256];
    const GroupSpec& g = groups[0];
    std::snprintf(s, sizeof(s),
                  "lowp %s rule=%d tensors=%zu window=%d gs=%g cv=%g clipnorm=%g lr=%g mom=%g nest=%d damp=%g wd=%g "
                  "l2=%d max=%d",
                  kLowpModeNames[int(mode)], int(rule), tensors.size(), window, grad_scale, clip_value, clipnorm,
                  g.lr, g.momentum, int(g.nesterov), g.dampening, g.wd, int(g.l2), int(g.maximize));
    return s;
  }
};

bool is_16bit(DType t) { return t == DType::float16 || t == DType::bfloat16; }

LowpCase random_lowp_case(std::mt19937_64& rng, int index) {
  auto coin = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  auto pick = [&](int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng); };
  LowpCase c;
  c.rule = index % 2 ? Convention::torch : Convention::keras;
  c.mode = LowpMode(index / 2 % 5);
  const bool remainder = c.mode == LowpMode::remainder || c.mode == LowpMode::remainder_sr;
  const bool master = c.mode != LowpMode::plain_sr;
  c.seed = rng();
  c.window = coin(0.3) ? 2 + pick(2) : 0;
  c.grad_scale = coin(0.3) ? 1.0 / 1024.0 : 1.0;
  if (coin(0.3)) c.clip_value = std::uniform_real_distribution<double>(0.01, 2.0)(rng);
  else if (coin(0.2)) c.clipnorm = std::uniform_real_distribution<double>(0.05, 20.0)(rng);
  c.steps = 2 + pick(3);
  c.special_rate = coin(0.3) ? 0.005 : 0.0;
  const int n_groups = 1 + pick(2);
  for (int g = 0; g < n_groups; ++g) c.groups.push_back(random_group(rng, c.rule));
  static const int64_t sizes[] = {1, 3, 4, 5, 31, 511, 2049, gpu::kChunk - 1, gpu::kChunk, gpu::kChunk + 3,
                                  2 * gpu::kChunk + 13};
  const int n = (index % 17 == 0) ? 130 + pick(10) : 1 + pick(6);
  for (int t = 0; t < n; ++t) {
    LowpTensor x;
    // Mostly 16-bit variables; float32 ones beside them keep the common path in the same step.
    x.var = remainder ? DType::bfloat16 : (coin(0.5) ? DType::bfloat16 : DType::float16);
    if (coin(0.15)) x.var = DType::float32;
    // Masters exist only with float32 slots; plain stochastic rounding also with 16-bit slots.
    x.slot = (master || x.var == DType::float32 || coin(0.5)) ? DType::float32 : x.var;
    x.numel = n > 100 ? 1 + pick(700) : sizes[pick(int(sizeof(sizes) / sizeof(sizes[0])))];
    x.group = pick(n_groups);
    x.decays = coin(0.8);
    x.misalign = coin(0.25) ? 2 * size_t(1 + pick(3)) : 0;
    c.tensors.push_back(x);
  }
  return c;
}

// One copy of the optimizer's buffers: w g m acc master per tensor.
struct LowpWorld {
  std::vector<Buffer> bufs;
  Buffer& at(size_t tensor, int k) { return bufs[tensor * 5 + size_t(k)]; }
  const Buffer& at(size_t tensor, int k) const { return bufs[tensor * 5 + size_t(k)]; }
};
enum : int { kLw = 0, kLg = 1, kLm = 2, kLacc = 3, kLmaster = 4 };

detail::VarForm lowp_form(const LowpCase& c, DType var) {
  if (!is_16bit(var) || c.mode == LowpMode::plain_sr) return detail::VarForm::plain;
  return (c.mode == LowpMode::remainder || c.mode == LowpMode::remainder_sr) ? detail::VarForm::remainder
                                                                              : detail::VarForm::master;
}

bool lowp_stochastic(const LowpCase& c) {
  return c.mode == LowpMode::plain_sr || c.mode == LowpMode::master_sr || c.mode == LowpMode::remainder_sr;
}

// Buffer k's misalignment in bytes: `x.misalign` counts 16-bit elements' bytes; wider buffers
// (float32 slots and masters) move by as many of their own elements, so that they stay
// aligned to their element type, as the engine requires.
size_t lowp_misalign(const LowpCase& c, const LowpTensor& x, int k) {
  const size_t elements = x.misalign / 2;
  if (k == kLw || k == kLg) return elements * size_t(dtype_size(x.var));
  if (k == kLm || k == kLacc) return elements * size_t(dtype_size(x.slot));
  return elements * (lowp_form(c, x.var) == detail::VarForm::master ? 4 : 2);
}

void make_lowp_world(const LowpCase& c, std::mt19937_64& rng, LowpWorld& world) {
  world.bufs.assign(c.tensors.size() * 5, Buffer{});
  for (size_t i = 0; i < c.tensors.size(); ++i) {
    const LowpTensor& x = c.tensors[i];
    const GroupSpec& g = c.groups[size_t(x.group)];
    const size_t n = size_t(x.numel);
    world.at(i, kLw).make(n * size_t(dtype_size(x.var)), lowp_misalign(c, x, kLw));
    fill(world.at(i, kLw).p, x.var, x.numel, rng, c.special_rate);
    world.at(i, kLg).make(n * size_t(dtype_size(x.var)), lowp_misalign(c, x, kLg));
    if (g.momentum != 0.0) {
      world.at(i, kLm).make(n * size_t(dtype_size(x.slot)), lowp_misalign(c, x, kLm));
      fill(world.at(i, kLm).p, x.slot, x.numel, rng, 0.0);
    }
    if (c.window >= 2) {
      world.at(i, kLacc).make(n * size_t(dtype_size(x.slot)), lowp_misalign(c, x, kLacc));
      fill(world.at(i, kLacc).p, x.slot, x.numel, rng, 0.0);
    }
    const detail::VarForm form = lowp_form(c, x.var);
    if (form == detail::VarForm::master) {
      // A master near its variable, as training leaves it: the widened variable plus a little.
      Buffer& m = world.at(i, kLmaster);
      m.make(n * 4, lowp_misalign(c, x, kLmaster));
      for (size_t e = 0; e < n; ++e) {
        const float v = float(as_double(world.at(i, kLw).p, x.var, int64_t(e)));
        const float nudge = std::uniform_real_distribution<float>(-1.0f, 1.0f)(rng) * 4e-3f;
        reinterpret_cast<float*>(m.p)[e] = v + v * nudge;
      }
    } else if (form == detail::VarForm::remainder) {
      // Any 16 bits beside any bfloat16 variable are a valid (variable, remainder) pair.
      Buffer& m = world.at(i, kLmaster);
      m.make(n * 2, lowp_misalign(c, x, kLmaster));
      for (size_t e = 0; e < n; ++e) reinterpret_cast<uint16_t*>(m.p)[e] = uint16_t(rng());
    }
  }
}

void copy_lowp_world(const LowpWorld& from, LowpWorld& to, const LowpCase& c) {
  to.bufs.assign(from.bufs.size(), Buffer{});
  for (size_t i = 0; i < c.tensors.size(); ++i)
    for (int k = 0; k < 5; ++k) {
      const Buffer& a = from.at(i, k);
      if (!a.p) continue;
      to.at(i, k).make(a.bytes, lowp_misalign(c, c.tensors[i], k));
      std::memcpy(to.at(i, k).p, a.p, a.bytes);
    }
}

// The plan of raw step `step` over `world`, as sgd.cpp's plan_step makes it. `has_grad[i]`:
// tensor i has a gradient this call; `started[i]`: its torch momentum slot has started.
StepPlan plan_lowp_step(const LowpCase& c, LowpWorld& world, int64_t step, const std::vector<bool>& has_grad,
                        const std::vector<bool>& started) {
  const bool accumulating = c.window >= 2;
  const bool update_call = !accumulating || step % c.window == c.window - 1;
  const bool touches_all = accumulating && update_call;
  StepPlan plan;
  StepScalars& s = plan.scalars;
  s.grad_scale = c.grad_scale;
  s.window = (accumulating && update_call) ? double(c.window) : 1.0;
  s.clip_value = c.clip_value;
  s.merge_window = accumulating && update_call;
  s.reset_accumulator = accumulating && update_call;
  plan.features.merge_window = s.merge_window;
  plan.features.grad_transforms = s.grad_scale != 1.0 || s.clip_value > 0;
  plan.norm_clip = (update_call && c.clipnorm > 0) ? NormClip::per_tensor : NormClip::none;
  plan.clipnorm = c.clipnorm;
  plan.features.norm_clip = plan.norm_clip != NormClip::none;
  for (size_t i = 0; i < c.tensors.size(); ++i) {
    const LowpTensor& x = c.tensors[i];
    const GroupSpec& g = c.groups[size_t(x.group)];
    PassTask t;
    if (has_grad[i]) t.kind = update_call ? PassKind::update : PassKind::accumulate;
    else if (touches_all) t.kind = PassKind::idle;
    else continue;
    t.index = i;
    t.rule = c.rule;
    t.momentum = g.momentum == 0.0 ? MomentumKind::none : g.nesterov ? MomentumKind::nesterov : MomentumKind::heavy_ball;
    t.var_dtype = x.var;
    t.slot_dtype = x.slot;
    t.numel = x.numel;
    t.w = world.at(i, kLw).p;
    t.g = has_grad[i] ? world.at(i, kLg).p : nullptr;
    t.m = t.momentum != MomentumKind::none ? world.at(i, kLm).p : nullptr;
    t.acc = world.at(i, kLacc).p;
    t.ts.learning_rate = update_call ? g.lr : 0.0;
    t.ts.momentum = g.momentum;
    t.ts.dampening = g.dampening;
    t.ts.weight_decay = x.decays ? g.wd : 0.0;
    t.ts.decay_l2 = g.l2 && t.ts.weight_decay != 0.0;  // as sgd.cpp: no L2 term without decay
    t.ts.maximize = g.maximize;
    t.form = lowp_form(c, x.var);
    if (t.form != detail::VarForm::plain) t.master = world.at(i, kLmaster).p;
    if (lowp_stochastic(c) && is_16bit(x.var)) {
      t.stochastic = true;
      const bool stepless = t.form == detail::VarForm::remainder;
      t.ts.random_stream = math::random_stream(c.seed, stepless ? math::kStepless : uint64_t(step), i);
    }
    if (c.rule == Convention::torch && t.momentum != MomentumKind::none) t.ts.fresh_momentum = !started[i];
    plan.tasks.push_back(t);
  }
  return plan;
}

// Every buffer bit for bit; NaN payloads aside (see same_bits), a remainder compared as the
// float32 master it forms with its variable.
bool same_lowp_bits(const LowpCase& c, const LowpWorld& a, const LowpWorld& b, int64_t step, int case_index) {
  static const char* names[5] = {"w", "g", "m", "acc", "master/remainder"};
  for (size_t i = 0; i < c.tensors.size(); ++i) {
    const LowpTensor& x = c.tensors[i];
    const detail::VarForm form = lowp_form(c, x.var);
    for (int k = 0; k < 5; ++k) {
      const Buffer& u = a.at(i, k);
      const Buffer& v = b.at(i, k);
      if (!u.p || std::memcmp(u.p, v.p, u.bytes) == 0) continue;
      const DType t = k == kLw || k == kLg ? x.var : (k == kLmaster ? DType::float32 : x.slot);
      for (int64_t e = 0; e < x.numel; ++e) {
        double p, q;
        if (k == kLmaster && form == detail::VarForm::remainder) {
          auto joined = [&](const LowpWorld& w) {
            const uint32_t hi = reinterpret_cast<const uint16_t*>(w.at(i, kLw).p)[e];
            const uint32_t lo = reinterpret_cast<const uint16_t*>(w.at(i, kLmaster).p)[e];
            return double(bits::bits_float(hi << 16 | lo));
          };
          if (reinterpret_cast<const uint16_t*>(u.p)[e] == reinterpret_cast<const uint16_t*>(v.p)[e]) continue;
          p = joined(a);
          q = joined(b);
        } else {
          const size_t es = size_t(dtype_size(t));
          if (std::memcmp(u.p + size_t(e) * es, v.p + size_t(e) * es, es) == 0) continue;
          p = as_double(u.p, t, e);
          q = as_double(v.p, t, e);
        }
        if (std::isnan(p) && std::isnan(q)) continue;
        CHECK(false, "case %d (%s): step %lld tensor %zu (%s/%s, n=%lld) buffer %s differs at %lld: cpu %.9g, cuda %.9g",
              case_index, c.describe().c_str(), (long long)step, i, dtype_name(x.var), dtype_name(x.slot),
              (long long)x.numel, names[k], (long long)e, p, q);
        return false;
      }
    }
  }
  return true;
}

void run_lowp_case(const LowpCase& c, std::mt19937_64& rng, detail::Backend& cpu, int case_index) {
  LowpWorld cpu_world, cuda_world;
  make_lowp_world(c, rng, cpu_world);
  copy_lowp_world(cpu_world, cuda_world, c);
  std::vector<bool> started(c.tensors.size(), false);
  for (int64_t step = 0; step < c.steps; ++step) {
    std::vector<bool> has_grad(c.tensors.size(), true);
    for (size_t i = 0; i < c.tensors.size(); ++i) {
      const LowpTensor& x = c.tensors[i];
      if (c.tensors.size() > 1 && rng() % 7 == 0) has_grad[i] = false;
      fill(cpu_world.at(i, kLg).p, x.var, x.numel, rng, c.special_rate);
      std::memcpy(cuda_world.at(i, kLg).p, cpu_world.at(i, kLg).p, cpu_world.at(i, kLg).bytes);
    }
    if (std::none_of(has_grad.begin(), has_grad.end(), [](bool b) { return b; })) has_grad[0] = true;
    StepPlan cpu_plan = plan_lowp_step(c, cpu_world, step, has_grad, started);
    StepPlan cuda_plan = plan_lowp_step(c, cuda_world, step, has_grad, started);
    if (cpu_plan.norm_clip != NormClip::none) {
      // Coefficients from the same sums (the device's own differ in the last bits).
      cpu.measure(cpu_plan);
      cpu_plan.measured_valid = cuda_plan.measured_valid = true;
      cuda_plan.measured = cpu_plan.measured;
    }
    cpu.execute(cpu_plan);
    const bool host_clip = gpu::host_clip_coefficients(cuda_plan);
    CHECK(host_clip == (cuda_plan.norm_clip != NormClip::none), "case %d: host clip coefficients", case_index);
    gpu::StepLaunches launches;
    launches.build(cuda_plan, false);
    Scratch scratch;
    HostRunner r = scratch.runner(launches);
    gpu::run_step(launches, r);
    check_packing(launches, cuda_plan);
    if (!same_lowp_bits(c, cpu_world, cuda_world, step, case_index)) return;
    for (const PassTask& t : cpu_plan.tasks)
      if (t.kind == PassKind::update && t.momentum != MomentumKind::none) started[t.index] = true;
  }
}

// Random bits across a 2^32-element segment boundary: blocks own chunks of a tensor of
// 2^32 + 40 elements, of which only the two chunks around element 2^32 are backed (the
// pointers are based so that only they are touched), for every form, against the CPU's
// lowp_update_pass spelled with math.h element by element.
void check_segment_boundary() {
  constexpr int64_t kFirst = (int64_t(1) << 32) - gpu::kChunk;
  constexpr int64_t kNumel = (int64_t(1) << 32) + 40;
  constexpr int kCount = int(kNumel - kFirst);
  std::mt19937 rng(11);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int before = failures;
  for (int form = 0; form < 3; ++form) {
    for (int stochastic = form == 0 ? 1 : 0; stochastic < 2; ++stochastic) {
      std::vector<bfloat16_t> w(kCount), g(kCount), expect(kCount);
      std::vector<float> master(kCount), expect_master(kCount);
      std::vector<uint16_t> rem(kCount), expect_rem(kCount);
      for (int e = 0; e < kCount; ++e) {
        master[size_t(e)] = normal(rng);
        w[size_t(e)] = to_bfloat16(master[size_t(e)]);
        rem[size_t(e)] = uint16_t(rng());
        g[size_t(e)] = to_bfloat16(normal(rng));
      }
      detail::PassTask t;
      t.var_dtype = DType::bfloat16;
      t.numel = kNumel;
      t.w = w.data() - kFirst;
      t.g = g.data() - kFirst;
      t.form = detail::VarForm(form);
      t.master = form == 1 ? static_cast<void*>(master.data() - kFirst)
                           : (form == 2 ? static_cast<void*>(rem.data() - kFirst) : nullptr);
      t.stochastic = stochastic != 0;
      t.ts.learning_rate = 0.25;
      t.ts.random_stream = 0x9e3779b97f4a7c15ull * uint64_t(form + 1);
      const math::Coeffs<float> k = math::make_coeffs<float>(StepScalars{}, t.ts);
      for (int e = 0; e < kCount; ++e) {
        const int64_t i = kFirst + e;
        const uint32_t key = math::segment_key(t.ts.random_stream, i), j = uint32_t(i);
        bfloat16_t v = w[size_t(e)];
        uint16_t lo = rem[size_t(e)];
        float x = form == 1 ? master[size_t(e)]
                 : form == 2 ? (stochastic ? math::remainder_join<true>(v, lo, key, j) : math::remainder_join<false>(v, lo, key, j))
                             : to_float(v);
        float m = 0, acc = 0, avg = 0;
        math::update<float, Convention::keras, MomentumKind::none, false, true, false>(x, to_float(g[size_t(e)]), m,
                                                                                       acc, avg, k);
        if (form == 2) {
          if (stochastic) math::remainder_split<true>(x, v, lo, key, j);
          else math::remainder_split<false>(x, v, lo, key, j);
        } else if (stochastic) {
          math::store_rounded<true>(v, x, math::random16(key, j));
        } else {
          math::store_rounded<false>(v, x, 0u);
        }
        expect[size_t(e)] = v;
        expect_master[size_t(e)] = x;
        expect_rem[size_t(e)] = lo;
      }
      StepPlan plan;
      plan.tasks.push_back(t);
      gpu::StepLaunches launches;
      launches.build(plan, false);
      CHECK(launches.pass_count == 1, "segment boundary: %zu launches", launches.pass_count);
      const gpu::Launch& l = launches.pass(0);
      gpu::visit_combo(l.combo, [&](auto wt, auto st) {
        using W = typename decltype(wt)::type;
        using S = typename decltype(st)::type;
        gpu::visit_pass<W, S>(gpu::variant_of(l, plan.features), [&](auto ft) {
          using F = typename decltype(ft)::type;
          for (int64_t b = kFirst / gpu::kChunk; b < gpu::launch_chunks(l.meta); ++b)
            for (int tid = 0; tid < gpu::kBlockThreads; ++tid) F::block(l.meta, b, tid, plan.scalars, nullptr);
        });
      });
      for (int e = 0; e < kCount; ++e) {
        const bool ok = w[size_t(e)].bits == expect[size_t(e)].bits &&
                        (form != 1 || bits::float_bits(master[size_t(e)]) == bits::float_bits(expect_master[size_t(e)])) &&
                        (form != 2 || rem[size_t(e)] == expect_rem[size_t(e)]);
        if (!ok) {
          CHECK(false, "segment boundary form=%d stochastic=%d element 2^32%+lld: %04x, expected %04x", form,
                stochastic, (long long)(kFirst + e - (int64_t(1) << 32)), w[size_t(e)].bits, expect[size_t(e)].bits);
          break;
        }
      }
    }
  }
  std::printf("lowp segment boundary: %s\n", failures == before ? "ok" : "FAILED");
}

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 400;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 20240611u;
  std::mt19937_64 rng(seed);
  auto cpu = detail::make_cpu_backend();
  int clipped = 0, bitwise = 0, torch = 0;
  for (int i = 0; i < cases; ++i) {
    const Case c = random_case(rng, i);
    torch += c.rule == Convention::torch;
    const uint64_t data_seed = rng();
    World input, cpu_world, cuda_world;
    make_world(c, data_seed, input);
    make_world(c, data_seed, cpu_world, &input);
    make_world(c, data_seed, cuda_world, &input);
    compare_measure(c, input, i);

    if (c.norm_clip == NormClip::none) {
      cpu->execute(cpu_world.plan);
      run_emulated(cuda_world);
      same_bits(c, cpu_world, cuda_world, "element-wise step", i);
      ++bitwise;
      continue;
    }
    ++clipped;
    // 1. Sums the host already has (the CPU's measure, as after skip_nonfinite's check) ->
    //    the same coefficients -> the same bits.
    cpu->measure(cpu_world.plan);
    cpu_world.plan.measured_valid = true;
    cuda_world.plan.measured = cpu_world.plan.measured;
    cuda_world.plan.measured_valid = true;
    cpu->execute(cpu_world.plan);
    run_emulated(cuda_world);
    same_bits(c, cpu_world, cuda_world, "update with the measured sums", i);
    // 2. global_clipnorm from a sum computed outside: bit for bit as well.
    if (c.norm_clip == NormClip::global) {
      World cpu_ext, cuda_ext;
      make_world(c, data_seed, cpu_ext, &input);
      make_world(c, data_seed, cuda_ext, &input);
      const double outside = (i % 5 == 0) ? INFINITY : std::uniform_real_distribution<double>(0.0, 1e4)(rng);
      for (World* w : {&cpu_ext, &cuda_ext}) {
        w->plan.external_global = true;
        w->plan.global_sum_squares = outside;
      }
      cpu->execute(cpu_ext.plan);
      run_emulated(cuda_ext);
      same_bits(c, cpu_ext, cuda_ext, "update with an external global sum", i);
    }
    // 3. The device norm stages: coefficients close to the CPU's, values a few ulp apart.
    World device;
    make_world(c, data_seed, device, &input);
    std::vector<double> clip;
    run_emulated(device, &clip);
    int row = 0;
    for (const PassTask& t : cpu_world.plan.tasks) {
      if (t.kind != PassKind::update) continue;
      const double mul = clip[size_t(2 * row)], div = clip[size_t(2 * row + 1)];
      CHECK(near(mul, t.ts.clip_mul, 1e-12) && near(div, t.ts.clip_div, 1e-12),
            "case %d (%s): clip row %d: cuda (%.17g, %.17g) cpu (%.17g, %.17g)", i, c.describe().c_str(), row, mul,
            div, t.ts.clip_mul, t.ts.clip_div);
      if (c.norm_clip == NormClip::per_tensor) ++row;
    }
    close_values(c, cpu_world, device, i);
    // 4. The device stages agree bit for bit with host coefficients from the device's own
    //    measure (skip_nonfinite on or off gives the same step).
    World measured;
    make_world(c, data_seed, measured, &input);
    measure_emulated(measured);
    measured.plan.measured_valid = true;
    run_emulated(measured);
    same_bits(c, device, measured, "device-clipped vs measured-then-clipped", i);
    // 5. Deterministic: a second run gives the same bits.
    World again;
    make_world(c, data_seed, again, &input);
    run_emulated(again);
    same_bits(c, device, again, "repeat of a norm-clipped step", i);
  }
  std::printf("%d cases (%d torch rule; %d element-wise bit-exact, %d norm-clipped): %s\n", cases, torch, bitwise,
              clipped, failures ? "FAILED" : "ok");
  const int before_lowp = failures;
  const int lowp_cases = cases / 2 > 20 ? cases / 2 : 20;
  for (int i = 0; i < lowp_cases; ++i) {
    const LowpCase c = random_lowp_case(rng, i);
    run_lowp_case(c, rng, *cpu, i);
  }
  std::printf("%d 16-bit storage cases (every mode, both rules, several steps each): %s\n", lowp_cases,
              failures == before_lowp ? "ok" : "FAILED");
  check_segment_boundary();
  if (failures) std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}

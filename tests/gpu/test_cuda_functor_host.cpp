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
  double* partials = nullptr;
  double* sums = nullptr;
  double* clip = nullptr;
  bool skip_norm = false;  // keep a clip table filled by the test

  void sum_squares(Combo c, bool merge, const LaunchMeta& meta, const StepScalars& s) {
    if (skip_norm) return;
    gpu::visit_combo(c, [&](auto wt, auto st) {
      using W = typename decltype(wt)::type;
      using S = typename decltype(st)::type;
      gpu::visit_sum_squares<W, S>(merge, [&](auto ft) {
        using F = typename decltype(ft)::type;
        double buf[gpu::kBlockThreads];
        for (int64_t b = 0; b < gpu::launch_chunks(meta); ++b) {
          for (int tid = 0; tid < gpu::kBlockThreads; ++tid) buf[tid] = F::thread_sum(meta, b, tid, s);
          partials[meta.partial_base + b] = gpu::block_reduce_host(buf);
        }
      });
    });
  }

  void tensor_norms(const LaunchMeta& meta, bool per_tensor, double clipnorm) {
    if (skip_norm) return;
    double buf[gpu::kBlockThreads];
    for (int b = 0; b < meta.count; ++b) {
      for (int tid = 0; tid < gpu::kBlockThreads; ++tid)
        buf[tid] = gpu::TensorNormStage::thread_sum(meta, b, tid, partials);
      gpu::TensorNormStage::finish(meta, b, gpu::block_reduce_host(buf), per_tensor, clipnorm, sums, clip);
    }
  }

  void global_clip(int32_t rows, double clipnorm) {
    if (skip_norm) return;
    double buf[gpu::kBlockThreads];
    for (int tid = 0; tid < gpu::kBlockThreads; ++tid) buf[tid] = gpu::GlobalNormStage::thread_sum(rows, tid, sums);
    gpu::GlobalNormStage::finish(gpu::block_reduce_host(buf), clipnorm, clip);
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

// What one task looks like, independent of the copy it lives in.
struct TaskSpec {
  PassKind kind;
  DType var, slot;
  int64_t numel;
  bool decays;
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
  std::vector<TaskSpec> tasks;
  bool has_m = false, has_acc = false, has_avg = false;
  std::string describe() const {
    char s[256];
    std::snprintf(s, sizeof(s), "tasks=%zu mom=%d merge=%d ema=%d clip=%d kind0=%d lr=%g wd=%g cv=%g keep=%g ow=%d",
                  tasks.size(), int(features.momentum), int(features.merge_window), int(features.ema),
                  int(norm_clip), tasks.empty() ? -1 : int(tasks[0].kind), scalars.learning_rate,
                  scalars.weight_decay, scalars.clip_value, scalars.ema_keep, int(scalars.ema_overwrite));
    return s;
  }
};

// A plan the engine could produce (sgd.cpp's rules), with random sizes, dtypes and alignment.
Case random_case(std::mt19937_64& rng, int index) {
  auto coin = [&](double p) { return std::uniform_real_distribution<double>(0, 1)(rng) < p; };
  auto pick = [&](int n) { return std::uniform_int_distribution<int>(0, n - 1)(rng); };
  Case c;
  const bool finalize = coin(0.06);
  const bool accumulating = coin(0.35);
  const bool update_call = !accumulating || coin(0.5);
  const bool ema = coin(0.4);
  c.has_m = coin(0.7);
  c.has_acc = accumulating;
  c.has_avg = ema || finalize;
  StepScalars& s = c.scalars;
  if (!finalize) {
    s.learning_rate = update_call ? std::uniform_real_distribution<double>(1e-4, 0.5)(rng) : 0.0;
    s.momentum = c.has_m ? (coin(0.5) ? 0.9 : std::uniform_real_distribution<double>(0.0, 1.0)(rng)) : 0.0;
    s.grad_scale = coin(0.3) ? 1.0 / 1024.0 : (coin(0.2) ? 1.0 / 3.0 : 1.0);
    s.window = (accumulating && update_call) ? double(2 + pick(4)) : 1.0;
    s.weight_decay = coin(0.4) ? std::uniform_real_distribution<double>(1e-4, 0.1)(rng) : 0.0;
    s.ema_keep = ema && coin(0.8) ? (coin(0.5) ? 0.99 : std::uniform_real_distribution<double>(0.0, 1.0)(rng)) : 0.0;
    s.merge_window = accumulating && update_call;
    s.reset_accumulator = accumulating && update_call;
    s.ema_overwrite = ema && coin(0.2);
    c.features.momentum = !c.has_m ? MomentumKind::none : (coin(0.5) ? MomentumKind::nesterov : MomentumKind::heavy_ball);
    c.features.merge_window = s.merge_window;
    c.features.ema = ema;
    const int clip = pick(4);  // none, clipvalue, clipnorm, global_clipnorm
    if (clip == 1) s.clip_value = std::uniform_real_distribution<double>(0.01, 2.0)(rng);
    if (update_call && clip >= 2) {
      c.norm_clip = clip == 2 ? NormClip::per_tensor : NormClip::global;
      c.clipnorm = std::uniform_real_distribution<double>(0.05, 50.0)(rng);
    }
    c.features.norm_clip = c.norm_clip != NormClip::none;
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
    ts.decays = coin(0.8);
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

// Builds the case's buffers: random contents, or the contents of `like` (same layout).
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
    Buffer* b = &world.bufs[i * 5];
    const size_t vb = size_t(ts.numel) * size_t(dtype_size(ts.var));
    const size_t sb = size_t(ts.numel) * size_t(dtype_size(ts.slot));
    const bool present[5] = {true, true, c.has_m, c.has_acc, c.has_avg};
    for (int k = 0; k < 5; ++k) {
      if (!present[k]) continue;
      b[k].make(k < 2 ? vb : sb, k < 2 ? ts.misalign_var : ts.misalign_slot);
      if (like) std::memcpy(b[k].p, like->bufs[i * 5 + size_t(k)].p, b[k].bytes);
      else fill(b[k].p, k < 2 ? ts.var : ts.slot, ts.numel, rng, k < 2 ? 0.01 : 0.005);
    }
    PassTask t;
    t.kind = ts.kind;
    t.var_dtype = ts.var;
    t.slot_dtype = ts.slot;
    t.numel = ts.numel;
    t.w = b[0].p;
    t.g = (ts.kind == PassKind::update || ts.kind == PassKind::accumulate) ? b[1].p : nullptr;
    t.m = b[2].p;
    t.acc = b[3].p;
    t.avg = b[4].p;
    t.ts.decays = ts.decays;
    world.plan.tasks.push_back(t);
  }
}

// Runs the CUDA algorithm on the host. `cpu_clip`: fill the clip table from a plan the CPU
// backend has executed (its TensorScalars) instead of running the norm stages.
void run_emulated(World& world, const StepPlan* cpu_clip, std::vector<double>* clip_out = nullptr) {
  gpu::StepLaunches launches;
  launches.build(world.plan);
  std::vector<double> partials(size_t(launches.norm_chunks) + 1), sums(size_t(launches.norm_rows) + 1),
      clip(size_t(2 * launches.clip_rows()), -777.0);
  HostRunner r;
  r.partials = partials.data();
  r.sums = sums.data();
  r.clip = clip.data();
  if (cpu_clip && world.plan.norm_clip != NormClip::none) {
    r.skip_norm = true;
    int row = 0;
    for (const PassTask& t : cpu_clip->tasks) {
      if (t.kind != PassKind::update) continue;
      clip[size_t(2 * row)] = t.ts.clip_mul;
      clip[size_t(2 * row + 1)] = t.ts.clip_div;
      ++row;
      if (world.plan.norm_clip == NormClip::global) break;
    }
  }
  gpu::run_step(launches, r);
  if (clip_out) *clip_out = clip;

  // Packing invariants: every task in exactly one pass launch, chunk tables consistent.
  int64_t tensors = 0;
  for (size_t i = 0; i < launches.pass_count; ++i) {
    const LaunchMeta& m = launches.pass(i).meta;
    CHECK(m.count > 0 && m.count <= gpu::kMaxTensors, "launch with %d tensors", m.count);
    for (int t = 0; t < m.count; ++t)
      CHECK(m.chunk_start[t + 1] - m.chunk_start[t] == gpu::chunks_of(m.tensors[t].numel), "chunk table");
    tensors += m.count;
  }
  CHECK(tensors == int64_t(world.plan.tasks.size()), "packed %lld of %zu tasks", (long long)tensors,
        world.plan.tasks.size());
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

}  // namespace

int main(int argc, char** argv) {
  const int cases = argc > 1 ? std::atoi(argv[1]) : 400;
  const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 20240611u;
  std::mt19937_64 rng(seed);
  auto cpu = detail::make_cpu_backend();
  int clipped = 0, bitwise = 0;
  for (int i = 0; i < cases; ++i) {
    const Case c = random_case(rng, i);
    const uint64_t data_seed = rng();
    World cpu_world, cuda_world;
    make_world(c, data_seed, cpu_world);
    make_world(c, data_seed, cuda_world, &cpu_world);
    cpu->execute(cpu_world.plan);  // writes the clip coefficients into its plan's tasks

    if (c.norm_clip == NormClip::none) {
      run_emulated(cuda_world, nullptr);
      same_bits(c, cpu_world, cuda_world, "element-wise step", i);
      ++bitwise;
      continue;
    }
    ++clipped;
    // 1. Same coefficients -> the same bits.
    World fixed;
    make_world(c, data_seed, fixed, &cuda_world);
    run_emulated(fixed, &cpu_world.plan);
    same_bits(c, cpu_world, fixed, "update with the CPU's clip coefficients", i);
    // 2. The device norm stages: coefficients close to the CPU's, values a few ulp apart.
    World fixed_input;
    make_world(c, data_seed, fixed_input, &cuda_world);  // the inputs, for the repeat below
    std::vector<double> clip;
    run_emulated(cuda_world, nullptr, &clip);
    int row = 0;
    for (const PassTask& t : cpu_world.plan.tasks) {
      if (t.kind != PassKind::update) continue;
      const double mul = clip[size_t(2 * row)], div = clip[size_t(2 * row + 1)];
      auto near = [](double a, double b) {
        return (std::isnan(a) && std::isnan(b)) || a == b || std::fabs(a - b) <= 1e-12 * std::max(std::fabs(a), std::fabs(b));
      };
      CHECK(near(mul, t.ts.clip_mul) && near(div, t.ts.clip_div),
            "case %d (%s): clip row %d: cuda (%.17g, %.17g) cpu (%.17g, %.17g)", i, c.describe().c_str(), row, mul, div,
            t.ts.clip_mul, t.ts.clip_div);
      if (c.norm_clip == NormClip::per_tensor) ++row;
    }
    close_values(c, cpu_world, cuda_world, i);
    // 3. Deterministic: a second run gives the same bits.
    World again;
    make_world(c, data_seed, again, &fixed_input);
    run_emulated(again, nullptr);
    same_bits(c, cuda_world, again, "repeat of a norm-clipped step", i);
  }
  std::printf("%d cases (%d element-wise bit-exact, %d norm-clipped): %s\n", cases, bitwise, clipped,
              failures ? "FAILED" : "ok");
  if (failures) std::printf("%d failure(s)\n", failures);
  return failures ? 1 : 0;
}

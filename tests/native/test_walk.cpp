// (c) The CPU walk of one ISA level against the scalar reference (reference.h), bit for bit.
//
// Usage: test_walk <level>   (x86-64, x86-64-v3, x86-64-v4, neon, generic; "auto" = the best)
// The level is forced through FASTSGD_CPU_ISA before the engine first looks at it (the choice
// is made once per process), so CTest runs this program once per level. A level this CPU
// cannot run exits with 77, which CTest reports as skipped.
//
// The sweep: six storage combinations (float32, float64, float16 and bfloat16 with float32
// slots or slots of their own type) x twenty-one option sets (the Keras convention with and
// without maximize / L2 decay, the torch convention with momentum, dampening, Nesterov, L2 or
// decoupled decay and maximize, skip_nonfinite) x every element count 0..67 (two
// AVX-512 vectors of float16-as-float32 lanes and a tail; some values float16 subnormals) and
// a few counts across 256-element float16 tiles x misalignments of 0, 1, 3, 7
// elements from a 64-byte boundary, four steps each (and finalize_variable_values with EMA).
// Every user buffer (variables, gradients) has sentinel elements before and after it; the
// engine's slot buffers (read through SGD::slot) have their padding up to the next 64 bytes
// checked (the CPU backend allocates slots in whole, zero-filled cache lines).
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <random>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "check.h"
#include "cpu/kernels.h"
#include "fastsgd/fastsgd.h"
#include "fastsgd/math.h"
#include "reference.h"

using namespace fastsgd;

namespace {

constexpr int kMaxCount = 67;
// Longer variables, swept at fewer misalignments: the F16C levels walk float16 in tiles of 256
// elements (cpu/walk.inc), so these cross tile boundaries with every kind of tail.
const int kLongCounts[] = {255, 256, 257, 600};
// The element count of the second variable of a case.
int partner(int count) { return count <= kMaxCount ? kMaxCount - count : 5; }
const int kMisalign[] = {0, 1, 3, 7};
const double kRates[] = {0.1, 0.05, 0.2, 0.01};
constexpr int kSteps = 4;
std::string g_level = "auto";

// A buffer of n elements at `mis` elements past a 64-byte boundary, with sentinels around it.
template <class T>
class Guarded {
 public:
  static constexpr size_t kFront = 64 / sizeof(T);
  static constexpr size_t kBack = 16;

  Guarded(size_t n, size_t mis) : n_(n), mis_(mis) {
    total_ = kFront + mis + n + kBack;
    const size_t bytes = (total_ * sizeof(T) + 63) / 64 * 64;
    base_ = static_cast<unsigned char*>(std::aligned_alloc(64, bytes));
    if (!base_) throw std::bad_alloc();
    std::memset(base_, kSentinel, bytes);
  }
  ~Guarded() { std::free(base_); }
  Guarded(const Guarded&) = delete;
  Guarded& operator=(const Guarded&) = delete;

  T* data() { return reinterpret_cast<T*>(base_) + kFront + mis_; }
  size_t size() const { return n_; }

  // True when no byte outside [data, data + n) changed.
  bool intact() const {
    const size_t begin = (kFront + mis_) * sizeof(T), end = begin + n_ * sizeof(T);
    for (size_t b = 0; b < begin; ++b)
      if (base_[b] != kSentinel) return false;
    for (size_t b = end; b < total_ * sizeof(T); ++b)
      if (base_[b] != kSentinel) return false;
    return true;
  }

 private:
  static constexpr unsigned char kSentinel = 0x5a;
  unsigned char* base_;
  size_t n_, mis_, total_;
};

struct Scenario {
  const char* name;
  Options options;
  bool specials = false;        // inf / NaN / huge gradients in a few places
  int specials_step = -1;       // >= 0: only on this step
  int missing_step = -1;        // on this step variable 1 has no gradient
  bool second_decays = true;
};

std::vector<Scenario> scenarios() {
  std::vector<Scenario> list;
  auto add = [&](const char* name, auto edit) {
    Scenario s;
    s.name = name;
    edit(s);
    list.push_back(s);
  };
  add("plain", [](Scenario&) {});
  add("momentum", [](Scenario& s) { s.options.group.momentum = 0.9; });
  add("nesterov+weight_decay", [](Scenario& s) {
    s.options.group.momentum = 0.9;
    s.options.group.nesterov = true;
    s.options.group.weight_decay = 0.01;
    s.second_decays = false;
  });
  add("clipvalue+loss_scale+specials", [](Scenario& s) {
    s.options.clipvalue = 0.5;
    s.options.loss_scale_factor = 4;
    s.options.group.momentum = 0.5;
    s.specials = true;
  });
  add("clipnorm", [](Scenario& s) {
    s.options.clipnorm = 1.0;
    s.options.group.momentum = 0.9;
  });
  add("global_clipnorm+nesterov", [](Scenario& s) {
    s.options.global_clipnorm = 0.7;
    s.options.group.momentum = 0.8;
    s.options.group.nesterov = true;
  });
  add("ema+overwrite", [](Scenario& s) {
    s.options.use_ema = true;
    s.options.ema_momentum = 0.9;
    s.options.ema_overwrite_frequency = 2;
    s.options.group.momentum = 0.9;
    s.options.group.weight_decay = 0.004;
  });
  add("accumulate2+ema+missing", [](Scenario& s) {
    s.options.gradient_accumulation_steps = 2;
    s.options.use_ema = true;
    s.options.ema_momentum = 0.95;
    s.options.group.momentum = 0.9;
    s.missing_step = 2;
  });
  add("accumulate3+global_clipnorm", [](Scenario& s) {
    s.options.gradient_accumulation_steps = 3;
    s.options.global_clipnorm = 1.0;
    s.options.group.momentum = 0.5;
  });
  add("plain+specials+missing", [](Scenario& s) {
    s.specials = true;
    s.missing_step = 1;
  });
  // Keras order with the 0.2 per-group extras.
  add("keras maximize+l2+momentum", [](Scenario& s) {
    s.options.group.momentum = 0.9;
    s.options.group.weight_decay = 0.02;
    s.options.group.decay_form = DecayForm::l2;
    s.options.group.maximize = true;
    s.second_decays = false;
  });
  add("keras maximize+nesterov+decoupled", [](Scenario& s) {
    s.options.group.momentum = 0.8;
    s.options.group.nesterov = true;
    s.options.group.weight_decay = 0.01;
    s.options.group.maximize = true;
  });
  // torch.optim.SGD's rule (L2 decay by default, b = g on a slot's first step).
  add("torch plain+l2", [](Scenario& s) {
    s.options.convention = Convention::torch;
    s.options.group.weight_decay = 0.01;
    s.second_decays = false;
  });
  add("torch momentum", [](Scenario& s) {
    s.options.convention = Convention::torch;
    s.options.group.momentum = 0.9;
  });
  add("torch momentum+dampening+l2+maximize", [](Scenario& s) {
    s.options.convention = Convention::torch;
    s.options.group.momentum = 0.9;
    s.options.group.dampening = 0.3;
    s.options.group.weight_decay = 0.02;
    s.options.group.maximize = true;
  });
  add("torch nesterov+l2", [](Scenario& s) {
    s.options.convention = Convention::torch;
    s.options.group.momentum = 0.8;
    s.options.group.nesterov = true;
    s.options.group.weight_decay = 0.01;
    s.second_decays = false;
  });
  add("torch nesterov+maximize+clipvalue+loss_scale+specials", [](Scenario& s) {
    s.options.convention = Convention::torch;
    s.options.group.momentum = 0.7;
    s.options.group.nesterov = true;
    s.options.group.maximize = true;
    s.options.clipvalue = 0.5;
    s.options.loss_scale_factor = 4;
    s.specials = true;
  });
  add("torch momentum+decoupled+global_clipnorm", [](Scenario& s) {
    s.options.convention = Convention::torch;
    s.options.group.momentum = 0.9;
    s.options.group.weight_decay = 0.05;
    s.options.group.decay_form = DecayForm::decoupled;
    s.options.global_clipnorm = 0.7;
  });
  // The first update of variable 1 has no gradient: its buffer starts (b = g) one window later.
  add("torch accumulate2+clipnorm+ema+missing", [](Scenario& s) {
    s.options.convention = Convention::torch;
    s.options.group.momentum = 0.9;
    s.options.group.dampening = 0.1;
    s.options.gradient_accumulation_steps = 2;
    s.options.clipnorm = 1.0;
    s.options.use_ema = true;
    s.options.ema_momentum = 0.9;
    s.missing_step = 1;
  });
  // skip_nonfinite: the step with Inf/NaN gradients changes nothing, the others go on.
  add("skip_nonfinite+ema+momentum", [](Scenario& s) {
    s.options.skip_nonfinite = true;
    s.options.group.momentum = 0.9;
    s.options.use_ema = true;
    s.options.ema_overwrite_frequency = 2;
    s.specials = true;
    s.specials_step = 1;
  });
  add("torch skip_nonfinite+accumulate2+loss_scale", [](Scenario& s) {
    s.options.convention = Convention::torch;
    s.options.skip_nonfinite = true;
    s.options.group.momentum = 0.9;
    s.options.gradient_accumulation_steps = 2;
    s.options.loss_scale_factor = 8;
    s.specials = true;
    s.specials_step = 0;
  });
  return list;
}

template <class T>
T from_double(double v) {
  T out{};
  store(out, typename compute_type<T>::type(v));
  return out;
}

// The engine's side of one variable: guarded user buffers for the variable and its gradient.
template <class W>
struct Side {
  Guarded<W> w, g;
  Side(size_t n, size_t mis) : w(n, mis), g(n, (mis + 3) % 8) {}
};

struct Case {
  const Scenario* sc;
  int count, mis, step;
  const char* w_type;
  const char* s_type;
  std::string where() const {
    return check::format("[%s] %s W=%s S=%s count=%d misalign=%d step=%d", g_level.c_str(), sc->name,
                         w_type, s_type, count, mis, step);
  }
};

template <class S>
bool slot_ok(const SGD& sgd, SlotKind kind, size_t i, const std::vector<S>& expected,
             const Case& c, const char* what) {
  if (expected.empty()) return true;
  const TensorView v = sgd.slot(kind, i);
  if (!CHECK_MSG(v.numel == int64_t(expected.size()) && (v.numel == 0 || v.data),
                 "%s: %s slot of variable %zu missing", c.where().c_str(), what, i))
    return false;
  const S* p = static_cast<const S*>(v.data);
  for (size_t e = 0; e < expected.size(); ++e)
    if (!ref::same(p[e], expected[e]))
      return CHECK_MSG(false, "%s: %s[%zu][%zu] = %.9g, reference %.9g", c.where().c_str(), what, i,
                       e, load<double>(p[e]), load<double>(expected[e]));
  const size_t nbytes = expected.size() * sizeof(S);
  const auto* bytes = static_cast<const unsigned char*>(v.data);
  if (nbytes > 0)
    for (size_t b = nbytes; b < (nbytes + 63) / 64 * 64; ++b)
      if (bytes[b] != 0)
        return CHECK_MSG(false, "%s: %s slot %zu written past its end (byte %zu)", c.where().c_str(),
                         what, i, b);
  return true;
}

template <class W, class S>
bool compare(const SGD& sgd, std::vector<Side<W>*>& sides, ref::SGD& r, const Case& c) {
  for (size_t i = 0; i < sides.size(); ++i) {
    auto& rv = static_cast<ref::TypedVar<W, S>&>(*r.vars[i]);
    const W* w = sides[i]->w.data();
    for (size_t e = 0; e < rv.w.size(); ++e)
      if (!ref::same(w[e], rv.w[e]))
        return CHECK_MSG(false, "%s: variable[%zu][%zu] = %.9g, reference %.9g", c.where().c_str(), i,
                         e, load<double>(w[e]), load<double>(rv.w[e]));
    if (!CHECK_MSG(sides[i]->w.intact() && sides[i]->g.intact(), "%s: sentinel around variable or "
                   "gradient %zu overwritten", c.where().c_str(), i))
      return false;
    if (!slot_ok(sgd, SlotKind::momentum, i, rv.m, c, "momentum") ||
        !slot_ok(sgd, SlotKind::average, i, rv.avg, c, "average") ||
        !slot_ok(sgd, SlotKind::accumulator, i, rv.acc, c, "accumulator"))
      return false;
  }
  return CHECK_MSG(sgd.raw_iterations() == r.raw && sgd.skipped_steps() == r.skipped,
                   "%s: raw_iterations %lld (reference %lld), skipped_steps %lld (reference %lld)",
                   c.where().c_str(), (long long)sgd.raw_iterations(), (long long)r.raw,
                   (long long)sgd.skipped_steps(), (long long)r.skipped);
}

template <class W, class S>
void run_case(const Scenario& sc, int count, int mis, std::mt19937& rng) {
  Options o = sc.options;
  o.slots_in_variable_dtype = std::is_same<W, S>::value;
  const int counts[2] = {count, partner(count)};
  const int misal[2] = {mis, (mis * 3 + 1) % 8};
  Side<W> s0{size_t(counts[0]), size_t(misal[0])};
  Side<W> s1{size_t(counts[1]), size_t(misal[1])};
  std::vector<Side<W>*> sides = {&s0, &s1};
  ref::SGD r(o);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::uniform_real_distribution<double> uniform(-2.0, 2.0);
  std::vector<TensorView> views, grads;
  for (int i = 0; i < 2; ++i) {
    auto& rv = r.add<W, S>(counts[i]);
    rv.decays = i == 0 || sc.second_decays;
    // Every 13th value tiny: a float16 subnormal.
    for (int e = 0; e < counts[i]; ++e)
      rv.w[size_t(e)] = from_double<W>(uniform(rng) * (e % 13 == 7 ? 1e-5 : 1.0));
    if (counts[i]) std::memcpy(sides[size_t(i)]->w.data(), rv.w.data(), size_t(counts[i]) * sizeof(W));
    views.push_back({sides[size_t(i)]->w.data(), counts[i], ref::dtype_of<W>::value});
  }
  SGD sgd(o);
  sgd.build(views, {true, sc.second_decays});

  Case c{&sc, count, mis, -1, ref::type_name<W>(), ref::type_name<S>()};
  for (int step = 0; step < kSteps; ++step) {
    c.step = step;
    grads.clear();
    for (size_t i = 0; i < 2; ++i) {
      auto& rv = static_cast<ref::TypedVar<W, S>&>(*r.vars[i]);
      rv.has_grad = !(i == 1 && step == sc.missing_step);
      for (size_t e = 0; e < rv.g.size(); ++e) {
        double v = normal(rng) * (step + 1) * (e % 17 == 3 ? 1e-6 : 1.0);
        if (sc.specials && (sc.specials_step < 0 || sc.specials_step == step) && e % 11 == 5) {
          const double specials[] = {INFINITY, -INFINITY, NAN, 1e5, -1e38};
          v = specials[(e / 11 + size_t(step)) % 5];
        }
        rv.g[e] = from_double<W>(v);
      }
      if (!rv.g.empty()) std::memcpy(sides[i]->g.data(), rv.g.data(), rv.g.size() * sizeof(W));
      grads.push_back(rv.has_grad ? TensorView{sides[i]->g.data(), counts[i], ref::dtype_of<W>::value}
                                  : TensorView{});
    }
    const StepResult got = sgd.step(views, grads, kRates[step]);
    const bool stepped = r.step(kRates[step]);
    CHECK_MSG(got.skipped == !stepped, "%s: skipped=%d, reference skipped=%d", c.where().c_str(),
              int(got.skipped), int(!stepped));
    if (!compare<W, S>(sgd, sides, r, c)) return;
  }
  c.step = kSteps;
  sgd.finalize_variable_values(views);
  r.finalize();
  compare<W, S>(sgd, sides, r, c);
  CHECK(sgd.iterations() == r.iterations());
}

template <class W, class S>
void sweep(const std::vector<Scenario>& list) {
  std::mt19937 rng(20240601);
  const int before = check::failures();
  for (const Scenario& sc : list) {
    for (int count = 0; count <= kMaxCount; ++count)
      for (int mis : kMisalign) run_case<W, S>(sc, count, mis, rng);
    for (int count : kLongCounts)
      for (int mis : {0, 3}) run_case<W, S>(sc, count, mis, rng);
  }
  std::printf("  W=%-8s S=%-8s %s\n", ref::type_name<W>(), ref::type_name<S>(),
              check::failures() == before ? "ok" : "FAILED");
}

// ---- low-precision storage forms ---------------------------------------------------------------
//
// 16-bit variables with a float32 master, a remainder, stochastic rounding, or both, against a
// float32 engine run in lockstep on the widened values (its walk is checked against the reference
// above): the master (or the remainder joined with the variable) must be the float32 run's
// variable bit for bit, and the stored variable its rounding with math.h's random bits. Without a
// master, the float32 run restarts each step from the widened 16-bit variable.
struct LowpScenario {
  const char* name;
  Options options;
};

std::vector<LowpScenario> lowp_scenarios() {
  std::vector<LowpScenario> list;
  for (int form = 0; form < 3; ++form)
    for (int sr = 0; sr < 2; ++sr)
      for (int rule = 0; rule < 4; ++rule) {
        if (form == 0 && !sr) continue;
        LowpScenario sc;
        Options& o = sc.options;
        if (form == 1) o.master_weights = MasterForm::float32;
        if (form == 2) o.master_weights = MasterForm::remainder;
        o.stochastic_rounding = sr != 0;
        o.seed = 0x5eed + uint64_t(rule);
        if (rule == 0) {
          o.group.momentum = 0.9;
          o.group.weight_decay = 0.01;
        } else if (rule == 1) {
          o.convention = Convention::torch;
          o.group.momentum = 0.8;
          o.group.nesterov = true;
          o.group.weight_decay = 0.02;
        } else if (rule == 2) {
          o.gradient_accumulation_steps = 2;
          o.clipvalue = 0.5;
        } else {
          o.group.momentum = 0.9;  // no decay, no gradient transform: the bare kernels
          o.group.nesterov = true;
        }
        static const char* names[3][2][4] = {
            {{"", "", "", ""}, {"sr keras", "sr torch", "sr accumulate2", "sr bare"}},
            {{"master keras", "master torch", "master accumulate2", "master bare"},
             {"master+sr keras", "master+sr torch", "master+sr accumulate2", "master+sr bare"}},
            {{"remainder keras", "remainder torch", "remainder accumulate2", "remainder bare"},
             {"remainder+sr keras", "remainder+sr torch", "remainder+sr accumulate2", "remainder+sr bare"}}};
        sc.name = names[form][sr][rule];
        list.push_back(sc);
      }
  return list;
}

template <class W>
void run_lowp_case(const LowpScenario& sc, int count, int mis, std::mt19937& rng) {
  const Options& o = sc.options;
  const bool remainder = o.master_weights == MasterForm::remainder;
  const bool master = o.master_weights == MasterForm::float32;
  const int counts[2] = {count, partner(count)};
  Guarded<W> w0{size_t(counts[0]), size_t(mis)}, w1{size_t(counts[1]), size_t((mis * 3 + 1) % 8)};
  Guarded<W> g0{size_t(counts[0]), size_t((mis + 3) % 8)}, g1{size_t(counts[1]), size_t(mis)};
  Guarded<W>* ws[2] = {&w0, &w1};
  Guarded<W>* gs[2] = {&g0, &g1};
  std::vector<float> w32[2], g32[2];
  std::uniform_real_distribution<double> uniform(-2.0, 2.0);
  std::normal_distribution<double> normal(0.0, 1.0);
  std::vector<TensorView> views, grads, views32, grads32;
  for (int i = 0; i < 2; ++i) {
    w32[i].resize(size_t(counts[i]));
    g32[i].resize(size_t(counts[i]));
    for (int e = 0; e < counts[i]; ++e) {
      ws[i]->data()[e] = from_double<W>(uniform(rng) * (e % 13 == 7 ? 1e-5 : 1.0));
      w32[i][size_t(e)] = load<float>(ws[i]->data()[e]);
    }
    views.push_back({ws[i]->data(), counts[i], ref::dtype_of<W>::value});
    grads.push_back({gs[i]->data(), counts[i], ref::dtype_of<W>::value});
    views32.push_back({w32[i].data(), counts[i], DType::float32});
    grads32.push_back({g32[i].data(), counts[i], DType::float32});
  }
  Options o32 = o;
  o32.master_weights.reset();
  o32.stochastic_rounding = false;
  SGD sgd(o), sgd32(o32);
  sgd.build(views);
  sgd32.build(views32);
  for (int step = 0; step < kSteps; ++step) {
    const char* where = sc.name;
    for (int i = 0; i < 2; ++i)
      for (int e = 0; e < counts[i]; ++e) {
        gs[i]->data()[e] = from_double<W>(normal(rng) * (step + 1) * (e % 17 == 3 ? 1e-6 : 1.0));
        g32[i][size_t(e)] = load<float>(gs[i]->data()[e]);
        if (!master && !remainder) w32[i][size_t(e)] = load<float>(ws[i]->data()[e]);
      }
    const int64_t raw = sgd.raw_iterations();
    sgd.step(views, grads, kRates[step]);
    sgd32.step(views32, grads32, kRates[step]);
    for (int i = 0; i < 2; ++i) {
      const W* wv = ws[i]->data();
      if (!CHECK_MSG(ws[i]->intact() && gs[i]->intact(), "[%s] lowp %s W=%s count=%d mis=%d: sentinel overwritten",
                     g_level.c_str(), where, ref::type_name<W>(), count, mis))
        return;
      const TensorView slot = sgd.slot(remainder ? SlotKind::remainder : SlotKind::master, size_t(i));
      const uint64_t stream = math::random_stream(o.seed, remainder ? math::kStepless : uint64_t(raw), uint64_t(i));
      for (int e = 0; e < counts[i]; ++e) {
        const float x = w32[i][size_t(e)];
        const uint32_t u = bits::float_bits(x);
        W expect{};
        if (remainder) {
          const uint16_t lo = static_cast<const uint16_t*>(slot.data)[e];
          if (!CHECK_MSG(lo == (u & 0xffffu), "[%s] lowp %s count=%d mis=%d step=%d: remainder[%d][%d] = %04x, "
                         "float32 run %08x", g_level.c_str(), where, count, mis, step, i, e, lo, u))
            return;
          expect.bits = math::bf16_round_bits(u, o.stochastic_rounding ? math::random16_salted(math::segment_key(stream, e), uint32_t(e), lo) : 0x8000u);
        } else {
          if (master && !CHECK_MSG(bits::float_bits(static_cast<const float*>(slot.data)[e]) == u,
                                   "[%s] lowp %s count=%d mis=%d step=%d: master[%d][%d] differs from the float32 run",
                                   g_level.c_str(), where, count, mis, step, i, e))
            return;
          // An accumulation call (window 2, even raw step) writes no variable.
          const bool wrote = !o.gradient_accumulation_steps || raw % 2 == 1;
          if (!wrote) expect = wv[e];
          else if (o.stochastic_rounding) math::store_rounded<true>(expect, x, math::random16(math::segment_key(stream, e), uint32_t(e)));
          else store(expect, x);
        }
        if (!CHECK_MSG(ref::same(wv[e], expect), "[%s] lowp %s W=%s count=%d mis=%d step=%d: variable[%d][%d] = %.9g, "
                       "expected %.9g", g_level.c_str(), where, ref::type_name<W>(), count, mis, step, i, e,
                       load<double>(wv[e]), load<double>(expect)))
          return;
      }
    }
  }
}

template <class W>
void sweep_lowp(const std::vector<LowpScenario>& list) {
  std::mt19937 rng(20240612);
  const int before = check::failures();
  for (const LowpScenario& sc : list) {
    if (std::is_same<W, half_t>::value && sc.options.master_weights == MasterForm::remainder) continue;
    for (int count = 0; count <= kMaxCount; ++count)
      for (int mis : kMisalign) run_lowp_case<W>(sc, count, mis, rng);
    for (int count : kLongCounts)
      for (int mis : {0, 3}) run_lowp_case<W>(sc, count, mis, rng);
  }
  std::printf("  lowp W=%-8s %s\n", ref::type_name<W>(), check::failures() == before ? "ok" : "FAILED");
}

// Random bits across a 2^32-element segment boundary (math::segment_key): the walk keys each
// segment anew. Runs the level's kernel directly on elements [2^32 - 40, 2^32 + 40) of a
// variable whose buffers hold only those 80 elements (the pointers are based so that only
// they are touched), for each stochastic form, against math.h element by element.
const cpu::KernelSet& level_kernels(const std::string& active) {
#if defined(__x86_64__) || defined(_M_X64)
  if (active == "x86-64-v4") return cpu::kernels_x86_64_v4();
  if (active == "x86-64-v3") return cpu::kernels_x86_64_v3();
  return cpu::kernels_x86_64();
#elif defined(__aarch64__)
  (void)active;
  return cpu::kernels_neon();
#else
  (void)active;
  return cpu::kernels_generic();
#endif
}

void check_segment_boundary(const cpu::KernelSet& kernels) {
  constexpr int64_t kFirst = (int64_t(1) << 32) - 40;
  constexpr int kCount = 80;
  std::mt19937 rng(7);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  const int before = check::failures();
  for (int form = 0; form < 3; ++form) {
    std::vector<bfloat16_t> w(kCount), g(kCount), expect(kCount);
    std::vector<float> master(kCount);
    std::vector<uint16_t> rem(kCount);
    for (int e = 0; e < kCount; ++e) {
      master[size_t(e)] = normal(rng);
      w[size_t(e)] = to_bfloat16(master[size_t(e)]);
      rem[size_t(e)] = uint16_t(bits::float_bits(master[size_t(e)]) & 0xffffu);
      g[size_t(e)] = to_bfloat16(normal(rng));
    }
    if (form == 2)  // a consistent (variable, remainder) pair: the variable is the high half rounded
      for (int e = 0; e < kCount; ++e) {
        const uint32_t key = math::segment_key(0x1234, kFirst + e);
        w[size_t(e)].bits = math::bf16_round_bits(bits::float_bits(master[size_t(e)]),
                                                  math::random16_salted(key, uint32_t(kFirst + e), rem[size_t(e)]));
      }
    detail::PassTask t;
    t.var_dtype = DType::bfloat16;
    t.numel = kFirst + kCount;
    t.w = w.data() - kFirst;
    t.g = g.data() - kFirst;
    t.form = form == 0 ? detail::VarForm::plain : (form == 1 ? detail::VarForm::master : detail::VarForm::remainder);
    t.master = form == 1 ? static_cast<void*>(master.data() - kFirst)
                         : (form == 2 ? static_cast<void*>(rem.data() - kFirst) : nullptr);
    t.stochastic = true;
    t.ts.learning_rate = 0.25;
    t.ts.random_stream = 0x1234;
    StepScalars scalars;
    detail::PassFeatures features;
    features.grad_transforms = false;
    for (int e = 0; e < kCount; ++e) {
      const int64_t i = kFirst + e;
      const uint32_t key = math::segment_key(t.ts.random_stream, i);
      const float x = form == 2 ? math::remainder_join<true>(w[size_t(e)], rem[size_t(e)], key, uint32_t(i))
                                : (form == 1 ? master[size_t(e)] : to_float(w[size_t(e)]));
      const float updated = x - 0.25f * to_float(g[size_t(e)]);
      const uint32_t u = bits::float_bits(updated);
      const uint32_t r = form == 2 ? math::random16_salted(key, uint32_t(i), u & 0xffffu) : math::random16(key, uint32_t(i));
      expect[size_t(e)].bits = math::bf16_round_bits(u, r);
    }
    kernels.select_pass(t, features)(t, scalars, kFirst, kFirst + kCount);
    for (int e = 0; e < kCount; ++e)
      if (!CHECK_MSG(w[size_t(e)].bits == expect[size_t(e)].bits,
                     "[%s] segment boundary form=%d element 2^32%+d: %04x, expected %04x", g_level.c_str(), form,
                     e - 40, w[size_t(e)].bits, expect[size_t(e)].bits))
        break;
  }
  std::printf("  lowp segment boundary %s\n", check::failures() == before ? "ok" : "FAILED");
}

}  // namespace

int main(int argc, char** argv) {
  const std::string level = argc > 1 ? argv[1] : "auto";
  g_level = level;
  if (level != "auto") setenv("FASTSGD_CPU_ISA", level.c_str(), 1);
  CpuInfo info;
  try {
    info = cpu_info();  // the first look: fixes the level for this process
  } catch (const std::runtime_error& e) {
    if (std::string(e.what()).find("does not support") != std::string::npos) {
      std::printf("SKIP: %s\n", e.what());
      return check::kSkip;
    }
    std::printf("FAIL: %s\n", e.what());
    return 1;
  }
  std::printf("ISA level in use: %s (available:", info.active.c_str());
  for (const auto& a : info.available) std::printf(" %s", a.c_str());
  std::printf(")\n");
  if (level != "auto") CHECK_MSG(info.active == level, "asked for %s, got %s", level.c_str(), info.active.c_str());

  const std::vector<Scenario> list = scenarios();
  sweep<float, float>(list);
  sweep<double, double>(list);
  sweep<half_t, float>(list);
  sweep<half_t, half_t>(list);
  sweep<bfloat16_t, float>(list);
  sweep<bfloat16_t, bfloat16_t>(list);
  const std::vector<LowpScenario> lowp = lowp_scenarios();
  sweep_lowp<bfloat16_t>(lowp);
  sweep_lowp<half_t>(lowp);
  check_segment_boundary(level_kernels(info.active));
  return check::finish(("test_walk " + level).c_str());
}

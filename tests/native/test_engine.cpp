// (d) fastsgd::SGD against Keras's worked numbers, (e) its all-or-nothing error contract, and
// (g) the 0.2 engine: parameter groups, the torch convention's first step, caller-owned slots,
// skip_nonfinite / found_inf, two-phase (external) norms, validation wording.
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "check.h"
#include "fastsgd/fastsgd.h"

using namespace fastsgd;

namespace {

TensorView view(std::vector<float>& v) { return {v.data(), int64_t(v.size()), DType::float32}; }
TensorView view(std::vector<double>& v) { return {v.data(), int64_t(v.size()), DType::float64}; }

// ---- (d) known values -------------------------------------------------------------------------

void keras_plain() {
  // keras.optimizers.SGD(0.1): w = 1 - 0.1 * 1 = 0.9 (float32)
  std::vector<float> w{1.0f}, g{1.0f};
  SGD sgd(Options{});
  sgd.build({view(w)});
  sgd.step({view(w)}, {view(g)}, 0.1);
  CHECK_BITS(w[0], 0.9f);
  CHECK_BITS(w[0], 1.0f - 0.1f * 1.0f);
  CHECK(sgd.iterations() == 1 && sgd.raw_iterations() == 1);
  CHECK(!sgd.has_slot(SlotKind::momentum));
}

void keras_momentum() {
  // SGD(0.1, momentum=0.9) on loss = w^2 / 2 (g = w), from w = 1:
  //   m = 0.9 * 0 - 0.1 * 1 = -0.1        w = 1 + m = 0.9        (a step of 0.1)
  //   m = 0.9 * -0.1 - 0.1 * 0.9 = -0.18  w = 0.9 + m = 0.72     (a step of 0.18)
  Options o;
  o.group.momentum = 0.9;
  std::vector<float> w{1.0f}, g{0.0f};
  SGD sgd(o);
  sgd.build({view(w)});
  g[0] = w[0];
  sgd.step({view(w)}, {view(g)}, 0.1);
  float m = 0.9f * 0.0f - 0.1f * 1.0f;
  float expected = 1.0f + m;
  CHECK_BITS(w[0], expected);
  CHECK_NEAR(w[0], 0.9, 1e-7);
  float slot = 0;
  sgd.read_slot(SlotKind::momentum, 0, &slot);
  CHECK_BITS(slot, m);
  g[0] = w[0];
  sgd.step({view(w)}, {view(g)}, 0.1);
  m = 0.9f * m - 0.1f * expected;
  expected = expected + m;
  CHECK_BITS(w[0], expected);
  CHECK_NEAR(-m, 0.18, 1e-7);
  CHECK_NEAR(w[0], 0.72, 1e-7);
}

void keras_nesterov() {
  // SGD(0.1, momentum=0.9, nesterov=True), w = 1, g = 1:
  //   m = -0.1 ; w = (1 - 0.1 * 1) + 0.9 * -0.1 = 0.81
  Options o;
  o.group.momentum = 0.9;
  o.group.nesterov = true;
  std::vector<float> w{1.0f}, g{1.0f};
  SGD sgd(o);
  sgd.build({view(w)});
  sgd.step({view(w)}, {view(g)}, 0.1);
  const float m = 0.9f * 0.0f - 0.1f * 1.0f;
  CHECK_BITS(w[0], (1.0f - 0.1f * 1.0f) + 0.9f * m);
  CHECK_NEAR(w[0], 0.81, 1e-7);
}

void keras_weight_decay() {
  // SGD(1.0, weight_decay=0.004), w = 2, g = 0: w = 2 * (1 - 0.004 * 1) - 1 * 0 = 1.992
  Options o;
  o.group.weight_decay = 0.004;
  std::vector<float> w{2.0f}, g{0.0f};
  SGD sgd(o);
  sgd.build({view(w)});
  sgd.step({view(w)}, {view(g)}, 1.0);
  CHECK_BITS(w[0], 2.0f * (1.0f - 0.004f * 1.0f) - 1.0f * 0.0f);
  CHECK_NEAR(w[0], 1.992, 1e-6);

  // A variable excluded from decay keeps its value.
  std::vector<float> a{2.0f}, b{2.0f}, ga{0.0f}, gb{0.0f};
  SGD sgd2(o);
  sgd2.build({view(a), view(b)}, {true, false});
  sgd2.step({view(a), view(b)}, {view(ga), view(gb)}, 1.0);
  CHECK_NEAR(a[0], 1.992, 1e-6);
  CHECK_BITS(b[0], 2.0f);
  sgd2.set_decays(1, true);
  sgd2.step({view(a), view(b)}, {view(ga), view(gb)}, 1.0);
  CHECK_NEAR(b[0], 1.992, 1e-6);
}

void keras_ema() {
  // SGD(1.0, use_ema=True, ema_momentum=0.9, ema_overwrite_frequency=3), v = [[3,4],[5,6]],
  // g = 1 each step:
  //   step 1: v = 2 ; avg = v (first step)           = 2
  //   step 2: v = 1 ; avg = 0.9 * 2 + 0.1 * 1        = 1.9
  //   step 3: v = 0 ; avg = 0.9 * 1.9 + 0.1 * 0      = 1.71 ; third step: v = avg
  // -> [[1.71, 2.71], [3.71, 4.71]]
  Options o;
  o.use_ema = true;
  o.ema_momentum = 0.9;
  o.ema_overwrite_frequency = 3;
  std::vector<float> v{3, 4, 5, 6}, g{1, 1, 1, 1};
  SGD sgd(o);
  sgd.build({view(v)});
  CHECK(sgd.has_slot(SlotKind::average));
  for (int i = 0; i < 2; ++i) sgd.step({view(v)}, {view(g)}, 1.0);
  CHECK_BITS(v[0], 1.0f);  // not yet overwritten
  sgd.step({view(v)}, {view(g)}, 1.0);
  const double expected[] = {1.71, 2.71, 3.71, 4.71};
  for (int i = 0; i < 4; ++i) CHECK_NEAR(v[size_t(i)], expected[i], 1e-6);
  std::vector<float> avg(4);
  sgd.read_slot(SlotKind::average, 0, avg.data());
  for (int i = 0; i < 4; ++i) CHECK_BITS(avg[size_t(i)], v[size_t(i)]);

  // finalize_variable_values copies the average in.
  sgd.step({view(v)}, {view(g)}, 1.0);
  sgd.read_slot(SlotKind::average, 0, avg.data());
  CHECK(v[0] != avg[0]);
  sgd.finalize_variable_values({view(v)});
  for (int i = 0; i < 4; ++i) CHECK_BITS(v[size_t(i)], avg[size_t(i)]);
}

void keras_accumulation() {
  // SGD(1.0, gradient_accumulation_steps=3), w = 1, g = 1:
  //   calls 1 and 2 only accumulate (w unchanged), call 3 applies the mean (1+1+1)/3: w = 0
  Options o;
  o.gradient_accumulation_steps = 3;
  std::vector<float> w{1.0f, 5.0f}, g{1.0f, 1.0f};
  SGD sgd(o);
  sgd.build({view(w)});
  CHECK(!sgd.update_is_due());
  sgd.step({view(w)}, {view(g)}, 1.0);
  CHECK_BITS(w[0], 1.0f);
  CHECK(!sgd.update_is_due());
  sgd.step({view(w)}, {view(g)}, 1.0);
  CHECK_BITS(w[1], 5.0f);
  CHECK(sgd.update_is_due());
  CHECK(sgd.next_step_touches_all());
  std::vector<float> acc(2);
  sgd.read_slot(SlotKind::accumulator, 0, acc.data());
  CHECK_BITS(acc[0], 2.0f);
  sgd.step({view(w)}, {view(g)}, 1.0);
  CHECK_BITS(w[0], 0.0f);
  CHECK_BITS(w[1], 4.0f);
  sgd.read_slot(SlotKind::accumulator, 0, acc.data());
  CHECK_BITS(acc[0], 0.0f);
  CHECK(sgd.raw_iterations() == 3);
  CHECK(sgd.iterations() == 1);
}

void keras_clipping_and_scale() {
  // clipnorm=1: g = [3, 4] (norm 5) -> [0.6, 0.8]; lr 1: w = 0 - g
  Options o;
  o.clipnorm = 1.0;
  std::vector<double> w{0, 0}, g{3, 4};
  SGD a(o);
  a.build({view(w)});
  a.step({view(w)}, {view(g)}, 1.0);
  CHECK_NEAR(w[0], -0.6, 1e-15);
  CHECK_NEAR(w[1], -0.8, 1e-15);
  // global_clipnorm=1 over two tensors [3] and [4]: the same scale 1/5 for both
  Options og;
  og.global_clipnorm = 1.0;
  std::vector<double> w1{0}, w2{0}, g1{3}, g2{4};
  SGD b(og);
  b.build({view(w1), view(w2)});
  b.step({view(w1), view(w2)}, {view(g1), view(g2)}, 1.0);
  CHECK_NEAR(w1[0], -0.6, 1e-15);
  CHECK_NEAR(w2[0], -0.8, 1e-15);
  // clipvalue=0.5: g = [3, -0.25] -> [0.5, -0.25]
  Options ov;
  ov.clipvalue = 0.5;
  std::vector<double> w3{0, 0}, g3{3, -0.25};
  SGD c(ov);
  c.build({view(w3)});
  c.step({view(w3)}, {view(g3)}, 1.0);
  CHECK_BITS(w3[0], -0.5);
  CHECK_BITS(w3[1], 0.25);
  // loss_scale_factor=4: g = 2 / 4 = 0.5
  Options ol;
  ol.loss_scale_factor = 4;
  std::vector<double> w4{1}, g4{2};
  SGD d(ol);
  d.build({view(w4)});
  d.step({view(w4)}, {view(g4)}, 1.0);
  CHECK_BITS(w4[0], 0.5);
}

void slots_in_16_bit() {
  // float16 variables keep float32 slots unless asked otherwise.
  std::vector<half_t> w(3, to_half(1.0f)), g(3, to_half(1.0f));
  Options o;
  o.group.momentum = 0.5;
  SGD a(o);
  a.build({{w.data(), 3, DType::float16}});
  CHECK(a.slot(SlotKind::momentum, 0).dtype == DType::float32);
  a.step({{w.data(), 3, DType::float16}}, {{g.data(), 3, DType::float16}}, 0.25);
  CHECK_BITS(w[0].bits, to_half(0.75f).bits);
  o.slots_in_variable_dtype = true;
  SGD b(o);
  b.build({{w.data(), 3, DType::float16}});
  CHECK(b.slot(SlotKind::momentum, 0).dtype == DType::float16);
  CHECK(b.slot(SlotKind::average, 0).data == nullptr);
  CHECK(b.slot(SlotKind::average, 0).numel == 0);
}

void state_round_trip() {
  // write_slot / set_raw_iterations restore a checkpoint: a resumed optimizer continues bit
  // for bit like one that never stopped.
  Options o;
  o.group.momentum = 0.9;
  o.use_ema = true;
  std::vector<float> w1{1, 2, 3}, w2{1, 2, 3}, g{0.5f, -1, 2};
  SGD a(o), b(o);
  a.build({view(w1)});
  b.build({view(w2)});
  a.step({view(w1)}, {view(g)}, 0.1);
  a.step({view(w1)}, {view(g)}, 0.1);
  std::vector<float> m(3), avg(3);
  a.read_slot(SlotKind::momentum, 0, m.data());
  a.read_slot(SlotKind::average, 0, avg.data());
  w2 = w1;
  b.write_slot(SlotKind::momentum, 0, m.data());
  b.write_slot(SlotKind::average, 0, avg.data());
  b.set_raw_iterations(a.raw_iterations());
  a.step({view(w1)}, {view(g)}, 0.1);
  b.step({view(w2)}, {view(g)}, 0.1);
  for (size_t i = 0; i < 3; ++i) CHECK_BITS(w1[i], w2[i]);
  CHECK_THROWS(ValueError, b.set_raw_iterations(-1));
  CHECK_THROWS(ValueError, b.read_slot(SlotKind::accumulator, 0, m.data()));
}

// ---- (e) errors -------------------------------------------------------------------------------

struct Snapshot {
  std::vector<float> w0, w1, m0, m1, avg0, avg1;
  int64_t raw;
  bool operator==(const Snapshot& o) const {
    auto same = [](const std::vector<float>& a, const std::vector<float>& b) {
      return a.size() == b.size() && std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0;
    };
    return same(w0, o.w0) && same(w1, o.w1) && same(m0, o.m0) && same(m1, o.m1) &&
           same(avg0, o.avg0) && same(avg1, o.avg1) && raw == o.raw;
  }
};

Snapshot snapshot(const SGD& sgd, const std::vector<float>& a, const std::vector<float>& b) {
  Snapshot s;
  s.w0 = a;
  s.w1 = b;
  s.m0.resize(a.size());
  s.avg0.resize(a.size());
  s.m1.resize(b.size());
  s.avg1.resize(b.size());
  sgd.read_slot(SlotKind::momentum, 0, s.m0.data());
  sgd.read_slot(SlotKind::momentum, 1, s.m1.data());
  sgd.read_slot(SlotKind::average, 0, s.avg0.data());
  sgd.read_slot(SlotKind::average, 1, s.avg1.data());
  s.raw = sgd.raw_iterations();
  return s;
}

void all_or_nothing() {
  Options o;
  o.group.momentum = 0.9;
  o.use_ema = true;
  std::vector<float> a(16, 1.0f), b(8, 2.0f), ga(16, 0.5f), gb(8, -0.25f);
  std::vector<float> big(9, 0.0f);
  std::vector<double> gd(8, 1.0);
  SGD sgd(o);
  // A twin that sees only the valid steps: the failed ones must not leave any trace.
  std::vector<float> ta = a, tb = b;
  SGD twin(o);
  sgd.build({view(a), view(b)});
  twin.build({view(ta), view(tb)});
  sgd.step({view(a), view(b)}, {view(ga), view(gb)}, 0.1);
  twin.step({view(ta), view(tb)}, {view(ga), view(gb)}, 0.1);
  const Snapshot before = snapshot(sgd, a, b);

  // Wrong size (the second gradient: the first variable would be written first).
  CHECK_THROWS(ValueError, sgd.step({view(a), view(b)}, {view(ga), view(big)}, 0.1));
  CHECK(snapshot(sgd, a, b) == before);
  // Wrong dtype.
  CHECK_THROWS(TypeError, sgd.step({view(a), view(b)}, {view(ga), view(gd)}, 0.1));
  CHECK(snapshot(sgd, a, b) == before);
  // Gradient aliasing its own variable, or another variable.
  CHECK_THROWS(ValueError, sgd.step({view(a), view(b)}, {view(ga), view(b)}, 0.1));
  CHECK(snapshot(sgd, a, b) == before);
  TensorView inside_a{a.data() + 4, 8, DType::float32};  // overlaps variable 0
  CHECK_THROWS(ValueError, sgd.step({view(a), view(b)}, {view(ga), inside_a}, 0.1));
  CHECK(snapshot(sgd, a, b) == before);
  TensorView a_as_b{a.data(), 8, DType::float32};  // two variables sharing memory
  CHECK_THROWS(ValueError, sgd.step({view(a), a_as_b}, {view(ga), view(gb)}, 0.1));
  CHECK(snapshot(sgd, a, b) == before);
  // Wrong counts, no gradients at all, missing data, wrong device.
  CHECK_THROWS(ValueError, sgd.step({view(a)}, {view(ga)}, 0.1));
  CHECK_THROWS(ValueError, sgd.step({view(a), view(b)}, {TensorView{}, TensorView{}}, 0.1));
  CHECK_THROWS(ValueError, sgd.step({view(a), TensorView{nullptr, 8, DType::float32}},
                                    {view(ga), view(gb)}, 0.1));
  TensorView on_gpu = view(gb);
  on_gpu.device = Device{DeviceKind::cuda, 0};
  CHECK_THROWS(ValueError, sgd.step({view(a), view(b)}, {view(ga), on_gpu}, 0.1));
  // With EMA every variable is read, so a variable without a gradient must still be valid.
  CHECK_THROWS(ValueError, sgd.step({view(a), TensorView{}}, {view(ga), TensorView{}}, 0.1));
  CHECK(snapshot(sgd, a, b) == before);

  // The optimizer still works, exactly as if the failed calls never happened.
  sgd.step({view(a), view(b)}, {view(ga), view(gb)}, 0.1);
  twin.step({view(ta), view(tb)}, {view(ga), view(gb)}, 0.1);
  CHECK(std::memcmp(a.data(), ta.data(), a.size() * 4) == 0);
  CHECK(std::memcmp(b.data(), tb.data(), b.size() * 4) == 0);
  CHECK(sgd.raw_iterations() == 2);

  // Gradients may share memory with one another (they are only read).
  std::vector<float> shared(8, 1.0f);
  TensorView g_shared{shared.data(), 8, DType::float32};
  std::vector<float> c(8, 0.0f), d(8, 0.0f);
  SGD plain(Options{});
  plain.build({view(c), view(d)});
  CHECK_NOTHROW(plain.step({view(c), view(d)}, {g_shared, g_shared}, 1.0));
  CHECK_BITS(c[7], -1.0f);
  CHECK_BITS(d[0], -1.0f);
  // Without EMA, a variable without a gradient may be an empty view.
  CHECK_NOTHROW(plain.step({view(c), TensorView{}}, {g_shared, TensorView{}}, 1.0));
  CHECK_BITS(c[0], -2.0f);
  CHECK_BITS(d[0], -1.0f);
}

void build_and_option_errors() {
  auto bad = [](void (*edit)(Options&)) {
    Options o;
    edit(o);
    SGD s(o);
  };
  CHECK_THROWS(ValueError, bad([](Options& o) { o.group.momentum = 1.5; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.group.momentum = -0.1; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.group.momentum = std::nan(""); }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.clipnorm = 1; o.clipvalue = 1; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.gradient_accumulation_steps = 1; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.group.weight_decay = INFINITY; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.use_ema = true; o.ema_momentum = 2; }));
  CHECK_NOTHROW(bad([](Options& o) { o.group.momentum = 1.0; o.group.nesterov = true; }));

  std::vector<float> w(8), g(8);
  SGD s(Options{});
  CHECK_THROWS(ValueError, s.step({view(w)}, {view(g)}, 0.1));  // not built
  TensorView half_of_w{w.data() + 4, 4, DType::float32};
  CHECK_THROWS(ValueError, s.build({view(w), half_of_w}));  // overlapping variables
  CHECK(!s.built());
  CHECK_THROWS(ValueError, s.build({view(w)}, {true, false}));  // decays size
  CHECK_THROWS(TypeError, s.build({TensorView{w.data(), 8, DType(7)}}));
  CHECK_THROWS(ValueError, s.build({TensorView{nullptr, 8, DType::float32}}));
  s.build({view(w)});
  CHECK(s.built() && s.num_variables() == 1);
  CHECK(s.variable_spec(0).numel == 8);
  CHECK_THROWS(ValueError, s.build({view(w)}));  // twice

  // CUDA variables: a clear error in a CPU-only build or without a device.
  const CudaInfo cuda = cuda_info();
  std::printf("cuda_info: built=%d devices=%d status=%s\n", int(cuda.built), cuda.device_count,
              cuda.status.c_str());
  if (cuda.device_count == 0) {
    SGD gpu(Options{});
    TensorView on_gpu{w.data(), 8, DType::float32, Device{DeviceKind::cuda, 0}};
    CHECK_THROWS(ValueError, gpu.build({on_gpu}));
  }
  // No variables at all builds, and a step then has no gradient to apply.
  SGD empty(Options{});
  CHECK_NOTHROW(empty.build({}));
  CHECK_THROWS(ValueError, empty.step(std::vector<TensorView>{}, std::vector<TensorView>{}, 0.1));
}

void cpu_information() {
  const CpuInfo info = cpu_info();
  CHECK(!info.available.empty());
  CHECK(info.threads >= 1);
  bool listed = false;
  for (const auto& a : info.available) listed = listed || a == info.active;
  CHECK_MSG(listed, "active level %s not among the available ones", info.active.c_str());
  set_num_threads(1);
  CHECK(cpu_info().threads == 1);
  set_num_threads(0);
  CHECK(cpu_info().threads == info.threads);
}

// ---- (g) engine 0.2: groups, conventions, caller-owned slots, skipping, external norms -------

// A step request over vectors the test keeps alive.
struct Request {
  std::vector<TensorView> vars, grads, slots[kNumSlotKinds];
  std::vector<uint8_t> fresh;
  StepRequest r;
  StepRequest& get() {
    r.variables = vars.data();
    r.grads = grads.data();
    for (int k = 0; k < kNumSlotKinds; ++k) r.slots[k] = slots[k].empty() ? nullptr : slots[k].data();
    r.fresh_momentum = fresh.empty() ? nullptr : fresh.data();
    return r;
  }
};

bool same_bytes(const std::vector<float>& a, const std::vector<float>& b) {
  return a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);
}

std::vector<float> read(const SGD& sgd, SlotKind kind, size_t i) {
  std::vector<float> out(size_t(sgd.variable_spec(i).numel));
  sgd.read_slot(kind, i, out.data());
  return out;
}

std::vector<float> ramp(size_t n, float start, float step) {
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = start + step * float(i);
  return v;
}

// Two groups in one optimizer step exactly like two single-group optimizers; set_group takes
// effect on the next step; a step's learning_rate replaces every group's.
void parameter_groups(Convention convention) {
  Group ga, gb;
  ga.learning_rate = 0.1;
  ga.momentum = 0.9;
  gb.learning_rate = 0.03;
  gb.momentum = 0.5;
  gb.nesterov = true;
  gb.weight_decay = 0.02;
  if (convention == Convention::torch) ga.dampening = 0.25;
  Options o;
  o.convention = convention;
  o.group = ga;
  Options oa = o, ob = o;
  ob.group = gb;
  std::vector<float> w0 = ramp(37, 1.0f, 0.1f), w1 = ramp(21, -2.0f, 0.3f), w2 = ramp(5, 0.5f, -0.2f);
  std::vector<float> a0 = w0, a2 = w2, b1 = w1;
  SGD sgd(o), a(oa), b(ob);
  CHECK(sgd.add_group(gb) == 1);
  CHECK(sgd.num_groups() == 2);
  sgd.build({view(w0), view(w1), view(w2)}, {}, {0, 1, 0});
  CHECK(sgd.group_of(1) == 1 && sgd.group_of(2) == 0);
  a.build({view(a0), view(a2)});
  b.build({view(b1)});
  auto compare = [&](const char* when) {
    const bool ok = same_bytes(w0, a0) && same_bytes(w2, a2) && same_bytes(w1, b1) &&
                    same_bytes(read(sgd, SlotKind::momentum, 0), read(a, SlotKind::momentum, 0)) &&
                    same_bytes(read(sgd, SlotKind::momentum, 2), read(a, SlotKind::momentum, 1)) &&
                    same_bytes(read(sgd, SlotKind::momentum, 1), read(b, SlotKind::momentum, 0));
    CHECK_MSG(ok, "convention %d, %s: two groups differ from two single-group optimizers", int(convention), when);
  };
  for (int step = 0; step < 6; ++step) {
    std::vector<float> g0 = ramp(37, 0.3f * float(step + 1), -0.01f), g1 = ramp(21, -0.5f, 0.07f * float(step)),
                       g2 = ramp(5, 1.0f, 0.25f);
    if (step == 2) {
      // A scheduler rewrites both groups between steps.
      ga.learning_rate = 0.05;
      ga.momentum = 0.8;
      gb.learning_rate = 0.2;
      gb.weight_decay = 0.0;
      sgd.set_group(0, ga);
      sgd.set_group(1, gb);
      a.set_group(0, ga);
      b.set_group(0, gb);
      CHECK(sgd.group(1).learning_rate == 0.2 && sgd.group(0).momentum == 0.8);
    }
    Request r, ra, rb;
    r.vars = {view(w0), view(w1), view(w2)};
    r.grads = {view(g0), view(g1), view(g2)};
    ra.vars = {view(a0), view(a2)};
    ra.grads = {view(g0), view(g2)};
    rb.vars = {view(b1)};
    rb.grads = {view(g1)};
    if (step == 4) r.get().learning_rate = ra.get().learning_rate = rb.get().learning_rate = 0.07;
    CHECK(sgd.step(r.get()).updated);
    a.step(ra.get());
    b.step(rb.get());
    compare(step < 2 ? "before set_group" : step == 4 ? "learning_rate override" : "after set_group");
  }

  // Refusals leave the groups as they were.
  Group bad = gb;
  bad.momentum = convention == Convention::keras ? 1.5 : -1.0;
  CHECK_THROWS(ValueError, sgd.set_group(1, bad));
  CHECK_THROWS(ValueError, sgd.set_group(2, ga));
  CHECK_THROWS(ValueError, sgd.add_group(bad));
  CHECK_THROWS(ValueError, sgd.group(2));
  CHECK(sgd.num_groups() == 2 && sgd.group(1).momentum == gb.momentum);
  SGD c(o);
  std::vector<float> x(3);
  CHECK_THROWS(ValueError, c.build({view(x)}, {}, {1}));  // group 1 does not exist
  CHECK(!c.built());
  CHECK_THROWS(ValueError, c.build({view(x)}, {}, {0, 0}));
}

// A momentum slot appears the first time any group asks for momentum (set_group from 0).
void momentum_slot_on_demand() {
  std::vector<float> w{1, 2}, g{1, 1}, twin{1, 2};
  SGD sgd(Options{});
  sgd.build({view(w)});
  sgd.step({view(w)}, {view(g)}, 0.5);
  CHECK(!sgd.has_slot(SlotKind::momentum));
  Group m;
  m.momentum = 0.5;
  sgd.set_group(0, m);
  sgd.step({view(w)}, {view(g)}, 0.5);
  CHECK(sgd.has_slot(SlotKind::momentum));
  // w = 0.5 after the plain step; then v = 0.5 * 0 - 0.5 * 1 = -0.5 ; w = 0.5 - 0.5 = 0
  CHECK_BITS(w[0], 0.0f);
  CHECK_BITS(read(sgd, SlotKind::momentum, 0)[0], -0.5f);
}

// torch convention, engine-owned slots: a slot's first update sets b = g (no dampening).
void torch_first_step() {
  Options o;
  o.convention = Convention::torch;
  o.group.learning_rate = 0.5;
  o.group.momentum = 0.75;
  o.group.dampening = 0.5;
  o.gradient_accumulation_steps = 2;
  std::vector<float> w{1.0f, -2.0f}, g{0.5f, 3.0f};
  SGD sgd(o);
  sgd.build({view(w)});
  Request r;
  r.vars = {view(w)};
  r.grads = {view(g)};
  CHECK(!sgd.momentum_started(0));
  sgd.step(r.get());  // accumulates only: the buffer has not started
  CHECK(!sgd.momentum_started(0));
  CHECK_BITS(w[0], 1.0f);
  sgd.step(r.get());  // window mean g = (0.5 + 0.5) / 2 = 0.5: b = g = 0.5 ; w = 1 - 0.5 * 0.5
  CHECK(sgd.momentum_started(0));
  CHECK_BITS(read(sgd, SlotKind::momentum, 0)[0], 0.5f);
  CHECK_BITS(read(sgd, SlotKind::momentum, 0)[1], 3.0f);
  CHECK_BITS(w[0], 0.75f);
  CHECK_BITS(w[1], -3.5f);
  sgd.step(r.get());
  sgd.step(r.get());  // b = 0.5 * 0.5 + 0.75 * 0.5 = 0.625 ; w = 0.75 - 0.5 * 0.625
  CHECK_BITS(read(sgd, SlotKind::momentum, 0)[0], 0.625f);
  CHECK_BITS(w[0], 0.4375f);
  // A restored checkpoint without a buffer starts it again.
  sgd.set_momentum_started(0, false);
  sgd.step(r.get());
  sgd.step(r.get());  // b = g = 0.5 ; w = 0.4375 - 0.25
  CHECK_BITS(read(sgd, SlotKind::momentum, 0)[0], 0.5f);
  CHECK_BITS(w[0], 0.1875f);
  CHECK_THROWS(ValueError, sgd.momentum_started(1));
  CHECK_THROWS(ValueError, sgd.set_momentum_started(1, true));

  // Nesterov, L2 decay (torch's default form) and maximize, worked by hand, w = 2, g = 2:
  //   g = -2 ; g = -2 + 0.5 * 2 = -1 ; b = g = -1 ; u = -1 + 0.5 * -1 = -1.5 ;
  //   w = 2 - 0.25 * -1.5 = 2.375
  Options n;
  n.convention = Convention::torch;
  n.group.learning_rate = 0.25;
  n.group.momentum = 0.5;
  n.group.nesterov = true;
  n.group.weight_decay = 0.5;
  n.group.maximize = true;
  std::vector<float> wn{2.0f}, gn{2.0f};
  SGD s2(n);
  s2.build({view(wn)});
  s2.step({view(wn)}, {view(gn)}, 0.25);
  CHECK_BITS(wn[0], 2.375f);
  CHECK_BITS(read(s2, SlotKind::momentum, 0)[0], -1.0f);
}

// Caller-owned slots: the caller's buffers are the ones written, results equal engine-owned
// slots, and a missing / mistyped / overlapping slot is refused with nothing changed.
void caller_owned_slots(Convention convention) {
  Options o;
  o.convention = convention;
  o.group.learning_rate = 0.1;
  o.group.momentum = 0.9;
  o.use_ema = true;
  o.ema_momentum = 0.8;
  Options oc = o;
  oc.caller_owned_slots = true;
  std::vector<float> w = ramp(19, 1.0f, 0.1f), tw = w, g = ramp(19, 0.5f, -0.05f);
  std::vector<float> m(19, 0.0f), avg(19, 0.0f);
  const float* m_data = m.data();
  SGD sgd(oc), twin(o);
  sgd.build({view(w)});
  twin.build({view(tw)});
  CHECK(!sgd.has_slot(SlotKind::momentum) && !sgd.has_slot(SlotKind::average));
  Request r, rt;
  r.vars = {view(w)};
  r.grads = {view(g)};
  r.slots[int(SlotKind::momentum)] = {view(m)};
  r.slots[int(SlotKind::average)] = {view(avg)};
  r.fresh = {1};  // torch: the caller says the buffer starts now (ignored by the keras rule)
  rt.vars = {view(tw)};
  rt.grads = {view(g)};
  for (int step = 0; step < 3; ++step) {
    sgd.step(r.get());
    twin.step(rt.get());
    r.fresh = {0};
    CHECK(same_bytes(w, tw));
    CHECK(same_bytes(m, read(twin, SlotKind::momentum, 0)));
    CHECK(same_bytes(avg, read(twin, SlotKind::average, 0)));
  }
  CHECK(m.data() == m_data && m[0] != 0.0f);  // written in place, in the caller's buffer
  CHECK_THROWS(ValueError, sgd.finalize_variable_values({view(w)}));

  auto refused = [&](auto edit, bool type_error, const char* what) {
    const std::vector<float> w_before = w, m_before = m, avg_before = avg;
    const int64_t raw = sgd.raw_iterations();
    Request bad = r;
    edit(bad);
    bool ok;
    try {
      sgd.step(bad.get());
      ok = false;
    } catch (const TypeError&) {
      ok = type_error;
    } catch (const ValueError&) {
      ok = !type_error;
    }
    CHECK_MSG(ok, "%s: not refused with the right error", what);
    CHECK_MSG(same_bytes(w, w_before) && same_bytes(m, m_before) && same_bytes(avg, avg_before) &&
                  sgd.raw_iterations() == raw,
              "%s: a refused step changed something", what);
  };
  std::vector<double> m64(19);
  std::vector<float> short_m(18), shared(40);
  refused([](Request& q) { q.slots[int(SlotKind::momentum)].clear(); }, false, "no momentum slots");
  refused([](Request& q) { q.slots[int(SlotKind::momentum)] = {TensorView{}}; }, false, "empty momentum slot");
  refused([](Request& q) { q.slots[int(SlotKind::average)].clear(); }, false, "no average slots");
  refused([&](Request& q) { q.slots[int(SlotKind::momentum)] = {view(m64)}; }, true, "float64 slot");
  refused([&](Request& q) { q.slots[int(SlotKind::momentum)] = {view(short_m)}; }, false, "short slot");
  refused([&](Request& q) { q.slots[int(SlotKind::momentum)] = {view(w)}; }, false, "slot is the variable");
  refused([&](Request& q) { q.slots[int(SlotKind::momentum)] = {view(g)}; }, false, "slot is the gradient");
  refused([&](Request& q) { q.slots[int(SlotKind::average)] = {view(m)}; }, false, "two slots share memory");
  refused([&](Request& q) {
    q.slots[int(SlotKind::momentum)] = {TensorView{shared.data(), 19, DType::float32}};
    q.slots[int(SlotKind::average)] = {TensorView{shared.data() + 10, 19, DType::float32}};
  }, false, "two slots overlap");
  TensorView on_gpu = view(m);
  on_gpu.device = Device{DeviceKind::cuda, 0};
  refused([&](Request& q) { q.slots[int(SlotKind::momentum)] = {on_gpu}; }, false, "slot on another device");
  // After the refusals, the optimizer goes on exactly like its twin.
  sgd.step(r.get());
  twin.step(rt.get());
  CHECK(same_bytes(w, tw) && same_bytes(m, read(twin, SlotKind::momentum, 0)));

  // 16-bit variables take float32 slots unless slots_in_variable_dtype; a group without
  // momentum needs no momentum slot.
  Options oh;
  oh.convention = convention;
  oh.caller_owned_slots = true;
  oh.group.momentum = 0.5;
  std::vector<half_t> wh(4, to_half(1.0f)), gh(4, to_half(1.0f)), mh(4, to_half(0.0f));
  std::vector<float> mf(4, 0.0f);
  SGD h(oh);
  Group plain;
  h.add_group(plain);
  std::vector<half_t> wp(4, to_half(1.0f));
  h.build({{wh.data(), 4, DType::float16}, {wp.data(), 4, DType::float16}}, {}, {0, 1});
  Request rh;
  rh.vars = {{wh.data(), 4, DType::float16}, {wp.data(), 4, DType::float16}};
  rh.grads = {{gh.data(), 4, DType::float16}, {gh.data(), 4, DType::float16}};
  rh.slots[int(SlotKind::momentum)] = {{mh.data(), 4, DType::float16}, TensorView{}};
  rh.fresh = {1, 1};
  CHECK_THROWS(TypeError, h.step(rh.get()));
  CHECK_BITS(wh[0].bits, to_half(1.0f).bits);
  rh.slots[int(SlotKind::momentum)] = {{mf.data(), 4, DType::float32}, TensorView{}};
  CHECK_NOTHROW(h.step(rh.get()));
  CHECK_BITS(mf[0], convention == Convention::torch ? 1.0f : -0.01f);  // torch: b = g ; keras: -lr * g
  CHECK(to_float(wp[0]) != 1.0f);
}

struct EngineState {
  std::vector<float> w, m, avg, acc;
  int64_t raw;
  bool operator==(const EngineState& o) const {
    return same_bytes(w, o.w) && same_bytes(m, o.m) && same_bytes(avg, o.avg) && same_bytes(acc, o.acc) &&
           raw == o.raw;
  }
};

EngineState state_of(const SGD& sgd, const std::vector<float>& w) {
  EngineState s;
  s.w = w;
  if (sgd.has_slot(SlotKind::momentum)) s.m = read(sgd, SlotKind::momentum, 0);
  if (sgd.has_slot(SlotKind::average)) s.avg = read(sgd, SlotKind::average, 0);
  if (sgd.has_slot(SlotKind::accumulator)) s.acc = read(sgd, SlotKind::accumulator, 0);
  s.raw = sgd.raw_iterations();
  return s;
}

// skip_nonfinite and found_inf: a skipped step changes nothing but skipped_steps.
void skip_nonfinite(Convention convention, bool accumulate) {
  Options o;
  o.convention = convention;
  o.group.momentum = 0.9;
  o.group.weight_decay = 0.01;
  o.use_ema = true;
  o.ema_overwrite_frequency = 3;
  o.loss_scale_factor = 0.5;  // gradients are doubled: 3e38 overflows to inf after unscaling
  if (accumulate) o.gradient_accumulation_steps = 2;
  o.skip_nonfinite = true;
  Options plain = o;
  plain.skip_nonfinite = false;
  std::vector<float> w = ramp(40, 1.0f, 0.05f), tw = w, g = ramp(40, -0.5f, 0.03f);
  SGD sgd(o), twin(plain);
  sgd.build({view(w)});
  twin.build({view(tw)});
  for (int i = 0; i < 3; ++i) {
    sgd.step({view(w)}, {view(g)}, 0.1);
    twin.step({view(tw)}, {view(g)}, 0.1);
  }
  const float specials[] = {INFINITY, -INFINITY, NAN, 3e38f};
  int64_t skipped = 0;
  for (float bad : specials) {
    for (size_t at : {size_t(0), size_t(17), size_t(39)}) {
      std::vector<float> gb = g;
      gb[at] = bad;
      const EngineState before = state_of(sgd, w);
      const StepResult res = sgd.step({view(w)}, {view(gb)}, 0.1);
      ++skipped;
      CHECK_MSG(res.skipped && !res.updated, "bad=%g at %zu: not skipped", double(bad), at);
      CHECK_MSG(state_of(sgd, w) == before, "bad=%g at %zu: a skipped step changed something", double(bad), at);
      CHECK(sgd.skipped_steps() == skipped);
    }
  }
  // External decisions: found_inf=true skips finite gradients (even without skip_nonfinite) ...
  Request r;
  r.vars = {view(w)};
  r.grads = {view(g)};
  r.get().found_inf = true;
  EngineState before = state_of(sgd, w);
  CHECK(sgd.step(r.get()).skipped);
  CHECK(state_of(sgd, w) == before && sgd.skipped_steps() == ++skipped);
  // ... a non-finite global sum of squares from outside skips without measuring here ...
  Request rs;
  rs.vars = {view(w)};
  rs.grads = {view(g)};
  rs.get().global_sum_squares = INFINITY;
  CHECK(sgd.step(rs.get()).skipped);
  CHECK(state_of(sgd, w) == before && sgd.skipped_steps() == ++skipped);
  // The skips left no trace: the optimizer goes on exactly like one that never saw them.
  for (int i = 0; i < 3; ++i) {
    const StepResult res = sgd.step({view(w)}, {view(g)}, 0.1);
    twin.step({view(tw)}, {view(g)}, 0.1);
    CHECK(!res.skipped && res.updated == (!accumulate || i % 2 == 0));
  }
  CHECK(state_of(sgd, w) == state_of(twin, tw));
  CHECK(sgd.raw_iterations() == twin.raw_iterations() && twin.skipped_steps() == 0);
  // ... and found_inf=false is trusted: no scan, the non-finite gradient goes through.
  std::vector<float> gb = g;
  gb[5] = INFINITY;
  Request rf;
  rf.vars = {view(w)};
  rf.grads = {view(gb)};
  rf.get().found_inf = false;
  const StepResult res = sgd.step(rf.get());
  CHECK(!res.skipped && sgd.skipped_steps() == skipped);
  CHECK(sgd.raw_iterations() == twin.raw_iterations() + 1);
  if (!accumulate || res.updated) CHECK_MSG(!std::isfinite(w[5]), "w[5] = %g", double(w[5]));
  // Without skip_nonfinite, a non-finite gradient is applied (Keras's behaviour).
  std::vector<float> tb = g;
  tb[5] = INFINITY;
  CHECK(!twin.step({view(tw)}, {view(tb)}, 0.1).skipped);
  CHECK(twin.raw_iterations() == sgd.raw_iterations());
  sgd.set_skipped_steps(0);
  CHECK(sgd.skipped_steps() == 0);
  CHECK_THROWS(ValueError, sgd.set_skipped_steps(-1));
}

// Two-phase norms: grad_stats measures without changing anything, and a step given its sum
// as global_sum_squares equals one step that measures itself.
void two_phase_norms(bool accumulate) {
  Options o;
  o.group.momentum = 0.9;
  o.global_clipnorm = 0.5;
  o.loss_scale_factor = 2;
  if (accumulate) o.gradient_accumulation_steps = 2;
  std::vector<double> w0(50), w1(7), g0(50), g1(7);
  for (size_t i = 0; i < 50; ++i) {
    w0[i] = 0.01 * double(i);
    g0[i] = std::sin(double(i));
  }
  for (size_t i = 0; i < 7; ++i) {
    w1[i] = -0.2 * double(i);
    g1[i] = 0.3 * double(i) - 1.0;
  }
  std::vector<double> t0 = w0, t1 = w1;
  SGD sgd(o), twin(o);
  sgd.build({view(w0), view(w1)});
  twin.build({view(t0), view(t1)});
  for (int step = 0; step < 4; ++step) {
    Request r;
    r.vars = {view(w0), view(w1)};
    r.grads = {view(g0), step == 1 ? TensorView{} : view(g1)};
    const std::vector<double> b0 = w0, b1 = w1;
    const int64_t raw = sgd.raw_iterations();
    const GradStats stats = sgd.grad_stats(r.get());
    CHECK(std::memcmp(b0.data(), w0.data(), 50 * 8) == 0 && std::memcmp(b1.data(), w1.data(), 7 * 8) == 0);
    CHECK(sgd.raw_iterations() == raw && !stats.nonfinite);
    CHECK(stats.sum_squares.size() == 2);
    // What Keras measures: the unscaled gradient, merged with the window on an update call.
    const bool merge = accumulate && step % 2 == 1;
    std::vector<double> acc(50, 0.0);
    if (merge) {
      std::vector<double> a(50);
      sgd.read_slot(SlotKind::accumulator, 0, a.data());
      acc = a;
    }
    double expect0 = 0.0, expect1 = 0.0;
    for (size_t i = 0; i < 50; ++i) {
      const double x = merge ? (g0[i] * 0.5 + acc[i]) / 2 : g0[i] * 0.5;
      expect0 += x * x;
    }
    if (step != 1)
      for (size_t i = 0; i < 7; ++i) expect1 += (g1[i] * 0.5) * (g1[i] * 0.5);
    CHECK_NEAR(stats.sum_squares[0], expect0, 1e-12);
    CHECK_NEAR(stats.sum_squares[1], expect1, 1e-12);
    CHECK_BITS(stats.total, stats.sum_squares[0] + stats.sum_squares[1]);
    r.get().global_sum_squares = stats.total;
    sgd.step(r.get());
    Request rt;
    rt.vars = {view(t0), view(t1)};
    rt.grads = {view(g0), step == 1 ? TensorView{} : view(g1)};
    twin.step(rt.get());
    CHECK_MSG(std::memcmp(w0.data(), t0.data(), 50 * 8) == 0 && std::memcmp(w1.data(), t1.data(), 7 * 8) == 0,
              "step %d: an external global sum differs from the engine's own", step);
  }
  // The clip was active (the norm is above 0.5), so the external sum mattered: a wrong one
  // gives other values.
  Request r;
  r.vars = {view(w0), view(w1)};
  r.grads = {view(g0), view(g1)};
  if (accumulate) {
    sgd.step(r.get());
    Request rt;
    rt.vars = {view(t0), view(t1)};
    rt.grads = {view(g0), view(g1)};
    twin.step(rt.get());
  }
  const std::vector<double> before = w0;
  r.get().global_sum_squares = 1e-6;
  sgd.step(r.get());
  Request rt;
  rt.vars = {view(t0), view(t1)};
  rt.grads = {view(g0), view(g1)};
  twin.step(rt.get());
  CHECK(std::memcmp(w0.data(), t0.data(), 50 * 8) != 0);
  CHECK(std::memcmp(w0.data(), before.data(), 50 * 8) != 0);
  // A non-finite gradient shows in grad_stats, and a negative sum is refused.
  std::vector<double> gbad = g0;
  gbad[3] = NAN;
  Request rb;
  rb.vars = {view(w0), view(w1)};
  rb.grads = {view(gbad), view(g1)};
  CHECK(sgd.grad_stats(rb.get()).nonfinite);
  const std::vector<double> kept = w0;
  r.get().global_sum_squares = -1.0;
  CHECK_THROWS(ValueError, sgd.step(r.get()));
  CHECK(std::memcmp(w0.data(), kept.data(), 50 * 8) == 0);
}

// Validation: Keras's wording under the keras convention, torch's under torch.
void validation_messages() {
  auto make = [](Convention c, void (*edit)(Group&)) {
    Options o;
    o.convention = c;
    edit(o.group);
    SGD s(o);
  };
  const Convention K = Convention::keras, T = Convention::torch;
  CHECK_THROWS_WITH(ValueError, "`momentum` must be a float between [0, 1].",
                    make(K, [](Group& g) { g.momentum = 1.5; }));
  CHECK_THROWS_WITH(ValueError, "dampening", make(K, [](Group& g) { g.dampening = 0.1; }));
  CHECK_THROWS_WITH(ValueError, "Invalid learning rate: -0.1", make(T, [](Group& g) { g.learning_rate = -0.1; }));
  CHECK_THROWS_WITH(ValueError, "Invalid momentum value: -0.5", make(T, [](Group& g) { g.momentum = -0.5; }));
  CHECK_THROWS_WITH(ValueError, "Invalid weight_decay value: -0.01",
                    make(T, [](Group& g) { g.weight_decay = -0.01; }));
  CHECK_THROWS_WITH(ValueError, "Nesterov momentum requires a momentum and zero dampening",
                    make(T, [](Group& g) { g.nesterov = true; }));
  CHECK_THROWS_WITH(ValueError, "Nesterov momentum requires a momentum and zero dampening",
                    make(T, [](Group& g) { g.nesterov = true; g.momentum = 0.9; g.dampening = 0.1; }));
  CHECK_THROWS_WITH(ValueError, "`learning_rate` must be a finite float",
                    make(T, [](Group& g) { g.learning_rate = INFINITY; }));
  CHECK_NOTHROW(make(T, [](Group& g) { g.momentum = 1.5; g.dampening = 0.5; }));  // torch allows both
  CHECK_NOTHROW(make(T, [](Group& g) { g.nesterov = true; g.momentum = 0.9; }));
  CHECK_THROWS_WITH(ValueError, "Only one of `clipnorm`, `clipvalue` and `global_clipnorm` can be set", ([] {
                      Options o;
                      o.clipnorm = 1.0;
                      o.global_clipnorm = 1.0;
                      SGD s(o);
                    }()));
  // add_group is validated with the optimizer's convention.
  Options t;
  t.convention = T;
  SGD s(t);
  Group g;
  g.learning_rate = -1;
  CHECK_THROWS_WITH(ValueError, "Invalid learning rate", s.add_group(g));
  CHECK(s.num_groups() == 1);
  // Step arguments.
  std::vector<float> w(4, 1.0f), gr(4, 1.0f);
  s.build({view(w)});
  Request r;
  r.vars = {view(w)};
  r.grads = {view(gr)};
  r.get().grad_scale = 0.0;
  CHECK_THROWS_WITH(ValueError, "grad_scale", s.step(r.get()));
  r.get().grad_scale = 1.0;
  r.get().learning_rate = NAN;
  CHECK_THROWS_WITH(ValueError, "learning_rate", s.step(r.get()));
  CHECK_BITS(w[0], 1.0f);
  CHECK(s.raw_iterations() == 0);
}

// The momentum slots an engine allocates when a group first asks for momentum are built
// state too: a refused step must not leave them behind, and neither may a skipped one.
void refused_step_allocates_nothing() {
  Options o;
  o.skip_nonfinite = true;
  std::vector<float> w(8, 1.0f), g(8, 0.5f), bad(8, INFINITY);
  SGD sgd(o);
  sgd.build({view(w)});
  Group m;
  m.momentum = 0.9;
  sgd.set_group(0, m);
  CHECK(!sgd.has_slot(SlotKind::momentum));
  // The gradient is the variable itself: refused (overlap) ...
  CHECK_THROWS(ValueError, sgd.step({view(w)}, {view(w)}, 0.1));
  CHECK_MSG(!sgd.has_slot(SlotKind::momentum), "a refused step allocated the momentum slots");
  // ... and a skipped step changes nothing either.
  CHECK(sgd.step({view(w)}, {view(bad)}, 0.1).skipped);
  CHECK_MSG(!sgd.has_slot(SlotKind::momentum), "a skipped step allocated the momentum slots");
  CHECK(sgd.raw_iterations() == 0);
  CHECK_NOTHROW(sgd.step({view(w)}, {view(g)}, 0.1));
  CHECK(sgd.has_slot(SlotKind::momentum));
}

// The iteration counter never wraps: at its largest value a step is refused.
void iterations_at_the_limit() {
  std::vector<float> w(3, 1.0f), g(3, 1.0f);
  SGD sgd(Options{});
  sgd.build({view(w)});
  sgd.set_raw_iterations(std::numeric_limits<int64_t>::max());
  CHECK_THROWS_WITH(ValueError, "iterations", sgd.step({view(w)}, {view(g)}, 0.1));
  CHECK_BITS(w[0], 1.0f);
  CHECK(sgd.raw_iterations() == std::numeric_limits<int64_t>::max());
  sgd.set_raw_iterations(std::numeric_limits<int64_t>::max() - 1);
  CHECK_NOTHROW(sgd.step({view(w)}, {view(g)}, 0.5));
  CHECK_BITS(w[0], 0.5f);
  CHECK(sgd.raw_iterations() == std::numeric_limits<int64_t>::max());
}

}  // namespace

// Without weight decay there is no L2 term, on the 16-bit update passes as on the others
// (which skip the decay): torch's SGD adds nothing, so an infinite weight stays infinite (not
// inf * 0 = NaN) and a -0 gradient starts the momentum buffer at -0. The 16-bit passes run the
// decay whenever a gradient transform is active (here the loss scale).
void no_l2_term_without_decay() {
  for (int form = 0; form < 3; ++form) {
    Options o;
    o.convention = Convention::torch;
    o.group.momentum = 0.9;
    o.loss_scale_factor = 2.0;
    if (form == 1) o.master_weights = MasterForm::float32;
    if (form == 2) o.master_weights = MasterForm::remainder;
    o.stochastic_rounding = form == 0;
    std::vector<bfloat16_t> w{to_bfloat16(INFINITY), to_bfloat16(1.0f)}, g{to_bfloat16(1.0f), to_bfloat16(-0.0f)};
    SGD sgd(o);
    sgd.build({{w.data(), 2, DType::bfloat16}});
    sgd.step({{w.data(), 2, DType::bfloat16}}, {{g.data(), 2, DType::bfloat16}}, 0.5);
    float m[2];
    sgd.read_slot(SlotKind::momentum, 0, m);
    CHECK_MSG(w[0].bits == to_bfloat16(INFINITY).bits, "form %d: an infinite weight became %g", form,
              double(to_float(w[0])));
    CHECK_MSG(bits::float_bits(m[1]) == bits::float_bits(-0.0f), "form %d: momentum from a -0 gradient is %g", form,
              double(m[1]));
  }
}

int main() {
  keras_plain();
  keras_momentum();
  keras_nesterov();
  keras_weight_decay();
  keras_ema();
  keras_accumulation();
  keras_clipping_and_scale();
  slots_in_16_bit();
  state_round_trip();
  all_or_nothing();
  build_and_option_errors();
  cpu_information();
  for (Convention c : {Convention::keras, Convention::torch}) {
    parameter_groups(c);
    caller_owned_slots(c);
    skip_nonfinite(c, false);
    skip_nonfinite(c, true);
  }
  momentum_slot_on_demand();
  torch_first_step();
  two_phase_norms(false);
  two_phase_norms(true);
  validation_messages();
  iterations_at_the_limit();
  refused_step_allocates_nothing();
  no_l2_term_without_decay();
  return check::finish("test_engine");
}

// (d) fastsgd::SGD against Keras's worked numbers, and (e) its all-or-nothing error contract.
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
  o.momentum = 0.9;
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
  o.momentum = 0.9;
  o.nesterov = true;
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
  o.weight_decay = 0.004;
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
  o.momentum = 0.5;
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
  o.momentum = 0.9;
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
  o.momentum = 0.9;
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
  CHECK_THROWS(ValueError, bad([](Options& o) { o.momentum = 1.5; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.momentum = -0.1; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.momentum = std::nan(""); }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.clipnorm = 1; o.clipvalue = 1; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.gradient_accumulation_steps = 1; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.weight_decay = INFINITY; }));
  CHECK_THROWS(ValueError, bad([](Options& o) { o.use_ema = true; o.ema_momentum = 2; }));
  CHECK_NOTHROW(bad([](Options& o) { o.momentum = 1.0; o.nesterov = true; }));

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

}  // namespace

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
  return check::finish("test_engine");
}

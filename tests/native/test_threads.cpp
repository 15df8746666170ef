// (f) Results do not depend on the thread count: a multi-tensor step over more than 3 * 65536
// elements (so two threads really split it, across and inside tensors), with global_clipnorm
// (a threaded norm pre-pass) and per-tensor clipnorm, under the Keras and the torch
// convention, and with skip_nonfinite (a threaded Inf/NaN probe), run with 1 and with 2
// threads, must give identical bits, equal to the scalar reference.
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "fastsgd/fastsgd.h"
#include "reference.h"

using namespace fastsgd;

namespace {

// Sizes: one tensor larger than a thread's share, odd sizes so thread boundaries fall inside
// tensors and off 64-element lines, tiny tensors in between.
const int64_t kSizes[] = {100003, 7, 65536 + 13, 1, 64 * 1000 + 5, 30000, 3};

template <class W>
std::vector<W> random_vector(std::mt19937& rng, int64_t n, double scale) {
  std::normal_distribution<double> normal(0.0, scale);
  std::vector<W> v(static_cast<size_t>(n));
  for (auto& x : v) store(x, typename compute_type<W>::type(normal(rng)));
  return v;
}

// Variables of dtype W (slots S); `steps` steps with fresh gradients each. On `bad_step`
// (if >= 0) one gradient element far into the largest tensor (in the second thread's share)
// is Inf and one in a small tensor is NaN.
template <class W, class S>
void compare_thread_counts(const char* name, Options o, int steps, int bad_step = -1) {
  std::mt19937 rng(7);
  const size_t n = sizeof(kSizes) / sizeof(kSizes[0]);
  o.slots_in_variable_dtype = std::is_same<W, S>::value;
  std::vector<std::vector<W>> init, grads_per_step;
  for (size_t i = 0; i < n; ++i) init.push_back(random_vector<W>(rng, kSizes[i], 1.0));
  for (int s = 0; s < steps; ++s)
    for (size_t i = 0; i < n; ++i) grads_per_step.push_back(random_vector<W>(rng, kSizes[i], 0.01 * (s + 1)));
  if (bad_step >= 0) {
    using C = typename compute_type<W>::type;
    store(grads_per_step[size_t(bad_step) * n][size_t(kSizes[0] - 5)], C(INFINITY));
    store(grads_per_step[size_t(bad_step) * n + 4][3], C(NAN));
  }

  std::vector<std::vector<W>> result[2];
  std::vector<std::vector<S>> slots[2];
  for (int run = 0; run < 2; ++run) {
    const int threads = run + 1;
    set_num_threads(threads);
    CHECK(cpu_info().threads == threads);
    std::vector<std::vector<W>> w = init;
    std::vector<TensorView> views, grads;
    for (auto& v : w) views.push_back({v.data(), int64_t(v.size()), ref::dtype_of<W>::value});
    SGD sgd(o);
    sgd.build(views);
    for (int s = 0; s < steps; ++s) {
      grads.clear();
      for (size_t i = 0; i < n; ++i) {
        auto& g = grads_per_step[size_t(s) * n + i];
        grads.push_back({g.data(), int64_t(g.size()), ref::dtype_of<W>::value});
      }
      const StepResult res = sgd.step(views, grads, 0.05);
      CHECK_MSG(res.skipped == (s == bad_step), "%s, %d thread(s), step %d: skipped=%d", name, threads, s,
                int(res.skipped));
    }
    CHECK(sgd.skipped_steps() == (bad_step >= 0 ? 1 : 0));
    sgd.finalize_variable_values(views);
    result[run] = w;
    for (size_t i = 0; i < n; ++i)
      for (SlotKind k : {SlotKind::momentum, SlotKind::average, SlotKind::accumulator}) {
        const TensorView sv = sgd.slot(k, i);
        const S* p = static_cast<const S*>(sv.data);
        slots[run].push_back(p ? std::vector<S>(p, p + sv.numel) : std::vector<S>{});
      }
  }
  set_num_threads(0);

  ref::SGD r(o);
  for (size_t i = 0; i < n; ++i) r.add<W, S>(kSizes[i]).w = init[i];
  for (int s = 0; s < steps; ++s) {
    for (size_t i = 0; i < n; ++i)
      static_cast<ref::TypedVar<W, S>&>(*r.vars[i]).g = grads_per_step[size_t(s) * n + i];
    CHECK(r.step(0.05) == (s != bad_step));
  }
  r.finalize();

  const int before = check::failures();
  for (size_t i = 0; i < n; ++i) {
    auto& rv = static_cast<ref::TypedVar<W, S>&>(*r.vars[i]);
    const size_t bytes = rv.w.size() * sizeof(W);
    CHECK_MSG(std::memcmp(result[0][i].data(), result[1][i].data(), bytes) == 0,
              "%s: variable %zu differs between 1 and 2 threads", name, i);
    bool same = true;
    for (size_t e = 0; e < rv.w.size() && same; ++e) same = ref::same(result[1][i][e], rv.w[e]);
    CHECK_MSG(same, "%s: variable %zu differs from the reference", name, i);
    const std::vector<S>* ref_slots[] = {&rv.m, &rv.avg, &rv.acc};
    for (size_t k = 0; k < 3; ++k) {
      const auto& a = slots[0][i * 3 + k];
      const auto& b = slots[1][i * 3 + k];
      CHECK_MSG(a.size() == b.size() && (a.empty() || std::memcmp(a.data(), b.data(), a.size() * sizeof(S)) == 0),
                "%s: slot %zu of variable %zu differs between 1 and 2 threads", name, k, i);
      bool slot_same = a.size() == ref_slots[k]->size();
      for (size_t e = 0; e < a.size() && slot_same; ++e) slot_same = ref::same(a[e], (*ref_slots[k])[e]);
      CHECK_MSG(slot_same, "%s: slot %zu of variable %zu differs from the reference", name, k, i);
    }
  }
  std::printf("  %-44s %s\n", name, check::failures() == before ? "ok" : "FAILED");
}

}  // namespace

int main() {
  // The pool must have two threads to split anything; ask before it exists.
  setenv("FASTSGD_NUM_THREADS", "2", 1);
  int64_t total = 0;
  for (int64_t s : kSizes) total += s;
  std::printf("%lld elements in %zu tensors; ISA level %s\n", static_cast<long long>(total),
              sizeof(kSizes) / sizeof(kSizes[0]), cpu_info().active.c_str());

  Options global;
  global.global_clipnorm = 1.0;  // the gradients' norm is well above 1: the clip is active
  global.group.momentum = 0.9;
  global.group.nesterov = true;
  global.group.weight_decay = 0.01;
  global.use_ema = true;
  global.ema_overwrite_frequency = 2;
  compare_thread_counts<float, float>("float32 global_clipnorm+nesterov+ema", global, 3);
  compare_thread_counts<bfloat16_t, float>("bfloat16/float32 global_clipnorm", global, 2);
  compare_thread_counts<half_t, half_t>("float16/float16 global_clipnorm", global, 2);

  Options per_tensor;
  per_tensor.clipnorm = 0.5;
  per_tensor.group.momentum = 0.9;
  per_tensor.gradient_accumulation_steps = 2;
  compare_thread_counts<double, double>("float64 clipnorm+accumulation", per_tensor, 4);
  compare_thread_counts<float, float>("float32 clipnorm+accumulation", per_tensor, 4);

  // torch.optim.SGD's rule: b = g on the first step, dampening, L2 decay, maximize.
  Options torch;
  torch.convention = Convention::torch;
  torch.global_clipnorm = 1.0;
  torch.group.momentum = 0.9;
  torch.group.dampening = 0.1;
  torch.group.weight_decay = 0.01;
  torch.group.maximize = true;
  torch.use_ema = true;
  compare_thread_counts<float, float>("torch float32 global_clipnorm+l2+maximize", torch, 3);
  compare_thread_counts<bfloat16_t, float>("torch bfloat16/float32 global_clipnorm", torch, 2);
  Options torch_nesterov;
  torch_nesterov.convention = Convention::torch;
  torch_nesterov.clipnorm = 0.5;
  torch_nesterov.group.momentum = 0.8;
  torch_nesterov.group.nesterov = true;
  torch_nesterov.group.weight_decay = 0.02;
  torch_nesterov.gradient_accumulation_steps = 2;
  compare_thread_counts<double, double>("torch float64 nesterov+clipnorm+accumulation", torch_nesterov, 4);

  // skip_nonfinite: the threaded Inf/NaN probe finds the bad step wherever the element lies.
  Options skip = global;
  skip.skip_nonfinite = true;
  compare_thread_counts<float, float>("float32 skip_nonfinite+global_clipnorm", skip, 3, 1);
  Options skip_torch = torch;
  skip_torch.global_clipnorm.reset();
  skip_torch.skip_nonfinite = true;
  skip_torch.gradient_accumulation_steps = 2;
  compare_thread_counts<half_t, float>("torch float16/float32 skip_nonfinite+accumulation", skip_torch, 4, 0);
  return check::finish("test_threads");
}

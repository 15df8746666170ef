// Trains a logistic-regression classifier with fastsgd::SGD, from C++.
//
// The data are synthetic: 20 standard-normal features, labels from a fixed "true" linear
// model with 5% of them flipped, so about 95% accuracy is reachable. The model is a weight
// vector and a bias, two variables of one optimizer (the bias excluded from weight decay),
// trained with mini-batches, momentum 0.9, decoupled weight decay and an exponential moving
// average of the weights that finalize_variable_values() copies in at the end.
//
// Prints the loss per epoch and the final accuracy; exits with 1 if the accuracy is below
// 0.9 (so CI can run it as a test).
//
// Build against an installed fastsgd (see README.md in this directory):
//   cmake -S cpp/examples -B build-example -Dfastsgd_DIR="$(python -m fastsgd info --cmake-dir)"
//   cmake --build build-example && build-example/train_logistic
#include <fastsgd/fastsgd.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdio>
#include <exception>
#include <numeric>
#include <random>
#include <vector>

namespace {

constexpr int kFeatures = 20;
constexpr int kSamples = 4000;
constexpr int kTrain = 3200;  // the rest is held out
constexpr int kBatch = 64;
constexpr int kEpochs = 15;

struct Data {
  std::vector<float> x;  // kSamples x kFeatures, row-major
  std::vector<float> y;  // 0 or 1
};

Data make_data(std::mt19937& rng) {
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
  std::vector<float> true_w(kFeatures);
  for (float& v : true_w) v = normal(rng);
  const float true_b = 0.5f;
  Data d;
  d.x.resize(size_t(kSamples) * kFeatures);
  d.y.resize(kSamples);
  for (int i = 0; i < kSamples; ++i) {
    float z = true_b;
    for (int j = 0; j < kFeatures; ++j) {
      const float v = normal(rng);
      d.x[size_t(i) * kFeatures + size_t(j)] = v;
      z += true_w[size_t(j)] * v;
    }
    const bool label = z > 0.0f;
    const bool flip = uniform(rng) < 0.05f;
    d.y[size_t(i)] = (label != flip) ? 1.0f : 0.0f;
  }
  return d;
}

float sigmoid(float z) { return 1.0f / (1.0f + std::exp(-z)); }

float logit(const Data& d, int i, const std::vector<float>& w, float b) {
  float z = b;
  for (int j = 0; j < kFeatures; ++j) z += w[size_t(j)] * d.x[size_t(i) * kFeatures + size_t(j)];
  return z;
}

// Mean binary cross-entropy over samples [begin, end), and the fraction classified correctly.
void evaluate(const Data& d, int begin, int end, const std::vector<float>& w, float b,
              double& loss, double& accuracy) {
  double total = 0.0;
  int correct = 0;
  for (int i = begin; i < end; ++i) {
    const float z = logit(d, i, w, b);
    const float y = d.y[size_t(i)];
    // log(1 + exp(-z)) for y = 1, log(1 + exp(z)) for y = 0, computed stably
    const float s = y > 0.5f ? -z : z;
    total += s > 0 ? s + std::log1p(std::exp(-s)) : std::log1p(std::exp(s));
    correct += ((z > 0.0f) == (y > 0.5f)) ? 1 : 0;
  }
  loss = total / (end - begin);
  accuracy = double(correct) / (end - begin);
}

}  // namespace

int main() {
  try {
    std::mt19937 rng(42);
    const Data data = make_data(rng);

    // The model: the optimizer updates these buffers in place.
    std::vector<float> w(kFeatures, 0.0f);
    std::vector<float> b(1, 0.0f);
    std::vector<float> grad_w(kFeatures), grad_b(1);

    fastsgd::Options options;
    options.group.momentum = 0.9;
    options.group.weight_decay = 1e-3;
    options.use_ema = true;
    options.ema_momentum = 0.99;
    fastsgd::SGD sgd(options);

    const fastsgd::TensorView vars[] = {{w.data(), kFeatures, fastsgd::DType::float32},
                                        {b.data(), 1, fastsgd::DType::float32}};
    const fastsgd::TensorView grads[] = {{grad_w.data(), kFeatures, fastsgd::DType::float32},
                                         {grad_b.data(), 1, fastsgd::DType::float32}};
    sgd.build({vars[0], vars[1]}, /*decays=*/{true, false});
    // One request, reused every step: the same buffers, a new learning rate.
    fastsgd::StepRequest request;
    request.variables = vars;
    request.grads = grads;

    const fastsgd::CpuInfo cpu = fastsgd::cpu_info();
    std::printf("fastsgd %d.%d.%d, CPU code path %s, %d thread(s)\n", FASTSGD_VERSION_MAJOR,
                FASTSGD_VERSION_MINOR, FASTSGD_VERSION_PATCH, cpu.active.c_str(), cpu.threads);

    std::vector<int> order(kTrain);
    std::iota(order.begin(), order.end(), 0);
    const double base_lr = 0.01;
    for (int epoch = 0; epoch < kEpochs; ++epoch) {
      std::shuffle(order.begin(), order.end(), rng);
      // Cosine decay of the learning rate over the epochs (any schedule is the caller's).
      const double lr = base_lr * 0.5 * (1.0 + std::cos(3.141592653589793 * epoch / kEpochs));
      for (int start = 0; start + kBatch <= kTrain; start += kBatch) {
        std::fill(grad_w.begin(), grad_w.end(), 0.0f);
        grad_b[0] = 0.0f;
        for (int k = start; k < start + kBatch; ++k) {
          const int i = order[size_t(k)];
          const float err = sigmoid(logit(data, i, w, b[0])) - data.y[size_t(i)];  // dLoss/dz
          for (int j = 0; j < kFeatures; ++j)
            grad_w[size_t(j)] += err * data.x[size_t(i) * kFeatures + size_t(j)] / kBatch;
          grad_b[0] += err / kBatch;
        }
        request.learning_rate = lr;
        sgd.step(request);  // one call updates both variables and all slots
      }
      double loss, acc;
      evaluate(data, 0, kTrain, w, b[0], loss, acc);
      std::printf("epoch %2d  lr %.4f  train loss %.4f  train accuracy %.3f\n", epoch + 1, lr, loss, acc);
    }

    double loss, acc;
    evaluate(data, kTrain, kSamples, w, b[0], loss, acc);
    std::printf("held-out before EMA finalize: loss %.4f  accuracy %.3f\n", loss, acc);
    sgd.finalize_variable_values({vars[0], vars[1]});  // the averaged weights into w and b
    evaluate(data, kTrain, kSamples, w, b[0], loss, acc);
    std::printf("held-out after  EMA finalize: loss %.4f  accuracy %.3f  (%lld optimizer steps)\n",
                loss, acc, static_cast<long long>(sgd.iterations()));

    const double threshold = 0.9;
    if (!(acc >= threshold)) {
      std::printf("FAILED: accuracy %.3f is below %.2f\n", acc, threshold);
      return 1;
    }
    std::printf("OK\n");
    return 0;
  } catch (const std::exception& e) {  // fastsgd::TypeError / ValueError are std::invalid_argument
    std::fprintf(stderr, "error: %s\n", e.what());
    return 2;
  }
}

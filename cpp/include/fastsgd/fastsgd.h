// fastsgd — the single include for C++ programs that embed the optimizer.
//
// Keras 3's SGD (momentum, Nesterov, decoupled weight decay, clipnorm / clipvalue /
// global_clipnorm, EMA with periodic overwrite, loss scaling, gradient accumulation), updating
// your own flat buffers in place. The engine is the same one the Python package runs.
//
//   #include <fastsgd/fastsgd.h>
//
//   std::vector<float> w(n), g(n);                       // your parameters and gradients
//   fastsgd::Options opt;
//   opt.group.momentum = 0.9;
//   opt.group.weight_decay = 1e-4;
//   opt.use_ema = true;
//   fastsgd::SGD sgd(opt);
//   sgd.build({{w.data(), int64_t(n), fastsgd::DType::float32}});   // allocates the slots
//   for (int step = 0; step < steps; ++step) {
//     compute_gradient(w, g);
//     sgd.step({{w.data(), int64_t(n)}}, {{g.data(), int64_t(n)}}, /*learning_rate=*/0.01);
//   }
//   sgd.finalize_variable_values({{w.data(), int64_t(n)}});        // EMA weights into w
//
// Errors in the inputs throw fastsgd::TypeError / fastsgd::ValueError (both
// std::invalid_argument) before anything is written. fastsgd::cpu_info() tells which CPU code
// path runs; fastsgd::set_num_threads() caps its threads.
//
// CMake:  find_package(fastsgd CONFIG REQUIRED)
//         target_link_libraries(your_target PRIVATE fastsgd::fastsgd)
// with -Dfastsgd_DIR="$(python -c 'import fastsgd; print(fastsgd.get_cmake_dir())')" for the
// copy inside the Python package, or add_subdirectory(<fastsgd checkout>). See
// cpp/examples/README.md.
#pragma once

#include "fastsgd/config.h"
#include "fastsgd/dtype.h"
#include "fastsgd/math.h"
#include "fastsgd/sgd.h"
#include "fastsgd/step.h"
#include "fastsgd/tensor.h"

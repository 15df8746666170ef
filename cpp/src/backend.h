// Where slot memory lives and where a step plan runs: the CPU, or a CUDA device.
#pragma once

#include <cstdint>
#include <memory>

#include "plan.h"

namespace fastsgd {
namespace detail {

class Backend {
 public:
  virtual ~Backend() = default;
  virtual void* allocate_zeroed(int64_t bytes) = 0;
  virtual void release(void* p) noexcept = 0;
  virtual void copy_to_host(void* host_dst, const void* src, int64_t bytes) = 0;
  virtual void copy_from_host(void* dst, const void* host_src, int64_t bytes) = 0;
  // Measures the update tasks' gradients (plan.measured), changing nothing.
  virtual void measure(StepPlan& plan) = 0;
  // Runs every pass of the plan (after the norm pre-pass when the plan asks for one).
  virtual void execute(StepPlan& plan) = 0;
  // Launch stream for device backends (0: the backend's default). Ignored on the CPU.
  virtual void set_stream(uintptr_t /*stream*/) {}
  // The next launches also wait for the work queued on `producer` up to now. Ignored on the CPU.
  virtual void wait_for_stream(uintptr_t /*producer*/) {}
};

std::unique_ptr<Backend> make_cpu_backend();
// Throws when this build has no CUDA or no usable device.
std::unique_ptr<Backend> make_cuda_backend(int device_index);

}  // namespace detail
}  // namespace fastsgd

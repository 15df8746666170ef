// The CUDA backend: slot memory on one device, and the execution of a StepPlan as a few
// multi-tensor kernel launches on the caller's stream (step_launches.h says which, in which
// order). No host synchronisation in execute(): norm clipping keeps its sums and coefficients
// in device memory, or takes coefficients the host already has (sums measured this step, a
// global sum computed outside) as kernel arguments. measure() is the one exception: the
// engine needs its sums and non-finite flag on the host (grad_stats, skip_nonfinite), so it
// copies them out and synchronises the stream. Device scratch (norm partials) lives here and
// grows only when a step needs more than any step before. Slots of every kind, float32
// masters and remainders included, are allocated here; the engine initialises a master from
// its variable through copy_to_host / copy_from_host at build, as on the CPU.
//
// CUDA graph capture is refused (ValueError naming the stream): a captured step would keep
// the learning rate, EMA factors and accumulation phase of the capturing call in its kernel
// arguments and replays would not advance the engine's counters.
//
// Built against the static CUDA runtime, which loads the driver lazily: nothing here runs
// before the first CUDA tensor is built or cuda_info() is asked, so the library loads on
// machines without a driver.
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstdio>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "backend.h"
#include "cuda_kernels.h"
#include "fastsgd/sgd.h"
#include "step_launches.h"

namespace fastsgd {
namespace gpu {
namespace {

std::string error_text(cudaError_t e) {
  return std::string(cudaGetErrorName(e)) + ": " + cudaGetErrorString(e);
}

[[noreturn]] void fail(cudaError_t e, const std::string& what) {
  cudaGetLastError();  // clear a non-sticky error so later calls start clean
  throw std::runtime_error("fastsgd CUDA backend: " + what + " failed (" + error_text(e) + ")");
}

void check(cudaError_t e, const char* what) {
  if (e != cudaSuccess) fail(e, what);
}

std::string runtime_version_text() {
  int v = 0;
  cudaRuntimeGetVersion(&v);
  return std::to_string(v / 1000) + "." + std::to_string((v % 1000) / 10);
}

// Makes `device` current for a scope and restores the caller's device afterwards (frameworks
// such as torch keep their own notion of the current device).
class DeviceGuard {
 public:
  explicit DeviceGuard(int device) {
    check(cudaGetDevice(&previous_), "cudaGetDevice");
    if (previous_ == device) {
      previous_ = -1;
    } else {
      check(cudaSetDevice(device), "cudaSetDevice");
    }
  }
  ~DeviceGuard() {
    if (previous_ >= 0) cudaSetDevice(previous_);
  }
  DeviceGuard(const DeviceGuard&) = delete;
  DeviceGuard& operator=(const DeviceGuard&) = delete;

 private:
  int previous_ = -1;
};

const ComboLaunchers& launchers(Combo c) {
  switch (c) {
    case Combo::f32: return launchers_f32();
    case Combo::f64: return launchers_f64();
    case Combo::f16_f32: return launchers_f16_f32();
    case Combo::f16_f16: return launchers_f16_f16();
    case Combo::bf16_f32: return launchers_bf16_f32();
    case Combo::bf16_bf16: return launchers_bf16_bf16();
  }
  return launchers_f32();
}

class CudaBackend final : public detail::Backend {
 public:
  explicit CudaBackend(int device) : device_(device) {
    DeviceGuard guard(device_);
    const cudaError_t e = probe_kernels();
    if (e != cudaSuccess) {
      cudaGetLastError();
      cudaDeviceProp prop{};
      cudaGetDeviceProperties(&prop, device_);
      throw ValueError("fastsgd's CUDA kernels cannot run on cuda:" + std::to_string(device_) + " (" + prop.name +
                       ", compute capability " + std::to_string(prop.major) + "." + std::to_string(prop.minor) +
                       "): " + error_text(e) +
                       ". This build has code for sm_75 (Turing) and newer; rebuild with "
                       "CMAKE_CUDA_ARCHITECTURES set for this GPU");
    }
  }

  ~CudaBackend() override {
    if (scratch_) cudaFree(scratch_);
    if (handoff_) cudaEventDestroy(handoff_);
    if (producer_event_) cudaEventDestroy(producer_event_);
  }

  void* allocate_zeroed(int64_t bytes) override {
    DeviceGuard guard(device_);
    refuse_capture(stream_);
    void* p = nullptr;
    const size_t size = size_t(bytes > 0 ? bytes : 1);
    const cudaError_t e = cudaMalloc(&p, size);
    if (e != cudaSuccess) {
      cudaGetLastError();
      throw std::runtime_error("fastsgd: cannot allocate " + std::to_string(bytes) +
                               " bytes of optimizer state on cuda:" + std::to_string(device_) + " (" +
                               error_text(e) + ")");
    }
    // Zeroed on the stream the next step orders itself after (see order_after_last_use).
    order_after_last_use();
    const cudaError_t m = cudaMemsetAsync(p, 0, size, stream_);
    if (m != cudaSuccess) {
      cudaFree(p);
      fail(m, "cudaMemsetAsync");
    }
    used_stream(stream_);
    return p;
  }

  void release(void* p) noexcept override {
    if (!p) return;
    int previous = -1;
    if (cudaGetDevice(&previous) == cudaSuccess && previous != device_) cudaSetDevice(device_);
    cudaFree(p);  // waits for the device; errors at process exit (runtime unloading) are ignored
    if (previous >= 0 && previous != device_) cudaSetDevice(previous);
    cudaGetLastError();
  }

  void copy_to_host(void* host_dst, const void* src, int64_t bytes) override {
    DeviceGuard guard(device_);
    order_after_last_use();
    check(cudaMemcpyAsync(host_dst, src, size_t(bytes), cudaMemcpyDeviceToHost, stream_), "cudaMemcpyAsync");
    used_stream(stream_);
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  void copy_from_host(void* dst, const void* host_src, int64_t bytes) override {
    DeviceGuard guard(device_);
    order_after_last_use();
    check(cudaMemcpyAsync(dst, host_src, size_t(bytes), cudaMemcpyHostToDevice, stream_), "cudaMemcpyAsync");
    used_stream(stream_);
    // The host buffer may be freed as soon as we return.
    check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
  }

  // Sums of squares and the non-finite flag of every task with a gradient, copied to the
  // host: this synchronises the launch stream (the engine decides on the host).
  void measure(detail::StepPlan& plan) override {
    DeviceGuard guard(device_);
    refuse_capture(stream_);
    launches_.build_measure(plan);
    if (launches_.norm_rows > 0) {
      check_clean();
      order_after_last_use();
      reserve_scratch();
      Runner runner{this};
      run_measure(launches_, runner);
      used_stream(stream_);
      const cudaError_t e = cudaGetLastError();
      if (e != cudaSuccess) fail(e, "a gradient-measuring kernel launch");
      host_rows_.resize(size_t(launches_.norm_rows));
      check(cudaMemcpyAsync(host_rows_.data(), sums_, host_rows_.size() * sizeof(Pair), cudaMemcpyDeviceToHost,
                            stream_),
            "cudaMemcpyAsync (measured sums)");
      check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize (measured sums)");
    }
    collect_measure(launches_, host_rows_.data(), plan.measured);
  }

  void execute(detail::StepPlan& plan) override {
    if (plan.tasks.empty()) return;
    DeviceGuard guard(device_);
    refuse_capture(stream_);
    const bool host_clip = host_clip_coefficients(plan);
    launches_.build(plan, plan.norm_clip != detail::NormClip::none && !host_clip);
    check_clean();
    order_after_last_use();
    if (launches_.device_clip) reserve_scratch();
    Runner runner{this};
    run_step(launches_, runner);
    used_stream(stream_);
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess)
      fail(e, "pass launch " + std::to_string(runner.passes) + " of " + std::to_string(launches_.pass_count) +
                  " (the variables of earlier launches of this step may already be updated)");
  }

  void set_stream(uintptr_t stream) override { stream_ = reinterpret_cast<cudaStream_t>(stream); }

  void wait_for_stream(uintptr_t producer) override {
    const auto s = reinterpret_cast<cudaStream_t>(producer);
    DeviceGuard guard(device_);
    refuse_capture(s);
    if (!producer_event_)
      check(cudaEventCreateWithFlags(&producer_event_, cudaEventDisableTiming), "cudaEventCreate");
    check(cudaEventRecord(producer_event_, s), "cudaEventRecord (producer stream)");
    producer_pending_ = true;
  }

 private:
  // Launches through the kernel table, with the scratch tables of this backend.
  // A launch failure stops the sequence at once (the step is then reported as failed).
  struct Runner {
    CudaBackend* self;
    size_t passes = 0;
    void sum_squares(Combo c, bool merge, const LaunchMeta& meta, const StepScalars& s) {
      launchers(c).sum_squares(merge, meta, s, self->partials_, self->stream_);
    }
    void tensor_norms(const LaunchMeta& meta, bool per_tensor, double clipnorm) {
      launch_tensor_norms(meta, per_tensor, clipnorm, self->partials_, self->sums_, self->clip_, self->stream_);
    }
    void global_clip(int32_t rows, double clipnorm, bool narrow) {
      launch_global_clip(rows, clipnorm, narrow, self->sums_, self->clip_, self->stream_);
    }
    void pass(Combo c, const PassVariant& v, const LaunchMeta& meta, const StepScalars& s, bool uses_clip) {
      const cudaError_t before = cudaPeekAtLastError();
      if (before != cudaSuccess) return;  // reported by execute() with the launch count
      launchers(c).pass(v, meta, s, uses_clip ? self->clip_ : nullptr, self->stream_);
      ++passes;
    }
  };

  // An error left by an earlier call (e.g. a sticky launch failure) fails the step before it
  // writes anything.
  static void check_clean() {
    const cudaError_t e = cudaGetLastError();
    if (e != cudaSuccess) fail(e, "an earlier CUDA call (nothing of this step ran)");
  }

  [[noreturn]] static void refuse_captured(cudaStream_t s) {
    char handle[32];
    std::snprintf(handle, sizeof(handle), "0x%llx", static_cast<unsigned long long>(reinterpret_cast<uintptr_t>(s)));
    throw ValueError(std::string("stream ") + handle +
                     " is capturing a CUDA graph: fastsgd cannot be captured, because a replay would reuse "
                     "the learning rate, EMA factors and accumulation phase of the captured call and would not "
                     "advance the optimizer's iteration counters; run the optimizer step outside the capture");
  }

  static void refuse_capture(cudaStream_t s) {
    if (capturing(s)) refuse_captured(s);
  }

  // Work we enqueued earlier (steps, slot zeroing and copies) touched the slots and the
  // scratch; when the caller switches streams, the new stream waits for the old one. The
  // producer's stream (wait_for_stream) is waited for once, by the next launches.
  // Note: if the last stream was destroyed since, cudaEventRecord on it is an error -- the
  // caller must keep a stream alive until work queued on it by a step is ordered elsewhere.
  void order_after_last_use() {
    if (producer_pending_) {
      check(cudaStreamWaitEvent(stream_, producer_event_, 0), "cudaStreamWaitEvent (producer stream)");
      producer_pending_ = false;
    }
    if (!has_last_ || last_stream_ == stream_) return;
    if (!handoff_) check(cudaEventCreateWithFlags(&handoff_, cudaEventDisableTiming), "cudaEventCreate");
    check(cudaEventRecord(handoff_, last_stream_), "cudaEventRecord");
    check(cudaStreamWaitEvent(stream_, handoff_, 0), "cudaStreamWaitEvent");
  }

  // Whether `s` is capturing; querying the legacy stream while another stream of the device
  // captures in global mode is itself an error, which also means a capture is going on.
  static bool capturing(cudaStream_t s) {
    cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
    const cudaError_t e = cudaStreamIsCapturing(s, &status);
    if (e != cudaSuccess) {
      cudaGetLastError();
      return e == cudaErrorStreamCaptureImplicit || e == cudaErrorStreamCaptureUnsupported;
    }
    return status != cudaStreamCaptureStatusNone;
  }

  void used_stream(cudaStream_t s) {
    last_stream_ = s;
    has_last_ = true;
  }

  // Partials (one per chunk), per-tensor sums and the clip table, in one allocation.
  void reserve_scratch() {
    // In doubles: two per chunk partial and per row, two per clip row.
    const size_t need =
        2 * size_t(launches_.norm_chunks) + 2 * size_t(launches_.norm_rows) + 2 * size_t(launches_.clip_rows());
    if (need > scratch_doubles_) {
      if (scratch_) {
        // Earlier steps may still read it; only happens when a step outgrows all before it.
        check(cudaStreamSynchronize(stream_), "cudaStreamSynchronize");
        cudaFree(scratch_);
        scratch_ = nullptr;
        scratch_doubles_ = 0;
      }
      const size_t grown = need + need / 2;
      void* p = nullptr;
      check(cudaMalloc(&p, grown * sizeof(double)), "cudaMalloc (norm scratch)");
      scratch_ = static_cast<double*>(p);
      scratch_doubles_ = grown;
    }
    partials_ = reinterpret_cast<Pair*>(scratch_);
    sums_ = partials_ + launches_.norm_chunks;
    clip_ = reinterpret_cast<double*>(sums_ + launches_.norm_rows);
  }

  int device_;
  cudaStream_t stream_ = nullptr;  // 0: the legacy default stream
  cudaStream_t last_stream_ = nullptr;
  bool has_last_ = false;
  cudaEvent_t handoff_ = nullptr;
  double* scratch_ = nullptr;
  size_t scratch_doubles_ = 0;
  Pair* partials_ = nullptr;
  Pair* sums_ = nullptr;
  double* clip_ = nullptr;
  cudaEvent_t producer_event_ = nullptr;
  bool producer_pending_ = false;
  std::vector<Pair> host_rows_;  // measure(): the rows copied out
  StepLaunches launches_;
};

}  // namespace
}  // namespace gpu

namespace detail {

std::unique_ptr<Backend> make_cuda_backend(int device_index) {
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    throw ValueError("CUDA tensors need a working NVIDIA driver and GPU, but the CUDA runtime reports " +
                     gpu::error_text(e) + ". This fastsgd uses the CUDA " + gpu::runtime_version_text() +
                     " runtime, which needs driver 580 or newer");
  }
  if (device_index < 0 || device_index >= count)
    throw ValueError("cuda:" + std::to_string(device_index) + " is not a visible CUDA device (" +
                     std::to_string(count) + " visible)");
  return std::make_unique<gpu::CudaBackend>(device_index);
}

}  // namespace detail

CudaInfo cuda_info() {
  CudaInfo info;
  info.built = true;
  int count = 0;
  const cudaError_t e = cudaGetDeviceCount(&count);
  if (e != cudaSuccess) {
    cudaGetLastError();
    info.status = "CUDA built, no device (" + gpu::error_text(e) + ")";
    return info;
  }
  if (count == 0) {
    info.status = "CUDA built, no device (0 devices visible)";
    return info;
  }
  info.device_count = count;
  std::string s = "CUDA built, " + std::to_string(count) + " device(s): ";
  for (int i = 0; i < count; ++i) {
    cudaDeviceProp prop{};
    if (cudaGetDeviceProperties(&prop, i) != cudaSuccess) {
      cudaGetLastError();
      s += (i ? "; " : "") + std::string("cuda:") + std::to_string(i) + " (properties unavailable)";
      continue;
    }
    s += (i ? "; " : "") + std::string("cuda:") + std::to_string(i) + " " + prop.name + " (sm_" +
         std::to_string(prop.major) + std::to_string(prop.minor) + ")";
  }
  int driver = 0;
  cudaDriverGetVersion(&driver);
  s += "; runtime " + gpu::runtime_version_text() + ", driver " + std::to_string(driver / 1000) + "." +
       std::to_string((driver % 1000) / 10);
  info.status = s;
  return info;
}

}  // namespace fastsgd

// Non-owning views of flat, contiguous buffers: the only form in which fastsgd sees tensors.
// A view says where the elements are, how many, of which type, and on which device; it never
// frees anything. Frameworks' tensors (NumPy, DLPack producers) become views in the binding.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>

#include "fastsgd/dtype.h"

namespace fastsgd {

enum class DeviceKind : int32_t { cpu = 1, cuda = 2 };

struct Device {
  DeviceKind kind = DeviceKind::cpu;
  int32_t index = 0;
  bool operator==(const Device& o) const { return kind == o.kind && index == o.index; }
  bool operator!=(const Device& o) const { return !(*this == o); }
};

inline std::string device_name(Device d) {
  return d.kind == DeviceKind::cpu ? std::string("cpu") : "cuda:" + std::to_string(d.index);
}

struct TensorView {
  void* data = nullptr;  // first element (any byte offset already applied)
  int64_t numel = 0;
  DType dtype = DType::float32;
  Device device{};

  int64_t nbytes() const { return numel * dtype_size(dtype); }
};

// Bad input from the caller. The binding maps these to Python's TypeError / ValueError.
struct TypeError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};
struct ValueError : std::invalid_argument {
  using std::invalid_argument::invalid_argument;
};

}  // namespace fastsgd

// fastsgd's own declarations of the DLPack ABI (dmlc/dlpack, v1.3), so that neither the build
// nor embedders depend on a framework's copy of dlpack.h. Only what a consumer needs is
// declared; the static_asserts pin the layout the specification fixes for LP64 platforms.
#pragma once

#include <cstddef>
#include <cstdint>

namespace fastsgd {
namespace dlpack {

enum DeviceType : int32_t { kCPU = 1, kCUDA = 2, kCUDAHost = 3, kROCM = 10, kCUDAManaged = 13 };
enum DataTypeCode : uint8_t { kInt = 0, kUInt = 1, kFloat = 2, kBfloat = 4 };

struct Device {
  int32_t device_type;
  int32_t device_id;
};

struct DataType {
  uint8_t code;
  uint8_t bits;
  uint16_t lanes;
};

struct Tensor {
  void* data;
  Device device;
  int32_t ndim;
  DataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; may be NULL (compact row-major) before DLPack 1.2
  uint64_t byte_offset;
};

struct ManagedTensor {  // legacy capsule "dltensor"
  Tensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(ManagedTensor* self);
};

struct Version {
  uint32_t major;
  uint32_t minor;
};

constexpr uint64_t kFlagReadOnly = 1ull << 0;
constexpr uint64_t kFlagIsCopied = 1ull << 1;

struct ManagedTensorVersioned {  // capsule "dltensor_versioned"
  Version version;
  void* manager_ctx;
  void (*deleter)(ManagedTensorVersioned* self);
  uint64_t flags;
  Tensor dl_tensor;
};

// The DLPack 1.3 C exchange API, published by a tensor type as
// type(t).__dlpack_c_exchange_api__ (a capsule named "dlpack_exchange_api").
struct ExchangeAPIHeader {
  Version version;
  ExchangeAPIHeader* prev_api;
};

struct ExchangeAPI {
  ExchangeAPIHeader header;
  int (*managed_tensor_allocator)(Tensor* prototype, ManagedTensorVersioned** out, void* error_ctx,
                                  void (*set_error)(void* error_ctx, const char* kind, const char* message));
  int (*managed_tensor_from_py_object_no_sync)(void* py_object, ManagedTensorVersioned** out);
  int (*managed_tensor_to_py_object_no_sync)(ManagedTensorVersioned* tensor, void** out_py_object);
  int (*dltensor_from_py_object_no_sync)(void* py_object, Tensor* out);  // may be NULL
  int (*current_work_stream)(int32_t device_type, int32_t device_id, void** out_stream);
};

static_assert(sizeof(Device) == 8, "DLDevice layout");
static_assert(sizeof(DataType) == 4, "DLDataType layout");
static_assert(sizeof(Tensor) == 48 && offsetof(Tensor, shape) == 24 && offsetof(Tensor, byte_offset) == 40,
              "DLTensor layout");
static_assert(sizeof(ManagedTensor) == 64 && offsetof(ManagedTensor, deleter) == 56, "DLManagedTensor layout");
static_assert(sizeof(ManagedTensorVersioned) == 80 && offsetof(ManagedTensorVersioned, flags) == 24 &&
                  offsetof(ManagedTensorVersioned, dl_tensor) == 32,
              "DLManagedTensorVersioned layout");
static_assert(sizeof(ExchangeAPI) == 56, "DLPackExchangeAPI layout");

}  // namespace dlpack
}  // namespace fastsgd

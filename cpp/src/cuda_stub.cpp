// Stand-ins used when fastsgd is built without CUDA: CUDA variables get a clear error.
#include <stdexcept>

#include "backend.h"
#include "fastsgd/sgd.h"

namespace fastsgd {
namespace detail {
std::unique_ptr<Backend> make_cuda_backend(int) {
  throw ValueError("this fastsgd was built without CUDA support (FASTSGD_CUDA=OFF or no nvcc at build time); "
                   "CUDA tensors cannot be updated");
}
}  // namespace detail

CudaInfo cuda_info() {
  CudaInfo info;
  info.status = "CUDA not built";
  return info;
}
}  // namespace fastsgd

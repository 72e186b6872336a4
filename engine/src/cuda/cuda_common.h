// CUDA error handling and device memory for the CUDA backend.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_cat.h"

namespace sala::cuda {

inline absl::Status CudaStatus(cudaError_t e, const char* what) {
  if (e == cudaSuccess) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

#define SALA_CUDA_RETURN_IF_ERROR(expr)                                   \
  do {                                                                    \
    cudaError_t sala_cuda_err_ = (expr);                                  \
    if (sala_cuda_err_ != cudaSuccess) return ::sala::cuda::CudaStatus(sala_cuda_err_, #expr); \
  } while (0)

// Checked after each launch: catches bad launch configurations at once.
#define SALA_CUDA_CHECK_LAUNCH() SALA_CUDA_RETURN_IF_ERROR(cudaGetLastError())

// An owning device allocation.
template <typename T>
class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { if (ptr_) cudaFree(ptr_); }
  DeviceBuffer(DeviceBuffer&& o) noexcept : ptr_(std::exchange(o.ptr_, nullptr)), n_(std::exchange(o.n_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      if (ptr_) cudaFree(ptr_);
      ptr_ = std::exchange(o.ptr_, nullptr);
      n_ = std::exchange(o.n_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // Makes room for `n` elements; keeps the first `keep` elements when it reallocates.
  absl::Status Reserve(size_t n, size_t keep = 0) {
    if (n <= n_) return absl::OkStatus();
    T* p = nullptr;
    if (const cudaError_t e = cudaMalloc(&p, n * sizeof(T)); e != cudaSuccess) {
      cudaGetLastError();  // an allocation failure must not surface again at the next launch check
      return CudaStatus(e, "cudaMalloc");
    }
    if (ptr_ && keep) SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(p, ptr_, keep * sizeof(T), cudaMemcpyDeviceToDevice));
    if (ptr_) cudaFree(ptr_);
    ptr_ = p;
    n_ = n;
    return absl::OkStatus();
  }
  T* get() const { return ptr_; }
  size_t size() const { return n_; }

 private:
  T* ptr_ = nullptr;
  size_t n_ = 0;
};

// Number of CUDA devices; 0 when there is no GPU or driver.
int DeviceCount();

// The current device's multiprocessors: launch shapes that must fill the GPU follow it.
inline absl::StatusOr<int> MultiprocessorCount() {
  int device = 0, sms = 0;
  SALA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  SALA_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  return sms;
}

// Whether the current device runs the sm_90a kernels (warpgroup MMA): compute capability 9.0
// exactly, since sm_90a code runs on no other device.
inline absl::StatusOr<bool> HasWgmma() {
  int device = 0, major = 0, minor = 0;
  SALA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  SALA_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
  SALA_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
  return major == 9 && minor == 0;
}

}  // namespace sala::cuda

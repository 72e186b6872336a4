#include "kv_pool.h"

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>

#include "absl/strings/str_cat.h"
#include "cuda_common.h"
#include "driver_api.h"
#include "sala/status_macros.h"

namespace sala::cuda {
namespace {

size_t RoundUp(size_t x, size_t to) { return (x + to - 1) / to * to; }

}  // namespace

absl::StatusOr<std::shared_ptr<KvPool>> KvPool::Create(int slots, size_t row_elems, size_t max_bytes) {
  if (slots <= 0 || row_elems == 0) return absl::InvalidArgumentError("a KV pool needs sparse layers with rows");
  SALA_ASSIGN_OR_RETURN(const DriverApi* drv, GetDriverApi());
  std::shared_ptr<KvPool> pool(new KvPool(slots, row_elems));
  SALA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&pool->device_));
  const CUmemAllocationProp prop = DeviceMemoryProp(pool->device_);
  SALA_RETURN_IF_ERROR(DriverStatus(drv->granularity(&pool->granularity_, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
                                    "cuMemGetAllocationGranularity"));
  if (max_bytes == 0) {
    size_t free_bytes = 0, total = 0;
    SALA_CUDA_RETURN_IF_ERROR(cudaMemGetInfo(&free_bytes, &total));
    max_bytes = total;
  }
  pool->reserved_ = RoundUp(std::max(max_bytes, pool->page_bytes()), pool->granularity_);
  CUdeviceptr base = 0;
  SALA_RETURN_IF_ERROR(DriverStatus(drv->reserve(&base, pool->reserved_, 0, 0, 0), "cuMemAddressReserve"));
  pool->base_ = reinterpret_cast<__nv_bfloat16*>(base);
  return pool;
}

KvPool::~KvPool() {
  auto drv = GetDriverApi();
  if (!drv.ok() || base_ == nullptr) return;
  // Nothing may still read the pages: the sequences that held them are gone, but their last
  // kernels may not be.
  cudaDeviceSynchronize();
  const CUdeviceptr base = reinterpret_cast<CUdeviceptr>(base_);
  size_t at = 0;
  for (size_t i = 0; i < handles_.size(); ++i) {
    (*drv)->unmap(base + at, handle_bytes_[i]);
    (*drv)->release(CUmemGenericAllocationHandle(handles_[i]));
    at += handle_bytes_[i];
  }
  (*drv)->address_free(base, reserved_);
}

absl::Status KvPool::BackUpTo(size_t bytes) {
  if (bytes <= backed_) return absl::OkStatus();
  if (bytes > reserved_)
    return absl::ResourceExhaustedError(absl::StrCat("the KV pool is full: ", reserved_ >> 20, " MiB in ",
                                                     reserved_ / page_bytes(), " pages"));
  SALA_ASSIGN_OR_RETURN(const DriverApi* drv, GetDriverApi());
  const CUmemAllocationProp prop = DeviceMemoryProp(device_);
  // Grown geometrically (a quarter at a time, 64 MiB at least) so that a long context maps
  // few pieces; what the device cannot give at that size it may still give exactly.
  const size_t need = RoundUp(bytes - backed_, granularity_);
  size_t step = std::min(reserved_ - backed_, RoundUp(std::max({need, backed_ / 4, size_t(64) << 20}), granularity_));
  CUmemGenericAllocationHandle handle = 0;
  CUresult r = drv->create(&handle, step, &prop, 0);
  if (r == CUDA_ERROR_OUT_OF_MEMORY && step > need) r = drv->create(&handle, step = need, &prop, 0);
  SALA_RETURN_IF_ERROR(DriverStatus(r, "cuMemCreate (KV pool)"));
  const CUdeviceptr at = reinterpret_cast<CUdeviceptr>(base_) + backed_;
  r = drv->map(at, step, 0, handle, 0);
  if (r != CUDA_SUCCESS) {
    drv->release(handle);
    return DriverStatus(r, "cuMemMap (KV pool)");
  }
  CUmemAccessDesc access{};
  access.location = prop.location;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  r = drv->set_access(at, step, &access, 1);
  if (r != CUDA_SUCCESS) {
    drv->unmap(at, step);
    drv->release(handle);
    return DriverStatus(r, "cuMemSetAccess (KV pool)");
  }
  handles_.push_back(uint64_t(handle));
  handle_bytes_.push_back(step);
  backed_ += step;
  return absl::OkStatus();
}

absl::Status KvPool::Allocate(size_t n, std::vector<int>& pages) {
  std::lock_guard<std::mutex> lock(mu_);
  const size_t reused = std::min(n, free_.size()), fresh = n - reused;
  if (fresh) SALA_RETURN_IF_ERROR(BackUpTo((size_t(next_page_) + fresh) * page_bytes()));
  for (size_t i = 0; i < reused; ++i) {
    pages.push_back(free_.back());
    free_.pop_back();
  }
  for (size_t i = 0; i < fresh; ++i) pages.push_back(next_page_++);
  return absl::OkStatus();
}

void KvPool::Free(const int* pages, size_t n) {
  std::lock_guard<std::mutex> lock(mu_);
  // Reversed, so that the next allocation takes them back in their order (runs stay runs).
  for (size_t i = n; i > 0; --i) free_.push_back(pages[i - 1]);
}

size_t KvPool::pages_in_use() const {
  std::lock_guard<std::mutex> lock(mu_);
  return size_t(next_page_) - free_.size();
}

size_t KvPool::bytes_backed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return backed_;
}

}  // namespace sala::cuda

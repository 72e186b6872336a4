// The CUDA driver calls the engine makes beyond the runtime (virtual memory, memory shared
// between processes, stream memory operations, TMA tensor maps), looked up through the runtime:
// binaries then need no libcuda at link time and still start on machines without a GPU driver.
#pragma once

#include <cuda.h>

#include "absl/status/statusor.h"
#include "sala/status_macros.h"

namespace sala::cuda {

struct DriverApi {
  decltype(&cuMemGetAllocationGranularity) granularity = nullptr;
  decltype(&cuMemAddressReserve) reserve = nullptr;
  decltype(&cuMemAddressFree) address_free = nullptr;
  decltype(&cuMemCreate) create = nullptr;
  decltype(&cuMemRelease) release = nullptr;
  decltype(&cuMemMap) map = nullptr;
  decltype(&cuMemUnmap) unmap = nullptr;
  decltype(&cuMemSetAccess) set_access = nullptr;
  decltype(&cuMemExportToShareableHandle) export_handle = nullptr;
  decltype(&cuMemImportFromShareableHandle) import_handle = nullptr;
  decltype(&cuStreamWriteValue64) write_value64 = nullptr;
  decltype(&cuStreamWaitValue64) wait_value64 = nullptr;
  decltype(&cuPointerGetAttribute) pointer_attribute = nullptr;
  decltype(&cuTensorMapEncodeTiled) tensor_map_encode_tiled = nullptr;
};

// FAILED_PRECONDITION where the driver lacks one of the calls.
absl::StatusOr<const DriverApi*> GetDriverApi();

// A driver error as a status; out of memory is RESOURCE_EXHAUSTED.
absl::Status DriverStatus(CUresult r, const char* what);

// Properties of pinned memory on `device`; `shareable` asks for a POSIX file descriptor handle
// that another process can import.
CUmemAllocationProp DeviceMemoryProp(int device, bool shareable = false);

// A bf16 tensor of `Rank` dimensions (innermost first; strides in bytes of dimensions 1 ..) as
// a TMA tensor map whose boxes land in the 128-byte swizzle that the warpgroup MMAs read (a box
// row of 64 values); reads past the dimensions return zeros.
template <int Rank>
absl::StatusOr<CUtensorMap> Bf16TensorMap(const void* base, const cuuint64_t (&dims)[Rank],
                                          const cuuint64_t (&strides)[Rank - 1], const cuuint32_t (&box)[Rank]) {
  SALA_ASSIGN_OR_RETURN(const DriverApi* driver, GetDriverApi());
  CUtensorMap map{};
  cuuint32_t element_strides[Rank];
  for (cuuint32_t& e : element_strides) e = 1;
  SALA_RETURN_IF_ERROR(DriverStatus(
      driver->tensor_map_encode_tiled(&map, CU_TENSOR_MAP_DATA_TYPE_BFLOAT16, Rank, const_cast<void*>(base), dims,
                                      strides, box, element_strides, CU_TENSOR_MAP_INTERLEAVE_NONE,
                                      CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                                      CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE),
      "cuTensorMapEncodeTiled"));
  return map;
}

}  // namespace sala::cuda

// The CUDA driver calls the engine makes beyond the runtime (virtual memory, memory shared
// between processes, stream memory operations, TMA tensor maps), looked up through the runtime:
// binaries then need no libcuda at link time and still start on machines without a GPU driver.
#pragma once

#include <cuda.h>

#include "absl/status/statusor.h"

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

}  // namespace sala::cuda

#include "driver_api.h"

#include <cuda_runtime.h>

#include <type_traits>

#include "absl/strings/str_cat.h"
#include "sala/status_macros.h"

namespace sala::cuda {
namespace {

absl::StatusOr<DriverApi> LoadDriverApi() {
  DriverApi d;
  auto get = [](const char* name, auto& fn) -> absl::Status {
    void* p = nullptr;
    cudaDriverEntryPointQueryResult found = cudaDriverEntryPointSymbolNotFound;
    const cudaError_t e = cudaGetDriverEntryPointByVersion(name, &p, 12000, cudaEnableDefault, &found);
    if (e != cudaSuccess || found != cudaDriverEntryPointSuccess || p == nullptr) {
      cudaGetLastError();
      return absl::FailedPreconditionError(absl::StrCat("the CUDA driver does not provide ", name));
    }
    fn = reinterpret_cast<std::remove_reference_t<decltype(fn)>>(p);
    return absl::OkStatus();
  };
  SALA_RETURN_IF_ERROR(get("cuMemGetAllocationGranularity", d.granularity));
  SALA_RETURN_IF_ERROR(get("cuMemAddressReserve", d.reserve));
  SALA_RETURN_IF_ERROR(get("cuMemAddressFree", d.address_free));
  SALA_RETURN_IF_ERROR(get("cuMemCreate", d.create));
  SALA_RETURN_IF_ERROR(get("cuMemRelease", d.release));
  SALA_RETURN_IF_ERROR(get("cuMemMap", d.map));
  SALA_RETURN_IF_ERROR(get("cuMemUnmap", d.unmap));
  SALA_RETURN_IF_ERROR(get("cuMemSetAccess", d.set_access));
  SALA_RETURN_IF_ERROR(get("cuMemExportToShareableHandle", d.export_handle));
  SALA_RETURN_IF_ERROR(get("cuMemImportFromShareableHandle", d.import_handle));
  SALA_RETURN_IF_ERROR(get("cuStreamWriteValue64", d.write_value64));
  SALA_RETURN_IF_ERROR(get("cuStreamWaitValue64", d.wait_value64));
  SALA_RETURN_IF_ERROR(get("cuPointerGetAttribute", d.pointer_attribute));
  SALA_RETURN_IF_ERROR(get("cuTensorMapEncodeTiled", d.tensor_map_encode_tiled));
  return d;
}

}  // namespace

absl::StatusOr<const DriverApi*> GetDriverApi() {
  static const absl::StatusOr<DriverApi> driver = LoadDriverApi();
  if (!driver.ok()) return driver.status();
  return &*driver;
}

absl::Status DriverStatus(CUresult r, const char* what) {
  if (r == CUDA_SUCCESS) return absl::OkStatus();
  if (r == CUDA_ERROR_OUT_OF_MEMORY) return absl::ResourceExhaustedError(absl::StrCat(what, ": out of device memory"));
  return absl::InternalError(absl::StrCat(what, ": CUDA driver error ", int(r)));
}

CUmemAllocationProp DeviceMemoryProp(int device, bool shareable) {
  CUmemAllocationProp prop{};
  prop.type = CU_MEM_ALLOCATION_TYPE_PINNED;
  prop.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  prop.location.id = device;
  if (shareable) prop.requestedHandleTypes = CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR;
  return prop;
}

}  // namespace sala::cuda

// The MLP's gate and up projections with SwiGLU in the epilogue, on Hopper warpgroup MMAs:
// y[rows, ff] = silu(x · w_gateᵀ) * (x · w_upᵀ) in bf16, from fp32 accumulators. cuBLASLt has no
// such epilogue; through it the gate and up products go to memory in bf16 and a separate pass
// reads them back (five bytes moved for every one that this kernel writes).
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace sala::cuda {

// Whether GemmSwiGlu takes these shapes on this device: an sm_90a device, `in` a multiple of 64
// and `ff` of 128 (any number of rows).
bool GemmSwiGluApplies(int64_t in, int64_t ff);

// x [rows, in], w_gate and w_up [ff, in] (the checkpoint's layout), y [rows, ff]; 16-byte aligned.
absl::Status GemmSwiGlu(const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* w_gate,
                        const __nv_bfloat16* w_up, int64_t ff, __nv_bfloat16* y, cudaStream_t stream);

}  // namespace sala::cuda

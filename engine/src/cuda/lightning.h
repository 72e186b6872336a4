// Simple-GLA of the linear layers (MODEL_SPEC §3) on the GPU; fp32 q, k, v, state and output.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda_common.h"

namespace sala::cuda {

// One sequence, T tokens, chunked form: q [T, H, D]; k, v [T, Hkv, D]; state [H, D, D] updated
// in place; o [T, H, D]. `slopes` (device, [H]) gives the log-decay g_h = -slope_h. `scratch`
// holds the per-chunk states (grown as needed; the caller keeps it between calls).
absl::Status LinearAttentionChunked(const float* q, const float* k, const float* v, int64_t T, int heads,
                                    int kv_heads, int dim, float scale, const float* slopes, float* state, float* o,
                                    DeviceBuffer<float>& scratch, cudaStream_t stream);

// One token for each of `batch` sequences: q [B, H, D]; k, v [B, Hkv, D]; states[b] -> [H, D, D].
absl::Status LinearAttentionStep(const float* q, const float* k, const float* v, int batch, int heads, int kv_heads,
                                 int dim, float scale, const float* slopes, float* const* states, float* o,
                                 cudaStream_t stream);

}  // namespace sala::cuda

// A decode step's projections: y[rows, out] = x[rows, in] · w[out, in]ᵀ for a few rows (bf16
// inputs, fp32 accumulation, fp32 or bf16 output), several weights sharing one x in one launch.
//
// At a handful of rows a projection only streams its weights; here a warp per output column (or
// a few) reads its weight rows with 16-byte streaming loads, eight in flight per lane. Measured
// on an H100 over a 9B layer's projections (sala-bench): 2.25-2.5 TB/s at 1-4 rows, against
// 2.15-2.25 for cuBLASLt; from six rows on cuBLASLt is faster, hence kGemvMaxRows. One launch
// for q/k/v/gate and one for gate/up also saves a decode step some 100 launches.
//
// The layers' RMSNorms, the attention outputs' norms and gates, and the residual adds live inside
// the GEMV too (GemvFormed, GemvWeight::add): a norm kernel of one 4096-wide row is all launch
// latency (5-6 us against a 53 us projection), and a decode step had 89 of them.
#pragma once

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"

namespace sala::cuda {

inline constexpr int kGemvMaxRows = 4;
inline constexpr int kGemvMaxWeights = 4;

struct GemvWeight {
  const __nv_bfloat16* w;  // [out, in]
  int64_t out;
  float* y;            // [rows, out], or null when y_bf16 is set
  bool add = false;    // y += scale · x·wᵀ (a residual add) instead of y = scale · x·wᵀ
  float scale = 1.0f;
  __nv_bfloat16* y_bf16 = nullptr;  // instead of y: the result rounded to bf16 (never with add)
};

// (Pointer and count: the CUDA sources are C++17.)
// Whether Gemv takes this shape: few rows, `in` a multiple of 8 and 16-byte aligned operands.
bool GemvApplies(int64_t rows, int64_t in, const __nv_bfloat16* x, const GemvWeight* weights, int count);

// y_i = x · w_iᵀ for every weight (at most kGemvMaxWeights) in one launch.
absl::Status Gemv(const __nv_bfloat16* x, int rows, int64_t in, const GemvWeight* weights, int count,
                  cudaStream_t stream);

// The input formed by each block, in shared memory, from fp32 rows h[rows, in]:
//   x = bf16(h · [rsqrt(mean(h²) + eps) · norm] · post_scale · [sigmoid(gate)])
// (the bracketed factors where norm and gate are given), with the rounding of the kernels it
// replaces: RmsNormToBf16 (the layers' norms) and NormGateToBf16 (the attention outputs).
struct GemvFormedInput {
  const float* h;
  const __nv_bfloat16* norm;  // [in], or null: no norm
  const float* gate;          // [rows, in], or null: no gate
  float eps;
  float post_scale = 1.0f;
};
// Whether GemvFormed takes this shape: GemvApplies, and the rows fit in shared memory.
bool GemvFormedApplies(int64_t rows, int64_t in, const GemvFormedInput& input, const GemvWeight* weights,
                       int count);
absl::Status GemvFormed(const GemvFormedInput& input, int rows, int64_t in, const GemvWeight* weights, int count,
                        cudaStream_t stream);

}  // namespace sala::cuda

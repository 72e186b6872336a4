// bf16 GEMMs with fp32 accumulation and fp32 (or, per weight, bf16) output:
// y[rows, out] = x[rows, in] · w[out, in]ᵀ (weights stored [out, in], as in the checkpoint).
// cuBLASLt, except for a decode step's few rows, which go to the GEMV kernel (gemv.h).
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>

#include <map>
#include <span>
#include <tuple>

#include "absl/status/statusor.h"
#include "cuda_common.h"
#include "gemv.h"

namespace sala::cuda {

class Gemm {
 public:
  Gemm();
  ~Gemm();
  absl::Status Init();
  absl::Status Run(const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* w, int64_t out, float* y,
                   cudaStream_t stream);
  // y += scale · x · wᵀ: a residual add in the projection's epilogue.
  absl::Status RunAdd(const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* w, int64_t out,
                      float scale, float* y, cudaStream_t stream);
  // Several weights over the same x: one launch when the GEMV takes them, else one GEMM each.
  absl::Status RunMany(const __nv_bfloat16* x, int64_t rows, int64_t in, std::span<const GemvWeight> weights,
                       cudaStream_t stream);
  // Always cuBLASLt (benchmarks compare it with the GEMV).
  absl::Status RunLt(const __nv_bfloat16* x, int64_t rows, int64_t in, const GemvWeight& w, cudaStream_t stream);

 private:
  struct Plan {
    cublasLtMatmulDesc_t op = nullptr;
    cublasLtMatrixLayout_t a = nullptr, b = nullptr, c = nullptr;
    cublasLtMatmulAlgo_t algo;
  };
  absl::StatusOr<Plan*> PlanFor(int64_t rows, int64_t in, int64_t out, bool bf16_out);
  cublasLtHandle_t handle_ = nullptr;
  DeviceBuffer<char> workspace_;
  std::map<std::tuple<int64_t, int64_t, int64_t, bool>, Plan> plans_;
};

}  // namespace sala::cuda

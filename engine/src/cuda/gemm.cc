#include "gemm.h"

#include "sala/status_macros.h"

namespace sala::cuda {
namespace {

constexpr size_t kWorkspaceBytes = 32 << 20;

absl::Status LtStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrCat(what, ": cuBLAS status ", int(s)));
}

#define SALA_LT(expr) \
  if (auto st_ = LtStatus((expr), #expr); !st_.ok()) return st_

}  // namespace

Gemm::Gemm() = default;

Gemm::~Gemm() {
  for (auto& [k, p] : plans_) {
    cublasLtMatrixLayoutDestroy(p.a);
    cublasLtMatrixLayoutDestroy(p.b);
    cublasLtMatrixLayoutDestroy(p.c);
    cublasLtMatmulDescDestroy(p.op);
  }
  if (handle_) cublasLtDestroy(handle_);
}

absl::Status Gemm::Init() {
  SALA_LT(cublasLtCreate(&handle_));
  return workspace_.Reserve(kWorkspaceBytes);
}

absl::StatusOr<Gemm::Plan*> Gemm::PlanFor(int64_t rows, int64_t in, int64_t out, bool bf16_out) {
  auto key = std::make_tuple(rows, in, out, bf16_out);
  auto it = plans_.find(key);
  if (it != plans_.end()) return &it->second;
  // Column-major view: Yᵀ (out × rows) = W (in × out)ᵀ · Xᵀ (in × rows).
  Plan p;
  SALA_LT(cublasLtMatmulDescCreate(&p.op, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transa = CUBLAS_OP_T, transb = CUBLAS_OP_N;
  SALA_LT(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSA, &transa, sizeof(transa)));
  SALA_LT(cublasLtMatmulDescSetAttribute(p.op, CUBLASLT_MATMUL_DESC_TRANSB, &transb, sizeof(transb)));
  SALA_LT(cublasLtMatrixLayoutCreate(&p.a, CUDA_R_16BF, in, out, in));
  SALA_LT(cublasLtMatrixLayoutCreate(&p.b, CUDA_R_16BF, in, rows, in));
  SALA_LT(cublasLtMatrixLayoutCreate(&p.c, bf16_out ? CUDA_R_16BF : CUDA_R_32F, out, rows, out));
  cublasLtMatmulPreference_t pref;
  SALA_LT(cublasLtMatmulPreferenceCreate(&pref));
  const size_t ws = kWorkspaceBytes;
  SALA_LT(cublasLtMatmulPreferenceSetAttribute(pref, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &ws, sizeof(ws)));
  cublasLtMatmulHeuristicResult_t result;
  int found = 0;
  const cublasStatus_t hs = cublasLtMatmulAlgoGetHeuristic(handle_, p.op, p.a, p.b, p.c, p.c, pref, 1, &result, &found);
  cublasLtMatmulPreferenceDestroy(pref);
  SALA_LT(hs);
  if (found == 0) return absl::InternalError(absl::StrCat("cuBLASLt has no algorithm for ", rows, "x", in, "x", out));
  p.algo = result.algo;
  return &plans_.emplace(key, p).first->second;
}

absl::Status Gemm::Run(const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* w, int64_t out,
                       float* y, cudaStream_t stream) {
  const GemvWeight one{w, out, y};
  return RunMany(x, rows, in, {&one, 1}, stream);
}

absl::Status Gemm::RunAdd(const __nv_bfloat16* x, int64_t rows, int64_t in, const __nv_bfloat16* w, int64_t out,
                          float scale, float* y, cudaStream_t stream) {
  const GemvWeight one{w, out, y, /*add=*/true, scale};
  return RunMany(x, rows, in, {&one, 1}, stream);
}

absl::Status Gemm::RunMany(const __nv_bfloat16* x, int64_t rows, int64_t in, std::span<const GemvWeight> weights,
                           cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  if (GemvApplies(rows, in, x, weights.data(), int(weights.size())))
    return Gemv(x, int(rows), in, weights.data(), int(weights.size()), stream);
  for (const GemvWeight& w : weights) SALA_RETURN_IF_ERROR(RunLt(x, rows, in, w, stream));
  return absl::OkStatus();
}

absl::Status Gemm::RunLt(const __nv_bfloat16* x, int64_t rows, int64_t in, const GemvWeight& w,
                         cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  const bool bf16_out = w.y_bf16 != nullptr;
  if (bf16_out && w.add) return absl::InvalidArgumentError("a residual add needs an fp32 output");
  auto plan = PlanFor(rows, in, w.out, bf16_out);
  if (!plan.ok()) return plan.status();
  const float alpha = w.scale, beta = w.add ? 1.0f : 0.0f;  // in place: C and D are both y
  Plan* p = *plan;
  void* y = bf16_out ? static_cast<void*>(w.y_bf16) : static_cast<void*>(w.y);
  SALA_LT(cublasLtMatmul(handle_, p->op, &alpha, w.w, p->a, x, p->b, &beta, y, p->c, y, p->c, &p->algo,
                         workspace_.get(), kWorkspaceBytes, stream));
  return absl::OkStatus();
}

}  // namespace sala::cuda

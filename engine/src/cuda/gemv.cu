#include <cstdint>

#include "cuda_common.h"
#include "gemv.h"
#include "warp.cuh"

namespace sala::cuda {
namespace {

constexpr int kWarps = 8;          // warps per block
constexpr int kLoadsInFlight = 8;  // 16-byte weight loads in flight per lane

struct GemvBatch {
  GemvWeight weight[kGemvMaxWeights];
  int64_t first_block[kGemvMaxWeights + 1];  // weight i owns blocks [first_block[i], first_block[i + 1])
  int count;
};

__device__ void Accumulate8(float& acc, uint4 w, uint4 x) {
  const __nv_bfloat162* wp = reinterpret_cast<const __nv_bfloat162*>(&w);
  const __nv_bfloat162* xp = reinterpret_cast<const __nv_bfloat162*>(&x);
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    const float2 a = __bfloat1622float2(wp[i]), b = __bfloat1622float2(xp[i]);
    acc = fmaf(a.x, b.x, acc);
    acc = fmaf(a.y, b.y, acc);
  }
}

// Each warp computes C adjacent columns for the R rows: every x load serves C weight rows, so
// that L1 traffic stays near the weight stream as rows grow.
template <int R, int C>
__global__ void __launch_bounds__(kWarps * 32) GemvKernel(const __nv_bfloat16* x, int64_t in, GemvBatch batch) {
  constexpr int kUnroll = kLoadsInFlight / C;
  int i = 0;
  while (i + 1 < batch.count && blockIdx.x >= batch.first_block[i + 1]) ++i;
  const GemvWeight& wt = batch.weight[i];
  const int lane = threadIdx.x % 32;
  const int64_t n0 = ((blockIdx.x - batch.first_block[i]) * kWarps + threadIdx.x / 32) * C;
  if (n0 >= wt.out) return;
  const int64_t vecs = in / 8;
  const uint4* wr[C];
#pragma unroll
  for (int c = 0; c < C; ++c) wr[c] = reinterpret_cast<const uint4*>(wt.w + min(n0 + c, wt.out - 1) * in);
  const uint4* xr = reinterpret_cast<const uint4*>(x);
  float acc[R][C];
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) acc[r][c] = 0.0f;
  for (int64_t base = 0; base < vecs; base += 32 * kUnroll) {
    // Weights are read once per step: streaming loads keep them from evicting x from the caches.
    uint4 wv[C][kUnroll];
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + u * 32 + lane;
#pragma unroll
      for (int c = 0; c < C; ++c)
        if (v < vecs) wv[c][u] = __ldcs(wr[c] + v);
    }
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + u * 32 + lane;
      if (v >= vecs) continue;
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const uint4 xv = __ldg(xr + r * vecs + v);
#pragma unroll
        for (int c = 0; c < C; ++c) Accumulate8(acc[r][c], wv[c][u], xv);
      }
    }
  }
#pragma unroll
  for (int r = 0; r < R; ++r)
#pragma unroll
    for (int c = 0; c < C; ++c) {
      const float sum = WarpSum(acc[r][c]);
      if (lane == 0 && n0 + c < wt.out) wt.y[r * wt.out + n0 + c] = sum;
    }
}

// Columns per warp by rows: one x load per weight load at one and two rows, at most two above.
constexpr int ColumnsFor(int rows) { return rows == 1 ? 1 : rows <= 3 ? 2 : 4; }

template <int R>
void LaunchRows(const __nv_bfloat16* x, int64_t in, const GemvWeight* weights, int count, cudaStream_t stream) {
  constexpr int C = ColumnsFor(R);
  GemvBatch batch{};
  batch.count = count;
  for (int i = 0; i < count; ++i) {
    batch.weight[i] = weights[i];
    batch.first_block[i + 1] = batch.first_block[i] + (weights[i].out + kWarps * C - 1) / (kWarps * C);
  }
  if (batch.first_block[count] == 0) return;
  GemvKernel<R, C><<<unsigned(batch.first_block[count]), kWarps * 32, 0, stream>>>(x, in, batch);
}

bool Aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool GemvApplies(int64_t rows, int64_t in, const __nv_bfloat16* x, const GemvWeight* weights, int count) {
  if (rows < 1 || rows > kGemvMaxRows || in % 8 != 0 || !Aligned(x)) return false;
  if (count < 1 || count > kGemvMaxWeights) return false;
  for (int i = 0; i < count; ++i)
    if (!Aligned(weights[i].w)) return false;
  return true;
}

absl::Status Gemv(const __nv_bfloat16* x, int rows, int64_t in, const GemvWeight* weights, int count,
                  cudaStream_t stream) {
  if (!GemvApplies(rows, in, x, weights, count))
    return absl::InvalidArgumentError(absl::StrCat("GEMV does not take ", rows, " rows of ", in, " over ", count,
                                                   " weights"));
  switch (rows) {
    case 1: LaunchRows<1>(x, in, weights, count, stream); break;
    case 2: LaunchRows<2>(x, in, weights, count, stream); break;
    case 3: LaunchRows<3>(x, in, weights, count, stream); break;
    default: LaunchRows<4>(x, in, weights, count, stream); break;
  }
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

}  // namespace sala::cuda

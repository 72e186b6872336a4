#include <algorithm>
#include <cstdint>

#include "cuda_common.h"
#include "gemv.h"
#include "activation.cuh"
#include "bf16x4.cuh"
#include "warp.cuh"

namespace sala::cuda {
namespace {

constexpr int kLoadsInFlight = 8;  // 16-byte weight loads in flight per lane

// Warps per block. A block over formed rows forms x once for all of its tiles (the grid is one
// resident wave): bigger blocks mean fewer copies of that prologue.
template <bool kFormed>
constexpr int kWarps = kFormed ? 16 : 8;

struct GemvBatch {
  GemvWeight weight[kGemvMaxWeights];
  int64_t first_block[kGemvMaxWeights + 1];  // weight i owns tiles [first_block[i], first_block[i + 1])
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

// Shared memory for the formed rows (four rows of 4096): within the 48 KiB a launch may take
// without opting in.
constexpr int64_t kFormedBytes = 32 * 1024;

// The block forms the R rows of x in shared memory (GemvFormedInput): per element the arithmetic
// of RmsNormToBf16 and NormGateToBf16.
template <int R, int kBlockWarps>
__device__ void FormRows(const GemvFormedInput& input, int64_t in, __nv_bfloat16* x) {
  __shared__ float partial[R][kBlockWarps];
  const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
  const int64_t vecs = in / 4;
  const float4* h = reinterpret_cast<const float4*>(input.h);
  const float4* gate = reinterpret_cast<const float4*>(input.gate);
  float inv[R];
#pragma unroll
  for (int r = 0; r < R; ++r) inv[r] = input.post_scale;
  if (input.norm) {
    float ss[R];
#pragma unroll
    for (int r = 0; r < R; ++r) ss[r] = 0.0f;
    for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x)
#pragma unroll
      for (int r = 0; r < R; ++r) {
        const float4 a = h[r * vecs + v];
        ss[r] += a.x * a.x + a.y * a.y + a.z * a.z + a.w * a.w;
      }
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float s = WarpSum(ss[r]);
      if (lane == 0) partial[r][warp] = s;
    }
    __syncthreads();
#pragma unroll
    for (int r = 0; r < R; ++r) {
      float total = 0.0f;
#pragma unroll
      for (int w = 0; w < kBlockWarps; ++w) total += partial[r][w];
      inv[r] = rsqrtf(total / float(in) + input.eps) * input.post_scale;
    }
  }
  for (int64_t v = threadIdx.x; v < vecs; v += blockDim.x) {
    float n[4] = {1.0f, 1.0f, 1.0f, 1.0f};
    if (input.norm) LoadBf16x4(input.norm + v * 4, n);
#pragma unroll
    for (int r = 0; r < R; ++r) {
      const float4 a = h[r * vecs + v];
      float e[4] = {a.x * inv[r] * n[0], a.y * inv[r] * n[1], a.z * inv[r] * n[2], a.w * inv[r] * n[3]};
      if (gate) {
        const float4 z = gate[r * vecs + v];
        e[0] *= SigmoidF(z.x), e[1] *= SigmoidF(z.y), e[2] *= SigmoidF(z.z), e[3] *= SigmoidF(z.w);
      }
      StoreBf16x4(x + r * in + v * 4, e);
    }
  }
  __syncthreads();
}

// Each warp computes C adjacent columns for the R rows: every x load serves C weight rows, so
// that L1 traffic stays near the weight stream as rows grow. A block walks tiles of
// kWarps * C columns.
template <int R, int C, bool kFormed>
__global__ void __launch_bounds__(kWarps<kFormed> * 32)
    GemvKernel(const __nv_bfloat16* x, GemvFormedInput formed, int64_t in, GemvBatch batch) {
  constexpr int kUnroll = kLoadsInFlight / C;
  extern __shared__ uint4 formed_rows[];
  const int lane = threadIdx.x % 32;
  const int64_t vecs = in / 8, tiles = batch.first_block[batch.count];
  // This warp's columns in a tile: n0 .. n0 + C - 1 of weight `i`.
  int i = 0;
  int64_t n0 = 0;
  const uint4* wr[C];
  auto columns = [&](int64_t tile) {
    while (i + 1 < batch.count && tile >= batch.first_block[i + 1]) ++i;
    const GemvWeight& wt = batch.weight[i];
    n0 = ((tile - batch.first_block[i]) * kWarps<kFormed> + threadIdx.x / 32) * C;
#pragma unroll
    for (int c = 0; c < C; ++c) wr[c] = reinterpret_cast<const uint4*>(wt.w + min(n0 + c, wt.out - 1) * in);
    return n0 < wt.out;
  };
  // Weights are read once per step: streaming loads keep them from evicting x from the caches.
  uint4 wv[C][kUnroll];
  auto load = [&](int64_t base) {
#pragma unroll
    for (int u = 0; u < kUnroll; ++u) {
      const int64_t v = base + u * 32 + lane;
#pragma unroll
      for (int c = 0; c < C; ++c)
        if (v < vecs) wv[c][u] = __ldcs(wr[c] + v);
    }
  };
  int64_t tile = blockIdx.x;
  bool active = tile < tiles && columns(tile);
  if constexpr (kFormed) {
    if (active) load(0);  // the first weights are in flight while the block forms x
    FormRows<R, kWarps<kFormed>>(formed, in, reinterpret_cast<__nv_bfloat16*>(formed_rows));
    x = reinterpret_cast<const __nv_bfloat16*>(formed_rows);
  } else if (active) {
    load(0);
  }
  const uint4* xr = reinterpret_cast<const uint4*>(x);
  for (; tile < tiles; tile += gridDim.x) {
    if (tile != blockIdx.x) {
      active = columns(tile);
      if (active) load(0);
    }
    if (!active) continue;
    float acc[R][C];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < C; ++c) acc[r][c] = 0.0f;
    for (int64_t base = 0; base < vecs; base += 32 * kUnroll) {
      if (base > 0) load(base);
#pragma unroll
      for (int u = 0; u < kUnroll; ++u) {
        const int64_t v = base + u * 32 + lane;
        if (v >= vecs) continue;
#pragma unroll
        for (int r = 0; r < R; ++r) {
          const uint4 xv = kFormed ? xr[r * vecs + v] : __ldg(xr + r * vecs + v);
#pragma unroll
          for (int c = 0; c < C; ++c) Accumulate8(acc[r][c], wv[c][u], xv);
        }
      }
    }
    const GemvWeight& wt = batch.weight[i];
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
      for (int c = 0; c < C; ++c) {
        const float sum = WarpSum(acc[r][c]) * wt.scale;
        if (lane == 0 && n0 + c < wt.out) {
          const int64_t at = r * wt.out + n0 + c;
          if (wt.y_bf16) {
            wt.y_bf16[at] = __float2bfloat16(sum);
          } else {
            float* y = wt.y + at;
            *y = wt.add ? *y + sum : sum;
          }
        }
      }
  }
}

// Columns per warp by rows: one x load per weight load at one and two rows, at most two above.
constexpr int ColumnsFor(int rows) { return rows == 1 ? 1 : rows <= 3 ? 2 : 4; }

template <int R, bool kFormed>
void LaunchRows(const __nv_bfloat16* x, const GemvFormedInput& formed, int64_t in, const GemvWeight* weights,
                int count, cudaStream_t stream) {
  constexpr int C = ColumnsFor(R), kThreads = kWarps<kFormed> * 32, kTileColumns = kWarps<kFormed> * C;
  GemvBatch batch{};
  batch.count = count;
  for (int i = 0; i < count; ++i) {
    batch.weight[i] = weights[i];
    batch.first_block[i + 1] = batch.first_block[i] + (weights[i].out + kTileColumns - 1) / kTileColumns;
  }
  const int64_t tiles = batch.first_block[count];
  if (tiles == 0) return;
  const size_t smem = kFormed ? size_t(R * in) * sizeof(__nv_bfloat16) : 0;
  int64_t grid = tiles;
  if (kFormed) {
    // One wave of resident blocks (a property of the device and the kernel: asked once).
    static const int64_t resident = [] {
      int device = 0, sms = 0, per_sm = 0;
      cudaGetDevice(&device);
      cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, GemvKernel<R, C, kFormed>, kThreads,
                                                    size_t(kFormedBytes));
      return int64_t(std::max(1, sms * per_sm));
    }();
    grid = std::min(tiles, resident);
  }
  GemvKernel<R, C, kFormed><<<unsigned(grid), kThreads, smem, stream>>>(x, formed, in, batch);
}


bool Aligned(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace

bool GemvApplies(int64_t rows, int64_t in, const __nv_bfloat16* x, const GemvWeight* weights, int count) {
  if (rows < 1 || rows > kGemvMaxRows || in % 8 != 0 || !Aligned(x)) return false;
  if (count < 1 || count > kGemvMaxWeights) return false;
  for (int i = 0; i < count; ++i)
    if (!Aligned(weights[i].w) || (weights[i].y_bf16 && weights[i].add)) return false;
  return true;
}

bool GemvFormedApplies(int64_t rows, int64_t in, const GemvFormedInput& input, const GemvWeight* weights,
                       int count) {
  return GemvApplies(rows, in, input.norm, weights, count) && Aligned(input.h) && Aligned(input.gate) &&
         rows * in * int64_t(sizeof(__nv_bfloat16)) <= kFormedBytes;
}

absl::Status Gemv(const __nv_bfloat16* x, int rows, int64_t in, const GemvWeight* weights, int count,
                  cudaStream_t stream) {
  if (!GemvApplies(rows, in, x, weights, count))
    return absl::InvalidArgumentError(absl::StrCat("GEMV does not take ", rows, " rows of ", in, " over ", count,
                                                   " weights"));
  switch (rows) {
    case 1: LaunchRows<1, false>(x, {}, in, weights, count, stream); break;
    case 2: LaunchRows<2, false>(x, {}, in, weights, count, stream); break;
    case 3: LaunchRows<3, false>(x, {}, in, weights, count, stream); break;
    default: LaunchRows<4, false>(x, {}, in, weights, count, stream); break;
  }
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status GemvFormed(const GemvFormedInput& input, int rows, int64_t in, const GemvWeight* weights, int count,
                        cudaStream_t stream) {
  if (!GemvFormedApplies(rows, in, input, weights, count))
    return absl::InvalidArgumentError(absl::StrCat("the GEMV over formed rows does not take ", rows, " rows of ", in,
                                                   " over ", count, " weights"));
  switch (rows) {
    case 1: LaunchRows<1, true>(nullptr, input, in, weights, count, stream); break;
    case 2: LaunchRows<2, true>(nullptr, input, in, weights, count, stream); break;
    case 3: LaunchRows<3, true>(nullptr, input, in, weights, count, stream); break;
    default: LaunchRows<4, true>(nullptr, input, in, weights, count, stream); break;
  }
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

}  // namespace sala::cuda

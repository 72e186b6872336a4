#include <algorithm>
#include <cmath>

#include "activation.cuh"
#include "cuda_common.h"
#include "ops.h"
#include "rope.cuh"
#include "sala/status_macros.h"
#include "warp.cuh"

namespace sala::cuda {
namespace {

constexpr int kThreads = 256;

__device__ float BlockSum(float v, float* scratch) {
  v = WarpSum(v);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  const int warps = (blockDim.x + 31) / 32;
  v = WarpSum(lane < warps ? scratch[lane] : 0.0f);
  __syncthreads();
  return v;
}


__global__ void EmbedKernel(const int* ids, const __nv_bfloat16* embed, int width, float scale, float* h) {
  const int64_t row = blockIdx.x;
  const __nv_bfloat16* e = embed + int64_t(ids[row]) * width;
  for (int i = threadIdx.x; i < width; i += blockDim.x) h[row * width + i] = __bfloat162float(e[i]) * scale;
}

// Row kernels hold their row in registers, up to kRowPerThread values per thread: the loads
// are all issued before the reduction waits on them, and the second pass reads no memory.
constexpr int kRowPerThread = 16;
constexpr int kMaxRowWidth = kRowPerThread * 1024;
int RowThreads(int width) { return std::clamp((width / 8 + 31) / 32 * 32, 32, 1024); }
absl::Status CheckRowWidth(int width, const char* what) {
  if (width <= kMaxRowWidth) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(what, " width ", width, " above ", kMaxRowWidth));
}

__global__ void RmsNormKernel(const float* x, int width, const __nv_bfloat16* w, float eps, float post_scale,
                              __nv_bfloat16* y) {
  __shared__ float scratch[32];
  const float* xr = x + int64_t(blockIdx.x) * width;
  float v[kRowPerThread], wv[kRowPerThread];  // the weights' loads overlap the reduction
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kRowPerThread; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    v[k] = i < width ? xr[i] : 0.0f;
    wv[k] = i < width ? __bfloat162float(w[i]) : 0.0f;
    ss += v[k] * v[k];
  }
  const float inv = rsqrtf(BlockSum(ss, scratch) / width + eps) * post_scale;
#pragma unroll
  for (int k = 0; k < kRowPerThread; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i < width) y[int64_t(blockIdx.x) * width + i] = __float2bfloat16(v[k] * inv * wv[k]);
  }
}

// One block per (row, head of q or of k); thread j handles the rotation pair (j, j + dim/2).
// Row r is at position pos0 + r.
__global__ void HeadNormRopeKernel(NormedHeads q, NormedHeads k, int dim, float eps, int64_t pos0, double log2_theta,
                                   bool rope) {
  __shared__ float scratch[32];
  const int half = dim / 2, j = threadIdx.x;
  const bool is_k = int(blockIdx.y) >= q.heads;
  const NormedHeads t = is_k ? k : q;
  const __nv_bfloat16* w = t.weight;
  float* p = t.x + (int64_t(blockIdx.x) * t.heads + (is_k ? blockIdx.y - q.heads : blockIdx.y)) * dim;
  float a = j < half ? p[j] : 0.0f, b = j < half ? p[j + half] : 0.0f;
  if (w) {
    const float inv = rsqrtf(BlockSum(a * a + b * b, scratch) / dim + eps);
    if (j < half) {
      a = a * inv * __bfloat162float(w[j]);
      b = b * inv * __bfloat162float(w[j + half]);
    }
  }
  if (j >= half) return;
  if (rope) RotatePair(a, b, j, dim, pos0 + blockIdx.x, log2_theta);
  p[j] = a;
  p[j + half] = b;
}

__global__ void NormGateKernel(const float* o, const float* z, int width, const __nv_bfloat16* w, float eps,
                               __nv_bfloat16* y) {
  __shared__ float scratch[32];
  const int64_t base = int64_t(blockIdx.x) * width;
  float v[kRowPerThread], wv[kRowPerThread], zv[kRowPerThread];  // all loads before the reduction
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kRowPerThread; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    v[k] = i < width ? o[base + i] : 0.0f;
    wv[k] = i < width && w ? __bfloat162float(w[i]) : 1.0f;
    zv[k] = i < width && z ? z[base + i] : 0.0f;
    ss += v[k] * v[k];
  }
  const float inv = w ? rsqrtf(BlockSum(ss, scratch) / width + eps) : 1.0f;
#pragma unroll
  for (int k = 0; k < kRowPerThread; ++k) {
    const int i = threadIdx.x + k * blockDim.x;
    if (i >= width) continue;
    float r = v[k] * inv * wv[k];
    if (z) r *= SigmoidF(zv[k]);
    y[base + i] = __float2bfloat16(r);
  }
}

__global__ void SwiGluKernel(const float* g, const float* u, int64_t n, __nv_bfloat16* y) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = __float2bfloat16(g[i] * SigmoidF(g[i]) * u[i]);
}

__device__ uint64_t SplitMix(uint64_t z) {
  z += 0x9e3779b97f4a7c15ull;
  z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
  z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
  return z ^ (z >> 31);
}

__global__ void FillRandomKernel(__nv_bfloat16* x, int64_t n, uint64_t seed, float std, float mean) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x) {
    const uint64_t r = SplitMix(seed ^ SplitMix(uint64_t(i)));
    const float u1 = (float(r >> 40) + 0.5f) * 0x1.0p-24f, u2 = float((r >> 16) & 0xffffff) * 0x1.0p-24f;
    x[i] = __float2bfloat16(mean + std * sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2));
  }
}

int Blocks(int64_t n) { return int(std::min<int64_t>((n + kThreads - 1) / kThreads, 65535)); }

}  // namespace

int DeviceCount() {
  int n = 0;
  return cudaGetDeviceCount(&n) == cudaSuccess ? n : 0;
}

absl::Status Embed(const int* ids, int rows, const __nv_bfloat16* embed, int width, float scale, float* h,
                   cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  EmbedKernel<<<rows, RowThreads(width), 0, stream>>>(ids, embed, width, scale, h);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status RmsNormToBf16(const float* x, int rows, int width, const __nv_bfloat16* weight, float eps,
                           float post_scale, __nv_bfloat16* y, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  SALA_RETURN_IF_ERROR(CheckRowWidth(width, "RMSNorm"));
  RmsNormKernel<<<rows, RowThreads(width), 0, stream>>>(x, width, weight, eps, post_scale, y);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status HeadNormRope(NormedHeads q, NormedHeads k, int rows, int dim, float eps, int64_t pos0, double theta,
                          bool rope, cudaStream_t stream) {
  if (rows == 0 || q.heads + k.heads == 0) return absl::OkStatus();
  if (dim % 64 != 0 || dim > 1024) return absl::InvalidArgumentError("head dim must be a multiple of 64");
  HeadNormRopeKernel<<<dim3(rows, q.heads + k.heads), dim / 2, 0, stream>>>(q, k, dim, eps, pos0, std::log2(theta),
                                                                            rope);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status NormGateToBf16(const float* o, const float* z, int rows, int width, const __nv_bfloat16* norm_weight,
                            float eps, __nv_bfloat16* y, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  SALA_RETURN_IF_ERROR(CheckRowWidth(width, "output norm"));
  NormGateKernel<<<rows, RowThreads(width), 0, stream>>>(o, z, width, norm_weight, eps, y);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status SwiGluToBf16(const float* gate, const float* up, int64_t n, __nv_bfloat16* y, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  SwiGluKernel<<<Blocks(n), kThreads, 0, stream>>>(gate, up, n, y);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status FillRandom(__nv_bfloat16* x, int64_t n, uint64_t seed, float std, float mean, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  FillRandomKernel<<<Blocks(n), kThreads, 0, stream>>>(x, n, seed, std, mean);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

}  // namespace sala::cuda

#include <algorithm>
#include <cmath>

#include "activation.cuh"
#include "bf16x4.cuh"
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
// Vec = 4 moves four values an access (rows a multiple of 4 wide, 16-byte aligned).
constexpr int kRowPerThread = 16;
constexpr int kMaxRowWidth = kRowPerThread * 1024;
int RowThreads(int width) { return std::clamp((width / 8 + 31) / 32 * 32, 32, 1024); }
// Sixteen values a thread: at 4096 wide, 256 threads, so that eight rows share an SM and one
// row's reduction overlaps the others' loads.
int VecRowThreads(int width) {
  return std::clamp(((width + kRowPerThread - 1) / kRowPerThread + 31) / 32 * 32, 32, 1024);
}
absl::Status CheckRowWidth(int width, const char* what) {
  if (width <= kMaxRowWidth) return absl::OkStatus();
  return absl::InvalidArgumentError(absl::StrCat(what, " width ", width, " above ", kMaxRowWidth));
}
bool RowsTakeVec4(int width, std::initializer_list<const void*> rows) {
  if (width % 4 != 0) return false;
  for (const void* p : rows)
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return false;
  return true;
}

template <int Vec>
__device__ __forceinline__ void LoadFloats(const float* p, float* v) {
  if constexpr (Vec == 4) {
    const float4 x = *reinterpret_cast<const float4*>(p);
    v[0] = x.x, v[1] = x.y, v[2] = x.z, v[3] = x.w;
  } else {
    v[0] = *p;
  }
}
template <int Vec>
__device__ __forceinline__ void LoadBf16s(const __nv_bfloat16* p, float* v) {
  if constexpr (Vec == 4) {
    LoadBf16x4(p, v);
  } else {
    v[0] = __bfloat162float(*p);
  }
}
// The same for bf16 rows.
template <int Vec>
__device__ __forceinline__ void LoadFloats(const __nv_bfloat16* p, float* v) {
  LoadBf16s<Vec>(p, v);
}
template <int Vec>
__device__ __forceinline__ void StoreBf16s(__nv_bfloat16* p, const float* v) {
  if constexpr (Vec == 4) {
    StoreBf16x4(p, v);
  } else {
    *p = __float2bfloat16(v[0]);
  }
}

template <int Vec>
__global__ void RmsNormKernel(const float* x, int width, const __nv_bfloat16* w, float eps, float post_scale,
                              __nv_bfloat16* y) {
  constexpr int kAccesses = kRowPerThread / Vec;
  __shared__ float scratch[32];
  const float* xr = x + int64_t(blockIdx.x) * width;
  float v[kRowPerThread], wv[kRowPerThread];  // the weights' loads overlap the reduction
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kAccesses; ++k) {
    const int i = (threadIdx.x + k * blockDim.x) * Vec;
    if (i < width) {
      LoadFloats<Vec>(xr + i, v + k * Vec);
      LoadBf16s<Vec>(w + i, wv + k * Vec);
    } else {
#pragma unroll
      for (int c = 0; c < Vec; ++c) v[k * Vec + c] = wv[k * Vec + c] = 0.0f;
    }
#pragma unroll
    for (int c = 0; c < Vec; ++c) ss += v[k * Vec + c] * v[k * Vec + c];
  }
  const float inv = rsqrtf(BlockSum(ss, scratch) / width + eps) * post_scale;
#pragma unroll
  for (int k = 0; k < kAccesses; ++k) {
    const int i = (threadIdx.x + k * blockDim.x) * Vec;
    if (i >= width) continue;
    float r[Vec];
#pragma unroll
    for (int c = 0; c < Vec; ++c) r[c] = v[k * Vec + c] * inv * wv[k * Vec + c];
    StoreBf16s<Vec>(y + int64_t(blockIdx.x) * width + i, r);
  }
}

// One block per row, a warp per head (the q heads, then the k heads), lane l holding the
// rotation pairs (j, j + dim/2) for j = l + 32 i. A pair's angle depends on the row and j only,
// so each thread takes its sines and cosines once for all the row's heads.
template <int Pairs>  // dim / 64
__global__ void __launch_bounds__(kThreads) HeadNormRopeKernel(NormedHeads q, NormedHeads k, float eps, int64_t pos0,
                                                               double log2_theta, bool rope) {
  constexpr int kDim = 64 * Pairs, kHalf = 32 * Pairs;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t row = blockIdx.x;
  float sn[Pairs], cs[Pairs];
#pragma unroll
  for (int i = 0; i < Pairs; ++i) {
    sn[i] = 0.0f;
    cs[i] = 1.0f;
    if (rope) RopeSinCos(lane + 32 * i, kDim, pos0 + row, log2_theta, sn[i], cs[i]);
  }
  for (int head = warp; head < q.heads + k.heads; head += kThreads / 32) {
    const bool is_k = head >= q.heads;
    const int heads = is_k ? k.heads : q.heads;
    const __nv_bfloat16* w = is_k ? k.weight : q.weight;
    const int64_t offset = (row * heads + (is_k ? head - q.heads : head)) * kDim;
    const __nv_bfloat16* in = (is_k ? k.in : q.in) + offset;
    __half* out = (is_k ? k.out : q.out) + offset;
    float a[Pairs], b[Pairs];
    float ss = 0.0f;
#pragma unroll
    for (int i = 0; i < Pairs; ++i) {
      a[i] = __bfloat162float(in[lane + 32 * i]);
      b[i] = __bfloat162float(in[kHalf + lane + 32 * i]);
      ss += a[i] * a[i] + b[i] * b[i];
    }
    if (w) {
      const float inv = rsqrtf(WarpSum(ss) / kDim + eps);
#pragma unroll
      for (int i = 0; i < Pairs; ++i) {
        a[i] = a[i] * inv * __bfloat162float(w[lane + 32 * i]);
        b[i] = b[i] * inv * __bfloat162float(w[kHalf + lane + 32 * i]);
      }
    }
#pragma unroll
    for (int i = 0; i < Pairs; ++i) {
      Rotate(a[i], b[i], sn[i], cs[i]);
      out[lane + 32 * i] = __float2half_rn(fminf(fmaxf(a[i], -65504.0f), 65504.0f));
      out[kHalf + lane + 32 * i] = __float2half_rn(fminf(fmaxf(b[i], -65504.0f), 65504.0f));
    }
  }
}

template <int Vec, typename O, typename Z>
__global__ void NormGateKernel(const O* o, const Z* z, int width, const __nv_bfloat16* w, float eps,
                               __nv_bfloat16* y) {
  constexpr int kAccesses = kRowPerThread / Vec;
  __shared__ float scratch[32];
  const int64_t base = int64_t(blockIdx.x) * width;
  float v[kRowPerThread], wv[kRowPerThread], zv[kRowPerThread];  // all loads before the reduction
  float ss = 0.0f;
#pragma unroll
  for (int k = 0; k < kAccesses; ++k) {
    const int i = (threadIdx.x + k * blockDim.x) * Vec;
#pragma unroll
    for (int c = 0; c < Vec; ++c) v[k * Vec + c] = 0.0f, wv[k * Vec + c] = 1.0f, zv[k * Vec + c] = 0.0f;
    if (i < width) {
      LoadFloats<Vec>(o + base + i, v + k * Vec);
      if (w) LoadBf16s<Vec>(w + i, wv + k * Vec);
      if (z) LoadFloats<Vec>(z + base + i, zv + k * Vec);
    }
#pragma unroll
    for (int c = 0; c < Vec; ++c) ss += v[k * Vec + c] * v[k * Vec + c];
  }
  const float inv = w ? rsqrtf(BlockSum(ss, scratch) / width + eps) : 1.0f;
#pragma unroll
  for (int k = 0; k < kAccesses; ++k) {
    const int i = (threadIdx.x + k * blockDim.x) * Vec;
    if (i >= width) continue;
    float r[Vec];
#pragma unroll
    for (int c = 0; c < Vec; ++c) {
      r[c] = v[k * Vec + c] * inv * wv[k * Vec + c];
      if (z) r[c] *= SigmoidF(zv[k * Vec + c]);
    }
    StoreBf16s<Vec>(y + base + i, r);
  }
}

// Eight elements a thread through 16-byte loads, then the n % 8 left one each.
__global__ void SwiGluKernel(const __nv_bfloat16* g, const __nv_bfloat16* u, int64_t n, __nv_bfloat16* y) {
  const int64_t stride = int64_t(gridDim.x) * blockDim.x, first = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  for (int64_t i = first; i < n / 8; i += stride) {
    const uint4 gv = reinterpret_cast<const uint4*>(g)[i], uv = reinterpret_cast<const uint4*>(u)[i];
    const __nv_bfloat162* g2 = reinterpret_cast<const __nv_bfloat162*>(&gv);
    const __nv_bfloat162* u2 = reinterpret_cast<const __nv_bfloat162*>(&uv);
    uint4 out;
    __nv_bfloat162* o2 = reinterpret_cast<__nv_bfloat162*>(&out);
#pragma unroll
    for (int k = 0; k < 4; ++k) {
      const float2 gf = __bfloat1622float2(g2[k]), uf = __bfloat1622float2(u2[k]);
      o2[k] = __floats2bfloat162_rn(SiluF(gf.x) * uf.x, SiluF(gf.y) * uf.y);
    }
    reinterpret_cast<uint4*>(y)[i] = out;
  }
  for (int64_t i = n / 8 * 8 + first; i < n; i += stride) {
    const float gf = __bfloat162float(g[i]);
    y[i] = __float2bfloat16(SiluF(gf) * __bfloat162float(u[i]));
  }
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
  if (RowsTakeVec4(width, {x, weight, y}))
    RmsNormKernel<4><<<rows, VecRowThreads(width), 0, stream>>>(x, width, weight, eps, post_scale, y);
  else
    RmsNormKernel<1><<<rows, RowThreads(width), 0, stream>>>(x, width, weight, eps, post_scale, y);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status HeadNormRope(NormedHeads q, NormedHeads k, int rows, int dim, float eps, int64_t pos0, double theta,
                          bool rope, cudaStream_t stream) {
  if (rows == 0 || q.heads + k.heads == 0) return absl::OkStatus();
  const double log2_theta = std::log2(theta);
  switch (dim) {
    case 64: HeadNormRopeKernel<1><<<rows, kThreads, 0, stream>>>(q, k, eps, pos0, log2_theta, rope); break;
    case 128: HeadNormRopeKernel<2><<<rows, kThreads, 0, stream>>>(q, k, eps, pos0, log2_theta, rope); break;
    case 256: HeadNormRopeKernel<4><<<rows, kThreads, 0, stream>>>(q, k, eps, pos0, log2_theta, rope); break;
    default: return absl::InvalidArgumentError(absl::StrCat("head dim ", dim, " is not 64, 128 or 256"));
  }
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

template <typename O, typename Z>
absl::Status NormGateToBf16(const O* o, const Z* z, int rows, int width, const __nv_bfloat16* norm_weight, float eps,
                            __nv_bfloat16* y, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  SALA_RETURN_IF_ERROR(CheckRowWidth(width, "output norm"));
  if (RowsTakeVec4(width, {o, z, norm_weight, y}))
    NormGateKernel<4><<<rows, VecRowThreads(width), 0, stream>>>(o, z, width, norm_weight, eps, y);
  else
    NormGateKernel<1><<<rows, RowThreads(width), 0, stream>>>(o, z, width, norm_weight, eps, y);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}
#define SALA_NORM_GATE(O, Z)                                                                                   \
  template absl::Status NormGateToBf16<O, Z>(const O*, const Z*, int, int, const __nv_bfloat16*, float,       \
                                             __nv_bfloat16*, cudaStream_t);
SALA_NORM_GATE(float, float)
SALA_NORM_GATE(float, __nv_bfloat16)
SALA_NORM_GATE(__nv_bfloat16, float)
SALA_NORM_GATE(__nv_bfloat16, __nv_bfloat16)
#undef SALA_NORM_GATE

absl::Status SwiGluToBf16(const __nv_bfloat16* gate, const __nv_bfloat16* up, int64_t n, __nv_bfloat16* y,
                          cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  for (const void* p : {static_cast<const void*>(gate), static_cast<const void*>(up), static_cast<const void*>(y)})
    if (reinterpret_cast<uintptr_t>(p) % 16 != 0) return absl::InvalidArgumentError("SwiGLU operands must be 16-byte aligned");
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

#include <algorithm>
#include <vector>

#include "cuda_common.h"
#include "sala/status_macros.h"
#include "sparse.h"

namespace sala::cuda {
namespace {

constexpr int kThreads = 128;  // four warps
constexpr int kMaxDim = 128;
constexpr int kTile = 64;         // keys per shared-memory tile: one attention block
constexpr int kHeadsPerWarp = 4;  // query heads per KV group up to 4 * warps = 16

__global__ void CompressKernel(const __nv_bfloat16* k, int Hk, int D, int64_t from, int kernel, int stride,
                               float* out) {
  const int64_t j = from + blockIdx.x;
  const int g = blockIdx.y;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float acc = 0.0f;
    for (int t = 0; t < kernel; ++t) acc += __bfloat162float(k[((stride * j + t) * Hk + g) * D + d]);
    out[(j * Hk + g) * D + d] = acc / float(kernel);
  }
}

__device__ float Dot(const float* q, const float* k, int D) {
  float acc = 0.0f;
  for (int d = 0; d < D; ++d) acc += q[d] * k[d];
  return acc;
}

__device__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}
__device__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// Decode: one row per sequence. One block per (row, KV group, split); with several splits each
// block takes its share of the attended blocks and writes a partial softmax state that
// CombineKernel merges (flash-decoding).
struct RowSource {
  const SparseCacheView* views;  // device, one per row
  const int64_t* positions;      // device
  const unsigned char* sparse;   // device
  const int* blocks;             // device [rows, kv_heads, selected_blocks]: stage 1's lists
  const int* counts;             // device [rows, kv_heads]
};

__global__ void AttentionKernel(const float* q, RowSource src, SparseShape sh, int splits, float* partial, float* o) {
  extern __shared__ float smem[];
  const int G = sh.heads / sh.kv_heads, D = sh.dim, g = blockIdx.y;
  const int64_t t = blockIdx.x;
  const int64_t pos = src.positions[t];
  const SparseCacheView c = src.views[t];
  const bool sparse = src.sparse[t] != 0;
  const int64_t bq = pos / sh.block;
  float* qs = smem;                 // [G, D]
  float* kt = qs + G * D;           // K tile [kTile, D + 1] (padded against bank conflicts)
  float* vt = kt + kTile * (D + 1);  // V tile [kTile, D]
  const int* chosen = src.blocks + (t * sh.kv_heads + g) * sh.selected_blocks;
  for (int e = threadIdx.x; e < G * D; e += blockDim.x) qs[e] = q[(t * sh.heads + g * G) * D + e];
  __syncthreads();
  const float scale = rsqrtf(float(D));

  // Softmax attention over this split's blocks: K/V tiles in shared memory, each warp owns
  // heads warp, warp + 4, ... with an online softmax in registers.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int blocks = sparse ? src.counts[t * sh.kv_heads + g] : int(bq + 1);
  const int split = blockIdx.z;
  const int b_begin = int(int64_t(blocks) * split / splits), b_end = int(int64_t(blocks) * (split + 1) / splits);
  float m[kHeadsPerWarp], l[kHeadsPerWarp], acc[kHeadsPerWarp][kMaxDim / 32];
  for (int hi = 0; hi < kHeadsPerWarp; ++hi) {
    m[hi] = -INFINITY;
    l[hi] = 0.0f;
    for (int r = 0; r < kMaxDim / 32; ++r) acc[hi][r] = 0.0f;
  }
  for (int bi = b_begin; bi < b_end; ++bi) {
    const int64_t key0 = int64_t(sparse ? chosen[bi] : bi) * sh.block;
    const int n = pos + 1 - key0 < sh.block ? int(pos + 1 - key0) : sh.block;
    __syncthreads();  // the previous tile is consumed
    for (int e = threadIdx.x; e < n * D; e += blockDim.x) {
      const int j = e / D, d = e % D;
      const int64_t at = ((key0 + j) * sh.kv_heads + g) * D + d;
      kt[j * (D + 1) + d] = __bfloat162float(c.k[at]);
      vt[j * D + d] = __bfloat162float(c.v[at]);
    }
    __syncthreads();
    for (int hi = 0; hi < kHeadsPerWarp; ++hi) {
      const int h = warp + hi * warps;
      if (h >= G) break;
      const float* qh = qs + h * D;
      float s0 = -INFINITY, s1 = -INFINITY;
      if (lane < n) s0 = Dot(qh, kt + lane * (D + 1), D) * scale;
      if (lane + 32 < n) s1 = Dot(qh, kt + (lane + 32) * (D + 1), D) * scale;
      const float mn = fmaxf(m[hi], WarpMax(fmaxf(s0, s1)));
      const float p0 = lane < n ? __expf(s0 - mn) : 0.0f, p1 = lane + 32 < n ? __expf(s1 - mn) : 0.0f;
      const float corr = m[hi] == -INFINITY ? 0.0f : __expf(m[hi] - mn);
      l[hi] = l[hi] * corr + WarpSum(p0 + p1);
      for (int r = 0; r < D / 32; ++r) acc[hi][r] *= corr;
      for (int j = 0; j < n; ++j) {
        const float pj = __shfl_sync(0xffffffff, j < 32 ? p0 : p1, j & 31);
        for (int r = 0; r < D / 32; ++r) acc[hi][r] += pj * vt[j * D + lane + 32 * r];
      }
      m[hi] = mn;
    }
  }
  for (int hi = 0; hi < kHeadsPerWarp; ++hi) {
    const int h = warp + hi * warps;
    if (h >= G) break;
    if (splits == 1) {
      float* out = o + (t * sh.heads + g * G + h) * D;
      for (int r = 0; r < D / 32; ++r) out[lane + 32 * r] = acc[hi][r] / l[hi];
    } else {
      float* p = partial + (((t * sh.kv_heads + g) * splits + split) * G + h) * (D + 2);
      for (int r = 0; r < D / 32; ++r) p[lane + 32 * r] = acc[hi][r];
      if (lane == 0) {
        p[D] = m[hi];
        p[D + 1] = l[hi];
      }
    }
  }
}

// Merges the splits' partial softmax states: o = Σ acc_s e^(m_s − m) / Σ l_s e^(m_s − m).
__global__ void CombineKernel(const float* partial, int splits, SparseShape sh, float* o) {
  const int G = sh.heads / sh.kv_heads, D = sh.dim, g = blockIdx.y;
  const int64_t t = blockIdx.x;
  for (int h = 0; h < G; ++h) {
    const float* base = partial + ((t * sh.kv_heads + g) * splits) * G * (D + 2) + h * (D + 2);
    float mx = -INFINITY;
    for (int s = 0; s < splits; ++s) mx = fmaxf(mx, base[s * G * (D + 2) + D]);
    float denom = 0.0f;
    for (int s = 0; s < splits; ++s) {
      const float* p = base + s * G * (D + 2);
      if (p[D] != -INFINITY) denom += p[D + 1] * __expf(p[D] - mx);
    }
    for (int d = threadIdx.x; d < D; d += blockDim.x) {
      float num = 0.0f;
      for (int s = 0; s < splits; ++s) {
        const float* p = base + s * G * (D + 2);
        if (p[D] != -INFINITY) num += p[d] * __expf(p[D] - mx);
      }
      o[(t * sh.heads + g * G + h) * D + d] = num / denom;
    }
  }
}

}  // namespace

absl::Status CompressKeys(const __nv_bfloat16* k, int kv_heads, int dim, int64_t from, int64_t to, int kernel,
                          int stride, float* out, cudaStream_t stream) {
  if (to <= from) return absl::OkStatus();
  CompressKernel<<<dim3(unsigned(to - from), kv_heads), dim, 0, stream>>>(k, kv_heads, dim, from, kernel, stride, out);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

namespace {

absl::Status Launch(const float* q, int64_t T, RowSource src, const SparseShape& shape, float* o,
                    DeviceBuffer<float>& partial, cudaStream_t stream) {
  if (shape.dim % 32 != 0 || shape.dim > kMaxDim) return absl::InvalidArgumentError("sparse head_dim must be 32..128");
  const int G = shape.heads / shape.kv_heads;
  if (G > kHeadsPerWarp * kThreads / 32) return absl::InvalidArgumentError("at most 16 query heads per KV head");
  if (shape.block > kTile) return absl::InvalidArgumentError("sparse block size above 64");
  const size_t smem = (size_t(G) * shape.dim + size_t(kTile) * (2 * shape.dim + 1)) * sizeof(float);
  SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  // Few rows (decode): split each row's blocks over several thread blocks to fill the GPU.
  int device = 0, sms = 0;
  cudaGetDevice(&device);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  const int64_t rows = T * shape.kv_heads;
  const int splits = rows >= sms ? 1 : int(std::min<int64_t>(16, (2 * sms + rows - 1) / rows));
  if (splits > 1) SALA_RETURN_IF_ERROR(partial.Reserve(size_t(rows) * splits * G * (shape.dim + 2)));
  AttentionKernel<<<dim3(unsigned(T), shape.kv_heads, splits), kThreads, smem, stream>>>(
      q, src, shape, splits, partial.get(), o);
  SALA_CUDA_CHECK_LAUNCH();
  if (splits > 1) {
    CombineKernel<<<dim3(unsigned(T), shape.kv_heads), shape.dim, 0, stream>>>(partial.get(), splits, shape, o);
    SALA_CUDA_CHECK_LAUNCH();
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SparseAttentionRows(const float* q, int rows, const SparseCacheView* caches, const int64_t* positions,
                                 const bool* sparse_rows, const int* blocks, const int* counts,
                                 const SparseShape& shape, float* o, SparseScratch& scratch, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  auto& views = scratch.views;
  auto& pos = scratch.positions;
  auto& flags = scratch.flags;
  SALA_RETURN_IF_ERROR(views.Reserve(rows));
  SALA_RETURN_IF_ERROR(pos.Reserve(rows));
  SALA_RETURN_IF_ERROR(flags.Reserve(rows));
  std::vector<unsigned char> f(sparse_rows, sparse_rows + rows);
  SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(views.get(), caches, rows * sizeof(SparseCacheView), cudaMemcpyHostToDevice));
  SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(pos.get(), positions, rows * sizeof(int64_t), cudaMemcpyHostToDevice));
  SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(flags.get(), f.data(), rows, cudaMemcpyHostToDevice));
  return Launch(q, rows, {views.get(), pos.get(), flags.get(), blocks, counts}, shape, o, scratch.partial, stream);
}

}  // namespace sala::cuda

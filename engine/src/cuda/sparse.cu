#include <algorithm>
#include <vector>

#include "cuda_common.h"
#include "sala/status_macros.h"
#include "sparse.h"
#include "warp.cuh"

namespace sala::cuda {
namespace {

constexpr int kThreads = 256;  // eight warps
constexpr int kMaxDim = 128;
constexpr int kTile = 64;         // keys per shared-memory tile: one attention block
constexpr int kHeadsPerWarp = 2;  // query heads per KV group up to 2 * warps = 16
constexpr int kLoadsPerThread = kTile * kMaxDim / 8 / kThreads;  // 16-byte loads of K (and of V) per tile
constexpr int kMaxSplits = 64;

// Compressed entry j of one (KV head g, dimension d): the mean of keys stride j .. + kernel - 1
// (a window may straddle pages).
__device__ float CompressedEntry(const SparseCacheView& c, int Hk, int D, int g, int d, int64_t j, int kernel,
                                 int stride) {
  float acc = 0.0f;
  for (int t = 0; t < kernel; ++t) acc += __bfloat162float(c.k[KvRowOffset(c, stride * j + t, Hk * D) + g * D + d]);
  return acc / float(kernel);
}

__global__ void CompressKernel(SparseCacheView c, int Hk, int D, int64_t from, int kernel, int stride, __nv_bfloat16* out) {
  const int64_t j = from + blockIdx.x;
  const int g = blockIdx.y;
  for (int d = threadIdx.x; d < D; d += blockDim.x)
    out[(j * Hk + g) * D + d] = __float2bfloat16(CompressedEntry(c, Hk, D, g, d, j, kernel, stride));
}

// One block per row; rows are whole in one page.
__global__ void StoreRowsKernel(const float* k, const float* v, int64_t first, int row, SparseCacheView c) {
  const int64_t t = blockIdx.x;
  const int64_t at = KvRowOffset(c, first + t, row);
  for (int e = threadIdx.x; e < row; e += blockDim.x) {
    c.k[at + e] = __float2bfloat16(k[t * row + e]);
    c.v[at + e] = __float2bfloat16(v[t * row + e]);
  }
}

// One block per (row, KV head), one thread per dimension: each thread reads back only the
// column it wrote, so the compression needs no barrier.
__global__ void AppendRowsKernel(const float* k, const float* v, const SparseCacheView* caches,
                                 const int64_t* positions, SparseShape sh) {
  const int r = blockIdx.x, g = blockIdx.y, Hk = sh.kv_heads, D = sh.dim;
  const int64_t p = positions[r], tokens = p + 1;
  const SparseCacheView c = caches[r];
  const int64_t at = KvRowOffset(c, p, Hk * D) + g * D;
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    const int64_t src = (int64_t(r) * Hk + g) * D + d;
    c.k[at + d] = __float2bfloat16(k[src]);
    c.v[at + d] = __float2bfloat16(v[src]);
    // Level 1 (kernel, stride) and level 2 (4x both): an entry completes when its window ends here.
    for (int level = 0; level < 2; ++level) {
      const int kernel = level ? 4 * sh.kernel : sh.kernel, stride = level ? 4 * sh.stride : sh.stride;
      if (tokens < kernel || (tokens - kernel) % stride != 0) continue;
      const int64_t j = (tokens - kernel) / stride;
      (level ? c.k2 : c.k1)[(j * Hk + g) * D + d] = __float2bfloat16(CompressedEntry(c, Hk, D, g, d, j, kernel, stride));
    }
  }
}

__device__ float Dot(const float* q, const float* k, int D) {
  float acc = 0.0f;
  for (int d = 0; d < D; ++d) acc += q[d] * k[d];
  return acc;
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
  // heads warp, warp + 8 (with 16 heads) with an online softmax in registers.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int blocks = sparse ? src.counts[t * sh.kv_heads + g] : int(bq + 1);
  const int split = blockIdx.z;
  const int b_begin = int(int64_t(blocks) * split / splits), b_end = int(int64_t(blocks) * (split + 1) / splits);
  float m[kHeadsPerWarp], l[kHeadsPerWarp], acc[kHeadsPerWarp][kMaxDim / 32];
#pragma unroll
  for (int hi = 0; hi < kHeadsPerWarp; ++hi) {
    m[hi] = -INFINITY;
    l[hi] = 0.0f;
#pragma unroll
    for (int r = 0; r < kMaxDim / 32; ++r) acc[hi][r] = 0.0f;
  }
  // Tiles are read with 16-byte loads into registers one tile ahead: the loads of tile bi + 1
  // are in flight while tile bi is computed, so a block is not bound by load latency.
  const int vecs_per_row = D / 8;
  uint4 k_next[kLoadsPerThread], v_next[kLoadsPerThread];
  auto tile_start = [&](int bi) { return int64_t(sparse ? chosen[bi] : bi) * sh.block; };
  auto tile_rows = [&](int64_t key0) { return pos + 1 - key0 < sh.block ? int(pos + 1 - key0) : sh.block; };
  auto load_tile = [&](int bi) {
    const int64_t key0 = tile_start(bi);
    const int total = tile_rows(key0) * vecs_per_row;
    const int64_t block_at = KvRowOffset(c, key0, sh.kv_heads * D);  // a block is whole in one page
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const int e = threadIdx.x + i * kThreads;
      if (e < total) {
        const int64_t at = block_at + (int64_t(e / vecs_per_row) * sh.kv_heads + g) * D + (e % vecs_per_row) * 8;
        k_next[i] = *reinterpret_cast<const uint4*>(c.k + at);
        v_next[i] = *reinterpret_cast<const uint4*>(c.v + at);
      }
    }
  };
  if (b_begin < b_end) load_tile(b_begin);
  for (int bi = b_begin; bi < b_end; ++bi) {
    const int n = tile_rows(tile_start(bi));
    __syncthreads();  // the previous tile is consumed
#pragma unroll
    for (int i = 0; i < kLoadsPerThread; ++i) {
      const int e = threadIdx.x + i * kThreads;
      if (e < n * vecs_per_row) {
        const int j = e / vecs_per_row, d0 = (e % vecs_per_row) * 8;
        const __nv_bfloat162* kp = reinterpret_cast<const __nv_bfloat162*>(&k_next[i]);
        const __nv_bfloat162* vp = reinterpret_cast<const __nv_bfloat162*>(&v_next[i]);
#pragma unroll
        for (int x = 0; x < 4; ++x) {
          const float2 kf = __bfloat1622float2(kp[x]), vf = __bfloat1622float2(vp[x]);
          kt[j * (D + 1) + d0 + 2 * x] = kf.x;
          kt[j * (D + 1) + d0 + 2 * x + 1] = kf.y;
          vt[j * D + d0 + 2 * x] = vf.x;
          vt[j * D + d0 + 2 * x + 1] = vf.y;
        }
      }
    }
    __syncthreads();
    if (bi + 1 < b_end) load_tile(bi + 1);
    // Loops run to compile-time bounds with guards, so that acc stays in registers.
#pragma unroll
    for (int hi = 0; hi < kHeadsPerWarp; ++hi) {
      const int h = warp + hi * warps;
      if (h >= G) continue;
      const float* qh = qs + h * D;
      float s0 = -INFINITY, s1 = -INFINITY;
      if (lane < n) s0 = Dot(qh, kt + lane * (D + 1), D) * scale;
      if (lane + 32 < n) s1 = Dot(qh, kt + (lane + 32) * (D + 1), D) * scale;
      const float mn = fmaxf(m[hi], WarpMax(fmaxf(s0, s1)));
      const float p0 = lane < n ? __expf(s0 - mn) : 0.0f, p1 = lane + 32 < n ? __expf(s1 - mn) : 0.0f;
      const float corr = m[hi] == -INFINITY ? 0.0f : __expf(m[hi] - mn);
      l[hi] = l[hi] * corr + WarpSum(p0 + p1);
#pragma unroll
      for (int r = 0; r < kMaxDim / 32; ++r) acc[hi][r] *= corr;
      for (int j = 0; j < n; ++j) {
        const float pj = __shfl_sync(0xffffffff, j < 32 ? p0 : p1, j & 31);
#pragma unroll
        for (int r = 0; r < kMaxDim / 32; ++r)
          if (r < D / 32) acc[hi][r] += pj * vt[j * D + lane + 32 * r];
      }
      m[hi] = mn;
    }
  }
#pragma unroll
  for (int hi = 0; hi < kHeadsPerWarp; ++hi) {
    const int h = warp + hi * warps;
    if (h >= G) continue;
    if (splits == 1) {
      float* out = o + (t * sh.heads + g * G + h) * D;
#pragma unroll
      for (int r = 0; r < kMaxDim / 32; ++r)
        if (r < D / 32) out[lane + 32 * r] = acc[hi][r] / l[hi];
    } else {
      float* p = partial + (((t * sh.kv_heads + g) * splits + split) * G + h) * (D + 2);
#pragma unroll
      for (int r = 0; r < kMaxDim / 32; ++r)
        if (r < D / 32) p[lane + 32 * r] = acc[hi][r];
      if (lane == 0) {
        p[D] = m[hi];
        p[D + 1] = l[hi];
      }
    }
  }
}

// Merges the splits' partial softmax states: o = Σ acc_s e^(m_s − m) / Σ l_s e^(m_s − m).
// One block per (row, KV group, head): warp 0 turns the splits' (m, l) into weights in shared
// memory, then every thread sums its dimensions over the splits (independent loads, not a chain).
__global__ void CombineKernel(const float* partial, int splits, SparseShape sh, float* o) {
  __shared__ float weight[kMaxSplits];
  __shared__ float denom;
  const int G = sh.heads / sh.kv_heads, D = sh.dim, g = blockIdx.y, h = blockIdx.z;
  const int64_t t = blockIdx.x, stride = int64_t(G) * (D + 2);
  const float* base = partial + ((t * sh.kv_heads + g) * splits) * stride + h * (D + 2);
  if (threadIdx.x < 32) {
    const int lane = threadIdx.x;
    float mx = -INFINITY;
    for (int s = lane; s < splits; s += 32) mx = fmaxf(mx, base[s * stride + D]);
    mx = WarpMax(mx);
    float den = 0.0f;
    for (int s = lane; s < splits; s += 32) {
      const float ms = base[s * stride + D];
      const float w = ms == -INFINITY ? 0.0f : __expf(ms - mx);
      weight[s] = w;
      den += w * base[s * stride + D + 1];
    }
    den = WarpSum(den);
    if (lane == 0) denom = den;
  }
  __syncthreads();
  for (int d = threadIdx.x; d < D; d += blockDim.x) {
    float num = 0.0f;
    for (int s = 0; s < splits; ++s) num += weight[s] * base[s * stride + d];
    o[(t * sh.heads + g * G + h) * D + d] = num / denom;
  }
}

}  // namespace

absl::Status StoreRows(const float* k, const float* v, int64_t first, int64_t T, const SparseCacheView& cache,
                       int kv_heads, int dim, cudaStream_t stream) {
  if (T <= 0) return absl::OkStatus();
  StoreRowsKernel<<<unsigned(T), 256, 0, stream>>>(k, v, first, kv_heads * dim, cache);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status CompressKeys(const SparseCacheView& cache, int kv_heads, int dim, int64_t from, int64_t to, int kernel,
                          int stride, __nv_bfloat16* out, cudaStream_t stream) {
  if (to <= from) return absl::OkStatus();
  CompressKernel<<<dim3(unsigned(to - from), kv_heads), dim, 0, stream>>>(cache, kv_heads, dim, from, kernel, stride,
                                                                          out);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status AppendRows(const float* k, const float* v, int rows, const SparseCacheView* caches,
                        const int64_t* positions, const SparseShape& shape, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  AppendRowsKernel<<<dim3(rows, shape.kv_heads), std::min(shape.dim, 1024), 0, stream>>>(k, v, caches, positions, shape);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

namespace {

absl::Status Launch(const float* q, int64_t T, RowSource src, const SparseShape& shape, float* o,
                    DeviceBuffer<float>& partial, cudaStream_t stream) {
  if (shape.dim % 32 != 0 || shape.dim > kMaxDim) return absl::InvalidArgumentError("sparse head_dim must be 32..128");
  const int G = shape.heads / shape.kv_heads;
  if (G > kHeadsPerWarp * kThreads / 32) return absl::InvalidArgumentError("at most 16 query heads per KV head");
  if (shape.block > kTile || kKvPageTokens % shape.block != 0)
    return absl::InvalidArgumentError("sparse block size above 64 or not dividing a KV page");
  const size_t smem = (size_t(G) * shape.dim + size_t(kTile) * (2 * shape.dim + 1)) * sizeof(float);
  SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  // Split each row's blocks over enough thread blocks to give every SM several (a decode step
  // has few rows, each with up to selected_blocks tiles).
  SALA_ASSIGN_OR_RETURN(const int sms, MultiprocessorCount());
  const int64_t rows = T * shape.kv_heads;
  const int splits = int(std::clamp<int64_t>((4 * sms + rows - 1) / rows, 1, kMaxSplits));
  if (splits > 1) SALA_RETURN_IF_ERROR(partial.Reserve(size_t(rows) * splits * G * (shape.dim + 2)));
  AttentionKernel<<<dim3(unsigned(T), shape.kv_heads, splits), kThreads, smem, stream>>>(
      q, src, shape, splits, partial.get(), o);
  SALA_CUDA_CHECK_LAUNCH();
  if (splits > 1) {
    CombineKernel<<<dim3(unsigned(T), shape.kv_heads, G), shape.dim, 0, stream>>>(partial.get(), splits, shape, o);
    SALA_CUDA_CHECK_LAUNCH();
  }
  return absl::OkStatus();
}

}  // namespace

absl::Status SparseAttentionRows(const float* q, int rows, const SparseCacheView* caches, const int64_t* positions,
                                 const unsigned char* sparse_rows, const int* blocks, const int* counts,
                                 const SparseShape& shape, float* o, SparseScratch& scratch, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  return Launch(q, rows, {caches, positions, sparse_rows, blocks, counts}, shape, o, scratch.partial, stream);
}

}  // namespace sala::cuda

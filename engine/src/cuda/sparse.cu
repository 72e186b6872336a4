#include <algorithm>
#include <cfloat>
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
constexpr int kMaxGroup = 16;

__device__ int64_t NumCompressed(int64_t tokens, int kernel, int stride) {
  return tokens < kernel ? 0 : (tokens - kernel) / stride + 1;
}

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

// dots[h] = q_h · k for every head of the group, reading k once (q is in shared memory).
__device__ void DotsAllHeads(const float* qs, const float* k, int G, int D, float* dots) {
  for (int h = 0; h < kMaxGroup; ++h) dots[h] = 0.0f;
  for (int d = 0; d < D; d += 4) {
    const float4 kv = *reinterpret_cast<const float4*>(k + d);
#pragma unroll
    for (int h = 0; h < kMaxGroup; ++h) {
      if (h >= G) break;
      const float* q = qs + h * D + d;
      dots[h] += q[0] * kv.x + q[1] * kv.y + q[2] * kv.z + q[3] * kv.w;
    }
  }
}

__device__ float WarpMax(float v) {
  for (int o = 16; o > 0; o >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffff, v, o));
  return v;
}
__device__ float WarpSum(float v) {
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffff, v, o);
  return v;
}

// Block-wide log-sum-exp of per-thread (max, sum) pairs.
__device__ float BlockLse(float m, float s, float* scratch) {
  for (int o = 16; o > 0; o >>= 1) {
    const float m2 = __shfl_xor_sync(0xffffffff, m, o), s2 = __shfl_xor_sync(0xffffffff, s, o);
    const float mm = fmaxf(m, m2);
    s = (m == -INFINITY ? 0.0f : s * __expf(m - mm)) + (m2 == -INFINITY ? 0.0f : s2 * __expf(m2 - mm));
    m = mm;
  }
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  if (lane == 0) {
    scratch[2 * warp] = m;
    scratch[2 * warp + 1] = s;
  }
  __syncthreads();
  float M = -INFINITY, Ssum = 0.0f;
  for (int w = 0; w < int(blockDim.x / 32); ++w) {
    const float mw = scratch[2 * w], sw = scratch[2 * w + 1];
    if (mw == -INFINITY) continue;
    const float mm = fmaxf(M, mw);
    Ssum = (M == -INFINITY ? 0.0f : Ssum * __expf(M - mm)) + sw * __expf(mw - mm);
    M = mm;
  }
  __syncthreads();
  return M + logf(Ssum);
}

// Decode: one row per sequence. One block per (row, KV group, split); with several splits each
// block takes its share of the attended blocks and writes a partial softmax state that
// CombineKernel merges (flash-decoding).
struct RowSource {
  const SparseCacheView* views;  // device, one per row
  const int64_t* positions;      // device
  const unsigned char* sparse;   // device
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
  float* scratch = qs + G * D;      // 2 * warps
  float* lse = scratch + 64;        // [G]
  int* chosen = reinterpret_cast<int*>(lse + G);  // [selected_blocks]
  float* score = reinterpret_cast<float*>(chosen + sh.selected_blocks);  // [bq + 1]
  float* kt = score + bq + 1;           // K tile [kTile, D + 1] (padded against bank conflicts)
  float* vt = kt + kTile * (D + 1);     // V tile [kTile, D]
  __shared__ int n_chosen;
  for (int e = threadIdx.x; e < G * D; e += blockDim.x) qs[e] = q[(t * sh.heads + g * G) * D + e];
  __syncthreads();
  const float scale = rsqrtf(float(D));

  if (sparse) {
    const int64_t n1 = NumCompressed(pos + 1, sh.kernel, sh.stride);
    const int64_t n2 = NumCompressed(pos + 1, 4 * sh.kernel, 4 * sh.stride);
    // lse_h over the visible k2 entries; each k2 row is read once for all heads of the group.
    float m[kMaxGroup], sum[kMaxGroup];
    for (int h = 0; h < G; ++h) {
      m[h] = -INFINITY;
      sum[h] = 0.0f;
    }
    for (int64_t j = threadIdx.x; j < n2; j += blockDim.x) {
      float dots[kMaxGroup];
      DotsAllHeads(qs, c.k2 + (j * sh.kv_heads + g) * D, G, D, dots);
      for (int h = 0; h < G; ++h) {
        const float l = dots[h] * scale, mm = fmaxf(m[h], l);
        sum[h] = (m[h] == -INFINITY ? 0.0f : sum[h] * __expf(m[h] - mm)) + __expf(l - mm);
        m[h] = mm;
      }
    }
    for (int h = 0; h < G; ++h) {
      const float v = BlockLse(m[h], sum[h], scratch);
      if (threadIdx.x == 0) lse[h] = v;
    }
    __syncthreads();
    const int64_t per_block = sh.block / sh.stride, lead = sh.kernel / sh.stride - 1;
    for (int64_t b = threadIdx.x; b <= bq; b += blockDim.x) {
      float sc = -INFINITY;
      if (b < sh.init_blocks || b >= bq - sh.window_blocks) {
        sc = INFINITY;
      } else {
        const int64_t j_end = n1 < (b + 1) * per_block ? n1 : (b + 1) * per_block;
        for (int64_t j = b * per_block - lead > 0 ? b * per_block - lead : 0; j < j_end; ++j) {
          float sj = 0.0f;
          if (n2 > 0) {
            float dots[kMaxGroup];
            DotsAllHeads(qs, c.k1 + (j * sh.kv_heads + g) * D, G, D, dots);
            for (int h = 0; h < G; ++h) sj += __expf(dots[h] * scale - lse[h]);
          }
          sc = fmaxf(sc, sj);
        }
      }
      score[b] = sc;
    }
    __syncthreads();
    // Top-k by repeated arg-max (ties: the lower block), never a block without entries.
    if (threadIdx.x == 0) n_chosen = 0;
    __syncthreads();
    int* best_idx = reinterpret_cast<int*>(scratch);
    for (int r = 0; r < sh.selected_blocks; ++r) {
      float best = -INFINITY;
      int64_t idx = -1;
      for (int64_t b = threadIdx.x; b <= bq; b += blockDim.x)
        if (score[b] > best) {
          best = score[b];
          idx = b;
        }
      for (int off = 16; off > 0; off >>= 1) {
        const float ob = __shfl_xor_sync(0xffffffff, best, off);
        const int64_t oi = __shfl_xor_sync(0xffffffff, idx, off);
        if (ob > best || (ob == best && oi >= 0 && (idx < 0 || oi < idx))) {
          best = ob;
          idx = oi;
        }
      }
      if (threadIdx.x % 32 == 0) {
        scratch[32 + threadIdx.x / 32] = best;
        best_idx[threadIdx.x / 32] = int(idx);
      }
      __syncthreads();
      if (threadIdx.x == 0) {
        float bb = -INFINITY;
        int bi = -1;
        for (int w = 0; w < int(blockDim.x / 32); ++w) {
          const float sw = scratch[32 + w];
          const int iw = best_idx[w];
          if (iw >= 0 && (sw > bb || (sw == bb && (bi < 0 || iw < bi)))) {
            bb = sw;
            bi = iw;
          }
        }
        if (bi >= 0 && bb > -INFINITY) {
          chosen[n_chosen++] = bi;
          score[bi] = -INFINITY;
        }
      }
      __syncthreads();
    }
    if (threadIdx.x == 0) {  // ascending, as the CPU path sums them
      for (int i = 1; i < n_chosen; ++i)
        for (int j = i; j > 0 && chosen[j - 1] > chosen[j]; --j) {
          const int tmp = chosen[j];
          chosen[j] = chosen[j - 1];
          chosen[j - 1] = tmp;
        }
    }
    __syncthreads();
  }

  // Softmax attention over this split's blocks: K/V tiles in shared memory, each warp owns
  // heads warp, warp + 4, ... with an online softmax in registers.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
  const int blocks = sparse ? n_chosen : int(bq + 1);
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

// `max_pos` bounds the shared memory for block scores.
absl::Status Launch(const float* q, int64_t T, RowSource src, int64_t max_pos, const SparseShape& shape, float* o,
                    DeviceBuffer<float>& partial, cudaStream_t stream) {
  if (shape.dim % 32 != 0 || shape.dim > kMaxDim) return absl::InvalidArgumentError("sparse head_dim must be 32..128");
  const int G = shape.heads / shape.kv_heads;
  if (G > kHeadsPerWarp * kThreads / 32) return absl::InvalidArgumentError("at most 16 query heads per KV head");
  if (shape.block > kTile) return absl::InvalidArgumentError("sparse block size above 64");
  const int64_t max_blocks = max_pos / shape.block + 1;
  const size_t smem = (size_t(G) * shape.dim + 64 + G + shape.selected_blocks + max_blocks +
                       size_t(kTile) * (2 * shape.dim + 1)) * sizeof(float);
  if (smem > 220 * 1024) return absl::ResourceExhaustedError("context too long for the sparse attention kernel");
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
                                 const bool* sparse_rows, const SparseShape& shape, float* o, SparseScratch& scratch,
                                 cudaStream_t stream) {
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
  const int64_t max_pos = *std::max_element(positions, positions + rows);
  return Launch(q, rows, {views.get(), pos.get(), flags.get()}, max_pos, shape, o, scratch.partial, stream);
}

}  // namespace sala::cuda

#include <cfloat>

#include "cuda_common.h"
#include "sparse.h"

namespace sala::cuda {
namespace {

constexpr int kThreads = 128;  // four warps
constexpr int kMaxDim = 128;

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

__device__ float DotBf16(const float* q, const __nv_bfloat16* k, int D) {
  float acc = 0.0f;
  for (int d = 0; d < D; d += 2) {
    const float2 kv = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(k + d));
    acc += q[d] * kv.x + q[d + 1] * kv.y;
  }
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

// One block per (row, KV group).
__global__ void AttentionKernel(const float* q, int64_t first, SparseCacheView c, SparseShape sh, bool sparse,
                                float* o) {
  extern __shared__ float smem[];
  const int G = sh.heads / sh.kv_heads, D = sh.dim, g = blockIdx.y;
  const int64_t t = blockIdx.x, pos = first + t;
  const int64_t bq = pos / sh.block;
  float* qs = smem;                 // [G, D]
  float* scratch = qs + G * D;      // 2 * warps
  float* lse = scratch + 64;        // [G]
  int* chosen = reinterpret_cast<int*>(lse + G);  // [selected_blocks]
  float* score = reinterpret_cast<float*>(chosen + sh.selected_blocks);  // [bq + 1]
  __shared__ int n_chosen;
  for (int e = threadIdx.x; e < G * D; e += blockDim.x) qs[e] = q[(t * sh.heads + g * G) * D + e];
  __syncthreads();
  const float scale = rsqrtf(float(D));

  if (sparse) {
    const int64_t n1 = NumCompressed(pos + 1, sh.kernel, sh.stride);
    const int64_t n2 = NumCompressed(pos + 1, 4 * sh.kernel, 4 * sh.stride);
    for (int h = 0; h < G; ++h) {
      float m = -INFINITY, s = 0.0f;
      for (int64_t j = threadIdx.x; j < n2; j += blockDim.x) {
        const float l = Dot(qs + h * D, c.k2 + (j * sh.kv_heads + g) * D, D) * scale;
        const float mm = fmaxf(m, l);
        s = (m == -INFINITY ? 0.0f : s * __expf(m - mm)) + __expf(l - mm);
        m = mm;
      }
      const float v = BlockLse(m, s, scratch);
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
          if (n2 > 0)
            for (int h = 0; h < G; ++h)
              sj += __expf(Dot(qs + h * D, c.k1 + (j * sh.kv_heads + g) * D, D) * scale - lse[h]);
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

  // Softmax attention, one warp per query head of the group, online over 32-key tiles.
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int blocks = sparse ? n_chosen : int(bq + 1);
  for (int h = warp; h < G; h += blockDim.x / 32) {
    const float* qh = qs + h * D;
    float m = -INFINITY, l = 0.0f, acc[kMaxDim / 32];
    for (int r = 0; r < D / 32; ++r) acc[r] = 0.0f;
    for (int bi = 0; bi < blocks; ++bi) {
      const int64_t b = sparse ? chosen[bi] : bi;
      const int64_t end = pos + 1 < (b + 1) * sh.block ? pos + 1 : (b + 1) * sh.block;
      for (int64_t tile = b * sh.block; tile < end; tile += 32) {
        const int64_t key = tile + lane;
        const bool valid = key < end;
        const float s = valid ? DotBf16(qh, c.k + (key * sh.kv_heads + g) * D, D) * scale : -INFINITY;
        const float mn = fmaxf(m, WarpMax(s));
        const float p = valid ? __expf(s - mn) : 0.0f;
        const float corr = m == -INFINITY ? 0.0f : __expf(m - mn);
        l = l * corr + WarpSum(p);
        for (int r = 0; r < D / 32; ++r) acc[r] *= corr;
        const int n = end - tile < 32 ? int(end - tile) : 32;
        for (int kk = 0; kk < n; ++kk) {
          const float pk = __shfl_sync(0xffffffff, p, kk);
          const __nv_bfloat16* vrow = c.v + ((tile + kk) * sh.kv_heads + g) * D;
          for (int r = 0; r < D / 32; ++r) acc[r] += pk * __bfloat162float(vrow[lane + 32 * r]);
        }
        m = mn;
      }
    }
    float* out = o + (t * sh.heads + g * G + h) * D;
    for (int r = 0; r < D / 32; ++r) out[lane + 32 * r] = acc[r] / l;
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

absl::Status SparseAttention(const float* q, int64_t first, int64_t T, const SparseCacheView& cache,
                             const SparseShape& shape, bool sparse, float* o, cudaStream_t stream) {
  if (T == 0) return absl::OkStatus();
  if (shape.dim % 32 != 0 || shape.dim > kMaxDim) return absl::InvalidArgumentError("sparse head_dim must be 32..128");
  const int G = shape.heads / shape.kv_heads;
  const int64_t max_blocks = (first + T - 1) / shape.block + 1;
  const size_t smem = (size_t(G) * shape.dim + 64 + G + shape.selected_blocks + max_blocks) * sizeof(float);
  if (smem > 220 * 1024) return absl::ResourceExhaustedError("context too long for the sparse attention kernel");
  SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(AttentionKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  AttentionKernel<<<dim3(unsigned(T), shape.kv_heads), kThreads, smem, stream>>>(q, first, cache, shape, sparse, o);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

}  // namespace sala::cuda

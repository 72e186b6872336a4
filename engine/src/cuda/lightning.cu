#include "cuda_common.h"
#include "lightning.h"
#include "sala/status_macros.h"

namespace sala::cuda {
namespace {

constexpr int kChunk = 64;
constexpr int kThreads = 256;

// Chunk-parallel form in three passes, so that all (chunk, head) pairs run at once:
//   1. ChunkStateKernel: each chunk's own contribution dS_c = Σ_j exp(g (c − 1 − j)) k_jᵀ v_j;
//   2. ScanKernel: S_in of every chunk by S ← exp(g c) S + dS_c, in order (element-parallel);
//   3. ChunkOutputKernel: O = exp(G_i) s Q S_in + (s Q Kᵀ ⊙ decay mask) V within the chunk.
// dS_c is overwritten by S_in of the same chunk in pass 2.
__device__ int ChunkLen(int64_t T, int64_t c) { return T - c * kChunk < kChunk ? int(T - c * kChunk) : kChunk; }

__global__ void ChunkStateKernel(const float* k, const float* v, int64_t T, int H, int Hk, int D,
                                 const float* slopes, float* chunk_states) {
  extern __shared__ float smem[];
  float* K = smem;
  float* V = K + kChunk * D;
  const int64_t c = blockIdx.x;
  const int h = blockIdx.y, kh = h / (H / Hk);
  const float g = -slopes[h];
  const int len = ChunkLen(T, c);
  for (int e = threadIdx.x; e < len * D; e += blockDim.x) {
    const int j = e / D, d = e % D;
    const float w = __expf(g * float(len - 1 - j));  // fold the decay into K
    K[e] = w * k[((c * kChunk + j) * Hk + kh) * D + d];
    V[e] = v[((c * kChunk + j) * Hk + kh) * D + d];
  }
  __syncthreads();
  float* out = chunk_states + (c * H + h) * int64_t(D) * D;
  for (int e = threadIdx.x; e < D * D; e += blockDim.x) {
    const int a = e / D, col = e % D;
    float acc = 0.0f;
    for (int j = 0; j < len; ++j) acc += K[j * D + a] * V[j * D + col];
    out[e] = acc;
  }
}

__global__ void ScanKernel(int64_t T, int64_t chunks, int H, int D, const float* slopes, float* state,
                           float* chunk_states) {
  const int h = blockIdx.y;
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= int64_t(D) * D) return;
  const float g = -slopes[h];
  float S = state[int64_t(h) * D * D + e];
  for (int64_t c = 0; c < chunks; ++c) {
    float* slot = chunk_states + (c * H + h) * int64_t(D) * D + e;
    const float contribution = *slot;
    *slot = S;  // S_in of chunk c
    S = __expf(g * float(ChunkLen(T, c))) * S + contribution;
  }
  state[int64_t(h) * D * D + e] = S;
}

__global__ void ChunkOutputKernel(const float* q, const float* k, const float* v, int64_t T, int H, int Hk, int D,
                                  float scale, const float* slopes, const float* chunk_states, float* o) {
  extern __shared__ float smem[];
  float* Q = smem;
  float* K = Q + kChunk * D;
  float* V = K + kChunk * D;
  float* A = V + kChunk * D;
  const int64_t c = blockIdx.x, t0 = c * kChunk;
  const int h = blockIdx.y, kh = h / (H / Hk);
  const float g = -slopes[h];
  const int len = ChunkLen(T, c);
  const float* S = chunk_states + (c * H + h) * int64_t(D) * D;
  for (int e = threadIdx.x; e < len * D; e += blockDim.x) {
    const int i = e / D, d = e % D;
    Q[e] = q[((t0 + i) * H + h) * D + d];
    K[e] = k[((t0 + i) * Hk + kh) * D + d];
    V[e] = v[((t0 + i) * Hk + kh) * D + d];
  }
  __syncthreads();
  for (int e = threadIdx.x; e < len * len; e += blockDim.x) {
    const int i = e / len, j = e % len;
    float acc = 0.0f;
    if (j <= i) {
      for (int d = 0; d < D; ++d) acc += Q[i * D + d] * K[j * D + d];
      acc *= scale * __expf(g * float(i - j));
    }
    A[i * kChunk + j] = acc;
  }
  __syncthreads();
  for (int e = threadIdx.x; e < len * D; e += blockDim.x) {
    const int i = e / D, col = e % D;
    float inter = 0.0f;
    for (int a = 0; a < D; ++a) inter += Q[i * D + a] * S[a * D + col];
    float intra = 0.0f;
    for (int j = 0; j <= i; ++j) intra += A[i * kChunk + j] * V[j * D + col];
    o[((t0 + i) * H + h) * D + col] = __expf(g * float(i + 1)) * scale * inter + intra;
  }
}

// One block per (sequence, head); thread `col` owns one value column of the state.
__global__ void StepKernel(const float* q, const float* k, const float* v, int H, int Hk, int D, float scale,
                           const float* slopes, float* const* states, float* o) {
  const int b = blockIdx.x, h = blockIdx.y, kh = h / (H / Hk), col = threadIdx.x;
  if (col >= D) return;
  const float decay = __expf(-slopes[h]);
  float* S = states[b] + int64_t(h) * D * D;
  const float* qh = q + (int64_t(b) * H + h) * D;
  const float* kk = k + (int64_t(b) * Hk + kh) * D;
  const float vc = v[(int64_t(b) * Hk + kh) * D + col];
  float acc = 0.0f;
  for (int a = 0; a < D; ++a) {
    const float s = decay * S[a * D + col] + kk[a] * vc;
    S[a * D + col] = s;
    acc += qh[a] * s;
  }
  o[(int64_t(b) * H + h) * D + col] = scale * acc;
}

}  // namespace

absl::Status LinearAttentionChunked(const float* q, const float* k, const float* v, int64_t T, int heads,
                                    int kv_heads, int dim, float scale, const float* slopes, float* state, float* o,
                                    DeviceBuffer<float>& chunk_states, cudaStream_t stream) {
  if (T == 0) return absl::OkStatus();
  if (dim > 128) return absl::InvalidArgumentError("linear attention supports head_dim up to 128");
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  // Per-chunk states: [chunks, heads, dim, dim] fp32.
  SALA_RETURN_IF_ERROR(chunk_states.Reserve(size_t(chunks) * heads * dim * dim));
  const size_t kv_smem = 2 * size_t(kChunk) * dim * sizeof(float);
  const size_t out_smem = (3 * size_t(kChunk) * dim + kChunk * kChunk) * sizeof(float);
  SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ChunkStateKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kv_smem)));
  SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ChunkOutputKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(out_smem)));
  const dim3 grid(unsigned(chunks), heads);
  ChunkStateKernel<<<grid, kThreads, kv_smem, stream>>>(k, v, T, heads, kv_heads, dim, slopes, chunk_states.get());
  SALA_CUDA_CHECK_LAUNCH();
  ScanKernel<<<dim3(unsigned((dim * dim + kThreads - 1) / kThreads), heads), kThreads, 0, stream>>>(
      T, chunks, heads, dim, slopes, state, chunk_states.get());
  SALA_CUDA_CHECK_LAUNCH();
  ChunkOutputKernel<<<grid, kThreads, out_smem, stream>>>(q, k, v, T, heads, kv_heads, dim, scale, slopes,
                                                          chunk_states.get(), o);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status LinearAttentionStep(const float* q, const float* k, const float* v, int batch, int heads, int kv_heads,
                                 int dim, float scale, const float* slopes, float* const* states, float* o,
                                 cudaStream_t stream) {
  if (batch == 0) return absl::OkStatus();
  StepKernel<<<dim3(batch, heads), dim, 0, stream>>>(q, k, v, heads, kv_heads, dim, scale, slopes, states, o);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

}  // namespace sala::cuda

#include "cuda_common.h"
#include "lightning.h"

namespace sala::cuda {
namespace {

constexpr int kChunk = 64;
constexpr int kThreads = 256;

// One block per head, chunks in order. Shared: Q, K, V of the chunk and the masked, decayed
// score matrix A; the state stays in global memory (L2-resident at these sizes).
__global__ void ChunkedKernel(const float* q, const float* k, const float* v, int64_t T, int H, int Hk, int D,
                              float scale, const float* slopes, float* states, float* o) {
  extern __shared__ float smem[];
  float* Q = smem;
  float* K = Q + kChunk * D;
  float* V = K + kChunk * D;
  float* A = V + kChunk * D;
  const int h = blockIdx.x, kh = h / (H / Hk);
  const float g = -slopes[h];
  float* S = states + int64_t(h) * D * D;
  for (int64_t t0 = 0; t0 < T; t0 += kChunk) {
    const int c = T - t0 < kChunk ? int(T - t0) : kChunk;
    for (int e = threadIdx.x; e < c * D; e += blockDim.x) {
      const int i = e / D, d = e % D;
      Q[e] = q[((t0 + i) * H + h) * D + d];
      K[e] = k[((t0 + i) * Hk + kh) * D + d];
      V[e] = v[((t0 + i) * Hk + kh) * D + d];
    }
    __syncthreads();
    // A[i][j] = s (q_i·k_j) exp(g (i − j)) for j ≤ i.
    for (int e = threadIdx.x; e < c * c; e += blockDim.x) {
      const int i = e / c, j = e % c;
      float acc = 0.0f;
      if (j <= i) {
        for (int d = 0; d < D; ++d) acc += Q[i * D + d] * K[j * D + d];
        acc *= scale * __expf(g * float(i - j));
      }
      A[i * kChunk + j] = acc;
    }
    __syncthreads();
    // O = exp(G_i) s Q S_in + A V.
    for (int e = threadIdx.x; e < c * D; e += blockDim.x) {
      const int i = e / D, col = e % D;
      float inter = 0.0f;
      for (int a = 0; a < D; ++a) inter += Q[i * D + a] * S[a * D + col];
      float intra = 0.0f;
      for (int j = 0; j <= i; ++j) intra += A[i * kChunk + j] * V[j * D + col];
      o[((t0 + i) * H + h) * D + col] = __expf(g * float(i + 1)) * scale * inter + intra;
    }
    __syncthreads();
    // S_out = exp(g c) S_in + Σ_j exp(g (c − 1 − j)) k_jᵀ v_j.
    const float decay_all = __expf(g * float(c));
    for (int e = threadIdx.x; e < D * D; e += blockDim.x) {
      const int a = e / D, col = e % D;
      float acc = 0.0f;
      for (int j = 0; j < c; ++j) acc += __expf(g * float(c - 1 - j)) * K[j * D + a] * V[j * D + col];
      S[e] = decay_all * S[e] + acc;
    }
    __syncthreads();
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
                                    cudaStream_t stream) {
  if (T == 0) return absl::OkStatus();
  if (dim > 128) return absl::InvalidArgumentError("linear attention supports head_dim up to 128");
  const size_t smem = (3 * size_t(kChunk) * dim + kChunk * kChunk) * sizeof(float);
  SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ChunkedKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  ChunkedKernel<<<heads, kThreads, smem, stream>>>(q, k, v, T, heads, kv_heads, dim, scale, slopes, state, o);
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

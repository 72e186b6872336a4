#include <algorithm>

#include "cuda_common.h"
#include "lightning.h"
#include "mma.cuh"
#include "rope.cuh"
#include "sala/status_macros.h"
#include "warp.cuh"

namespace sala::cuda {
namespace {

constexpr int kChunk = 64;
constexpr int kThreads = 256;  // eight warps
constexpr int kPad = 8;        // row padding of shared tiles: fragment loads hit 32 distinct banks

// Chunk-parallel form in three passes, so that all (chunk, head) pairs run at once:
//   1. ChunkStateKernel: each chunk's own contribution dS_c = Σ_j exp(g (c − 1 − j)) k_jᵀ v_j;
//   2. ScanKernel: S_in of every chunk by S ← exp(g c) S + dS_c, in order (element-parallel);
//   3. ChunkOutputKernel: O = exp(G_i) s Q S_in + (s Q Kᵀ ⊙ decay mask) V within the chunk.
// dS_c is overwritten by S_in of the same chunk in pass 2. Passes 1 and 3 run on tensor cores
// (tf32 inputs, fp32 accumulation); shared tiles hold tf32 bit patterns.
__device__ int ChunkLen(int64_t T, int64_t c) { return T - c * kChunk < kChunk ? int(T - c * kChunk) : kChunk; }

// Copies rows [0, len) of a [rows, heads, kDim] fp32 tensor's head `h` into a padded tf32 tile,
// multiplied by row_scale(row); rows [len, kChunk) become 0.
template <int kDim, typename Scale>
__device__ void LoadTile(uint32_t* tile, const float* src, int64_t row0, int len, int heads, int h, Scale row_scale) {
  for (int e = threadIdx.x; e < kChunk * kDim / 4; e += kThreads) {
    const int row = e / (kDim / 4), c4 = e % (kDim / 4);
    float4 v{0, 0, 0, 0};
    if (row < len) {
      v = *reinterpret_cast<const float4*>(src + ((row0 + row) * heads + h) * kDim + c4 * 4);
      const float w = row_scale(row);
      v = {v.x * w, v.y * w, v.z * w, v.w * w};
    }
    uint32_t* d = tile + row * (kDim + kPad) + c4 * 4;
    d[0] = ToTf32(v.x);
    d[1] = ToTf32(v.y);
    d[2] = ToTf32(v.z);
    d[3] = ToTf32(v.w);
  }
}

// dS = K̃ᵀ V with K̃ the decayed keys: warp w computes state rows (key dims) 16 (w % (kDim / 16)) ..
// + 15, over value columns split evenly between the warps that share those rows.
template <int kDim>
__global__ void __launch_bounds__(kThreads) ChunkStateKernel(const float* k, const float* v, int64_t T, int H, int Hk,
                                                             const float* slopes, float* chunk_states) {
  extern __shared__ __align__(16) uint32_t lsmem[];
  uint32_t* K = lsmem;                     // [kChunk, kDim + kPad]
  uint32_t* V = K + kChunk * (kDim + kPad);
  const int64_t c = blockIdx.x;
  const int h = blockIdx.y, kh = h / (H / Hk);
  const float g = -slopes[h];
  const int len = ChunkLen(T, c);
  LoadTile<kDim>(K, k, c * kChunk, len, Hk, kh, [&](int j) { return __expf(g * float(len - 1 - j)); });
  LoadTile<kDim>(V, v, c * kChunk, len, Hk, kh, [](int) { return 1.0f; });
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
  constexpr int kRowTiles = kDim / 16, kCols = kDim * kRowTiles / 8;
  const int a0 = 16 * (warp % kRowTiles), col0 = kCols * (warp / kRowTiles);
  float acc[kCols / 8][4] = {};
  for (int kk = 0; kk < kChunk / 8; ++kk) {
    const int j = kk * 8 + tq;
    const uint32_t a[4] = {K[j * (kDim + kPad) + a0 + gq], K[j * (kDim + kPad) + a0 + gq + 8],
                           K[(j + 4) * (kDim + kPad) + a0 + gq], K[(j + 4) * (kDim + kPad) + a0 + gq + 8]};
#pragma unroll
    for (int n = 0; n < kCols / 8; ++n)
      MmaTf32(acc[n], a, V[j * (kDim + kPad) + col0 + n * 8 + gq], V[(j + 4) * (kDim + kPad) + col0 + n * 8 + gq]);
  }
  float* out = chunk_states + (c * H + h) * int64_t(kDim) * kDim;
#pragma unroll
  for (int n = 0; n < kCols / 8; ++n) {
    const int col = col0 + n * 8 + 2 * tq;
    *reinterpret_cast<float2*>(out + (a0 + gq) * kDim + col) = float2{acc[n][0], acc[n][1]};
    *reinterpret_cast<float2*>(out + (a0 + gq + 8) * kDim + col) = float2{acc[n][2], acc[n][3]};
  }
}

constexpr int kScanAhead = 16;

__global__ void ScanKernel(int64_t T, int64_t chunks, int H, int D, const float* slopes, float* state,
                           float* chunk_states) {
  const int h = blockIdx.y;
  const int64_t e = blockIdx.x * int64_t(blockDim.x) + threadIdx.x;
  if (e >= int64_t(D) * D) return;
  const float g = -slopes[h];
  float S = state[int64_t(h) * D * D + e];
  // The chunks' contributions do not depend on the running state: kScanAhead of them are loaded
  // before the recurrence uses them, so the scan waits for memory once per batch, not per chunk.
  const int64_t stride = int64_t(H) * D * D;
  float* slots = chunk_states + int64_t(h) * D * D + e;
  for (int64_t c0 = 0; c0 < chunks; c0 += kScanAhead) {
    float contribution[kScanAhead];
#pragma unroll
    for (int j = 0; j < kScanAhead; ++j)
      if (c0 + j < chunks) contribution[j] = slots[(c0 + j) * stride];
#pragma unroll
    for (int j = 0; j < kScanAhead; ++j) {
      const int64_t c = c0 + j;
      if (c >= chunks) break;
      slots[c * stride] = S;  // S_in of chunk c
      S = __expf(g * float(ChunkLen(T, c))) * S + contribution[j];
    }
  }
  state[int64_t(h) * D * D + e] = S;
}

// Warp w owns output rows 16 (w % 4) .. + 15 and, for the score tile, keys 32 (w / 4) .. + 31;
// for the output, value columns kDim / 2 (w / 4) .. onwards.
template <int kDim>
__global__ void __launch_bounds__(kThreads) ChunkOutputKernel(const float* q, const float* k, const float* v, int64_t T,
                                                              int H, int Hk, float scale, const float* slopes,
                                                              const float* chunk_states, float* o) {
  extern __shared__ __align__(16) uint32_t lsmem[];
  uint32_t* Q = lsmem;                        // [kChunk, kDim + kPad]
  uint32_t* K = Q + kChunk * (kDim + kPad);   // [kChunk, kDim + kPad]; later the scores [kChunk, kChunk + kPad]
  uint32_t* V = K + kChunk * (kDim + kPad);
  uint32_t* S = V + kChunk * (kDim + kPad);   // S_in [kDim, kDim + kPad]
  const int64_t c = blockIdx.x, t0 = c * kChunk;
  const int h = blockIdx.y, kh = h / (H / Hk);
  const float g = -slopes[h];
  const int len = ChunkLen(T, c);
  const auto one = [](int) { return 1.0f; };
  LoadTile<kDim>(Q, q, t0, len, H, h, one);
  LoadTile<kDim>(K, k, t0, len, Hk, kh, one);
  LoadTile<kDim>(V, v, t0, len, Hk, kh, one);
  const float* Sg = chunk_states + (c * H + h) * int64_t(kDim) * kDim;
  for (int e = threadIdx.x; e < kDim * kDim / 4; e += kThreads) {
    const int row = e / (kDim / 4), c4 = e % (kDim / 4);
    const float4 x = *reinterpret_cast<const float4*>(Sg + row * kDim + c4 * 4);
    uint32_t* d = S + row * (kDim + kPad) + c4 * 4;
    d[0] = ToTf32(x.x);
    d[1] = ToTf32(x.y);
    d[2] = ToTf32(x.z);
    d[3] = ToTf32(x.w);
  }
  __syncthreads();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
  const int i0 = 16 * (warp % 4), half = warp / 4;

  // Scores A = s Q Kᵀ ⊙ exp(g (i − j)) [j <= i] for rows i0.., keys 32 half ..
  float sc[4][4] = {};
  for (int kk = 0; kk < kDim / 8; ++kk) {
    const int d = kk * 8 + tq;
    const uint32_t a[4] = {Q[(i0 + gq) * (kDim + kPad) + d], Q[(i0 + gq + 8) * (kDim + kPad) + d],
                           Q[(i0 + gq) * (kDim + kPad) + d + 4], Q[(i0 + gq + 8) * (kDim + kPad) + d + 4]};
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int j = 32 * half + n * 8 + gq;
      MmaTf32(sc[n], a, K[j * (kDim + kPad) + d], K[j * (kDim + kPad) + d + 4]);
    }
  }
  // Inter-chunk part first: oacc = Q S_in over this warp's value columns, scaled per row below.
  constexpr int kOutTiles = kDim / 16;
  float oacc[kOutTiles][4] = {};
  for (int kk = 0; kk < kDim / 8; ++kk) {
    const int d = kk * 8 + tq;
    const uint32_t a[4] = {Q[(i0 + gq) * (kDim + kPad) + d], Q[(i0 + gq + 8) * (kDim + kPad) + d],
                           Q[(i0 + gq) * (kDim + kPad) + d + 4], Q[(i0 + gq + 8) * (kDim + kPad) + d + 4]};
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
      const int col = kDim / 2 * half + n * 8 + gq;
      MmaTf32(oacc[n], a, S[d * (kDim + kPad) + col], S[(d + 4) * (kDim + kPad) + col]);
    }
  }
  __syncthreads();  // every warp is done with K: the score tile takes its place
  uint32_t* A = K;
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i0 + gq + 8 * (e / 2), j = 32 * half + n * 8 + 2 * tq + (e % 2);
      const float w = j <= i ? scale * __expf(g * float(i - j)) : 0.0f;
      A[i * (kChunk + kPad) + j] = ToTf32(sc[n][e] * w);
    }
  const float row_scale[2] = {scale * __expf(g * float(i0 + gq + 1)), scale * __expf(g * float(i0 + gq + 9))};
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) oacc[n][e] *= row_scale[e / 2];
  __syncthreads();
  // Intra-chunk part: oacc += A V (keys up to the row: A is zero above the diagonal).
  for (int kk = 0; kk < kChunk / 8; ++kk) {
    const int j = kk * 8 + tq;
    const uint32_t a[4] = {A[(i0 + gq) * (kChunk + kPad) + j], A[(i0 + gq + 8) * (kChunk + kPad) + j],
                           A[(i0 + gq) * (kChunk + kPad) + j + 4], A[(i0 + gq + 8) * (kChunk + kPad) + j + 4]};
#pragma unroll
    for (int n = 0; n < kOutTiles; ++n) {
      const int col = kDim / 2 * half + n * 8 + gq;
      MmaTf32(oacc[n], a, V[j * (kDim + kPad) + col], V[(j + 4) * (kDim + kPad) + col]);
    }
  }
#pragma unroll
  for (int n = 0; n < kOutTiles; ++n)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = i0 + gq + 8 * r;
      if (i < len)
        *reinterpret_cast<float2*>(o + ((t0 + i) * H + h) * kDim + kDim / 2 * half + n * 8 + 2 * tq) =
            float2{oacc[n][2 * r], oacc[n][2 * r + 1]};
    }
}

// Decode: one block per (sequence, head). A thread owns four adjacent columns (16-byte loads and
// stores of the state) of every rows_per_pass-th row, so a block streams its 64 KiB state with
// many loads in flight; the row groups' partial outputs are summed in shared memory.
constexpr int kStepThreads = 512;
constexpr int kStepMaxDim = 128;
// State rows per thread at most: dim / (threads / (dim / 4)) = dim² / 2048 for dim 128.
constexpr int kStepRows = kStepMaxDim * kStepMaxDim / (4 * kStepThreads);

__global__ void StepKernel(const float* q, const float* k, const float* v, int H, int Hk, int D, float scale,
                           const float* slopes, float* const* states, float* o, StepHeadPrep prep,
                           double log2_theta) {
  __shared__ float4 partial[kStepThreads];
  __shared__ float qs[kStepMaxDim], ks[kStepMaxDim], norm_part[4];
  const int b = blockIdx.x, h = blockIdx.y, kh = h / (H / Hk);
  const int quads = D / 4, groups = blockDim.x / quads, t = threadIdx.x, c4 = t % quads, group = t / quads;
  const float decay = __expf(-slopes[h]);
  float* S = states[b] + int64_t(h) * D * D;
  const float4 vc = reinterpret_cast<const float4*>(v + (int64_t(b) * Hk + kh) * D)[c4];

  // This head's q and its group's k, normed and rotated into shared memory as HeadNormRope
  // would (the same sums in the same order): threads 0-63 take the pairs (j, j + D/2) of q,
  // threads 64-127 those of k. Every block does its own: a few hundred flops, not a launch.
  const bool prep_k = t >= 64;
  const int j = t % 64, half = D / 2;
  const float* head = prep_k ? k + (int64_t(b) * Hk + kh) * D : q + (int64_t(b) * H + h) * D;
  const __nv_bfloat16* w = prep_k ? prep.k_norm : prep.q_norm;
  float pa = 0.0f, pb = 0.0f;
  if (t < 128 && j < half) {
    pa = head[j];
    pb = head[j + half];
  }
  if (t < 128) {
    const float ss = WarpSum(pa * pa + pb * pb);
    if (t % 32 == 0) norm_part[t / 32] = ss;
  }
  __syncthreads();
  if (t < 128 && j < half) {
    if (w) {
      const float inv = rsqrtf((norm_part[2 * prep_k] + norm_part[2 * prep_k + 1]) / D + prep.eps);
      pa = pa * inv * __bfloat162float(w[j]);
      pb = pb * inv * __bfloat162float(w[j + half]);
    }
    if (prep.rope) RotatePair(pa, pb, j, D, prep.positions[b], log2_theta);
    float* dst = prep_k ? ks : qs;
    dst[j] = pa;
    dst[j + half] = pb;
  }
  __syncthreads();
  float4 acc = make_float4(0.0f, 0.0f, 0.0f, 0.0f);
  // All of this thread's state rows are loaded before the first is stored: a store in between
  // would keep the compiler from issuing later loads early (they might alias), and the step
  // would wait for memory once per row.
  float4 st[kStepRows];
  float ka[kStepRows], qa[kStepRows];
#pragma unroll
  for (int i = 0; i < kStepRows; ++i) {
    const int a = group + i * groups;
    if (a < D) {
      st[i] = reinterpret_cast<const float4*>(S + int64_t(a) * D)[c4];
      ka[i] = ks[a];
      qa[i] = qs[a];
    }
  }
#pragma unroll
  for (int i = 0; i < kStepRows; ++i) {
    const int a = group + i * groups;
    if (a >= D) continue;
    st[i].x = decay * st[i].x + ka[i] * vc.x;
    st[i].y = decay * st[i].y + ka[i] * vc.y;
    st[i].z = decay * st[i].z + ka[i] * vc.z;
    st[i].w = decay * st[i].w + ka[i] * vc.w;
    reinterpret_cast<float4*>(S + int64_t(a) * D)[c4] = st[i];
    acc.x += qa[i] * st[i].x;
    acc.y += qa[i] * st[i].y;
    acc.z += qa[i] * st[i].z;
    acc.w += qa[i] * st[i].w;
  }
  partial[t] = acc;
  __syncthreads();
  if (t >= quads) return;
  float4 sum = partial[t];
  for (int g = 1; g < groups; ++g) {
    const float4 x = partial[g * quads + t];
    sum.x += x.x;
    sum.y += x.y;
    sum.z += x.z;
    sum.w += x.w;
  }
  reinterpret_cast<float4*>(o + (int64_t(b) * H + h) * D)[t] =
      make_float4(scale * sum.x, scale * sum.y, scale * sum.z, scale * sum.w);
}

template <int kDim>
absl::Status LaunchChunked(const float* q, const float* k, const float* v, int64_t T, int heads, int kv_heads,
                           float scale, const float* slopes, float* state, float* o, float* chunk_states,
                           cudaStream_t stream) {
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  const size_t tile = size_t(kChunk) * (kDim + kPad) * sizeof(uint32_t);
  const size_t state_smem = 2 * tile;
  const size_t out_smem = 3 * tile + size_t(kDim) * (kDim + kPad) * sizeof(uint32_t);
  SALA_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(ChunkStateKernel<kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(state_smem)));
  SALA_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(ChunkOutputKernel<kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(out_smem)));
  const dim3 grid(unsigned(chunks), heads);
  ChunkStateKernel<kDim><<<grid, kThreads, state_smem, stream>>>(k, v, T, heads, kv_heads, slopes, chunk_states);
  SALA_CUDA_CHECK_LAUNCH();
  ScanKernel<<<dim3(unsigned((kDim * kDim + kThreads - 1) / kThreads), heads), kThreads, 0, stream>>>(
      T, chunks, heads, kDim, slopes, state, chunk_states);
  SALA_CUDA_CHECK_LAUNCH();
  ChunkOutputKernel<kDim><<<grid, kThreads, out_smem, stream>>>(q, k, v, T, heads, kv_heads, scale, slopes,
                                                                chunk_states, o);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

}  // namespace

absl::Status LinearAttentionChunked(const float* q, const float* k, const float* v, int64_t T, int heads,
                                    int kv_heads, int dim, float scale, const float* slopes, float* state, float* o,
                                    DeviceBuffer<float>& chunk_states, cudaStream_t stream) {
  if (T == 0) return absl::OkStatus();
  if (dim != 64 && dim != 128) return absl::InvalidArgumentError("linear attention prefill needs head_dim 64 or 128");
  // Per-chunk states: [chunks, heads, dim, dim] fp32.
  SALA_RETURN_IF_ERROR(chunk_states.Reserve(size_t((T + kChunk - 1) / kChunk) * heads * dim * dim));
  return dim == 128 ? LaunchChunked<128>(q, k, v, T, heads, kv_heads, scale, slopes, state, o, chunk_states.get(), stream)
                    : LaunchChunked<64>(q, k, v, T, heads, kv_heads, scale, slopes, state, o, chunk_states.get(), stream);
}

absl::Status LinearAttentionStep(const float* q, const float* k, const float* v, int batch, int heads, int kv_heads,
                                 int dim, float scale, const float* slopes, float* const* states, float* o,
                                 const StepHeadPrep& prep, cudaStream_t stream) {
  if (batch == 0) return absl::OkStatus();
  // From 32 on a block has the 128 threads that prepare q and k.
  if (dim % 4 != 0 || dim < 32 || dim > kStepMaxDim)
    return absl::InvalidArgumentError("linear head dim must be 32..128, a multiple of 4");
  if (prep.rope && (prep.positions == nullptr || !(prep.theta > 0.0)))
    return absl::InvalidArgumentError("RoPE in the decode step needs positions and theta > 0");
  const int quads = dim / 4, threads = std::min(kStepThreads / quads, dim) * quads;
  StepKernel<<<dim3(batch, heads), threads, 0, stream>>>(q, k, v, heads, kv_heads, dim, scale, slopes, states, o,
                                                         prep, prep.rope ? std::log2(prep.theta) : 0.0);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

}  // namespace sala::cuda

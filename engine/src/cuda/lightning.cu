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
constexpr int kThreads = 256;   // eight warps
constexpr int kSliceCols = 32;  // value columns (of the state and the output) per block

// One block per (value-column slice, head) walks the sequence in 64-token chunks with its slice
// of the state in registers, so no per-chunk state ever leaves the chip (MODEL_SPEC §3):
//   O   = exp(G_i) s Q S_in + (s Q Kᵀ ⊙ exp(G_i − G_j) [j <= i]) V
//   S_out = exp(g len) S_in + (K ⊙ exp(g (len − 1 − j)))ᵀ V
// The four slices of a head each recompute the chunk's Q Kᵀ, rather than share it through another
// pass over global memory. Tensor cores take tf32: q and k enter as fp32 bit patterns (the MMA drops
// the low mantissa bits); v, the scores and the state are rounded to nearest on their way into
// shared memory (truncating those as well changed the built-in model's greedy tokens against
// the CPU oracle).
//
// Fragments come from ldmatrix, whose 8x8 b16 matrices are 8 rows of four 32-bit words: lane
// (g, t) receives word t of row g, which is a tf32 fragment's layout when the rows are the
// operand's m or n index and the words its k index. So every tile is stored with the summation
// index of its product along the row: Q and K [token][dim], the scores [token][key], Vᵀ and the
// decayed Vᵀ [column][token], Sᵀ [column][key dim]. Row strides of 4 words mod 8 put the eight
// rows of a matrix on different banks. Only the state update reads Kᵀ, word by word.
template <int kDim>
struct ChunkTiles {
  static constexpr int kQKStride = kDim + 4;     // Q, K [token][dim]; Sᵀ [column][key dim]
  static constexpr int kKeyStride = kChunk + 4;  // scores [token][key]; Vᵀ, decayed Vᵀ [column][token]
  static constexpr int kQKTile = kChunk * kQKStride;
  static constexpr int kVTile = kSliceCols * kKeyStride;
  static constexpr int kQ = 0;  // [2 stages][kChunk][kQKStride]
  static constexpr int kK = kQ + 2 * kQKTile;
  static constexpr int kV = kK + 2 * kQKTile;  // [2][kSliceCols][kKeyStride]
  static constexpr int kVDecayed = kV + 2 * kVTile;
  static constexpr int kSTile = kSliceCols * kQKStride;
  static constexpr int kS = kVDecayed + 2 * kVTile;  // [2][kSliceCols][kQKStride]: this block's S_inᵀ
  static constexpr int kA = kS + 2 * kSTile;         // [kChunk][kKeyStride]
  static constexpr size_t kBytes = size_t(kA + kChunk * kKeyStride) * sizeof(uint32_t);
};

__device__ int ChunkLen(int64_t T, int64_t c) { return T - c * kChunk < kChunk ? int(T - c * kChunk) : kChunk; }

// The A fragment of rows r0 .. r0 + 15, k 8 kk .. + 7 of a row-major tile.
__device__ __forceinline__ void LoadA(uint32_t (&a)[4], const uint32_t* tile, int stride, int r0, int kk) {
  const int lane = threadIdx.x % 32;
  LdMatrixX4(a, tile + (r0 + lane % 8 + 8 * (lane / 8 % 2)) * stride + 8 * kk + 4 * (lane / 16));
}
// B fragments of rows (n) n0 .. n0 + 7 for k steps 2 kp and 2 kp + 1: {b0, b1} of each.
__device__ __forceinline__ void LoadB2(uint32_t (&b)[4], const uint32_t* tile, int stride, int n0, int kp) {
  const int lane = threadIdx.x % 32;
  LdMatrixX4(b, tile + (n0 + lane % 8) * stride + 16 * kp + 4 * (lane / 8));
}
__device__ __forceinline__ void MmaTf32Pair(float (&d)[4], const uint32_t (&a0)[4], const uint32_t (&a1)[4],
                                            const uint32_t (&b)[4]) {
  MmaTf32(d, a0, b[0], b[1]);
  MmaTf32(d, a1, b[2], b[3]);
}

// Warp w: query rows 16 (w % 4) .. + 15; for the scores keys 32 (w / 4) .. + 31, for the output
// value columns 16 (w / 4) .. + 15 of the slice; for the state, key dims and columns of an even
// share of the slice (kDim 128: 16 key dims, all 32 columns).
template <int kDim>
__global__ void __launch_bounds__(kThreads, 1)
    ChunkedKernel(const float* q, const float* k, const float* v, int64_t T, int H, int Hk, float scale,
                  const float* slopes, float* state, float* o) {
  using L = ChunkTiles<kDim>;
  extern __shared__ __align__(16) uint32_t lsmem[];
  const int h = blockIdx.y, kh = h / (H / Hk), col0 = blockIdx.x * kSliceCols;
  const float g = -slopes[h];
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
  const int i0 = 16 * (warp % 4), half = warp / 4;
  constexpr int kStateRowTiles = kDim / 16, kStateWarpsPerRow = kThreads / 32 / kStateRowTiles;
  constexpr int kStateTiles = kSliceCols / 8 / kStateWarpsPerRow;  // 8-column tiles per warp
  const int s0 = 16 * (warp % kStateRowTiles), sc0 = 8 * kStateTiles * (warp / kStateRowTiles);
  uint32_t* A = lsmem + L::kA;

  // q and k: each thread copies 16-byte pieces of one column position in every kRowStep-th row.
  constexpr int kPieces = kDim / 4, kRowStep = kThreads / kPieces;
  const int piece_row = threadIdx.x / kPieces, piece_col = 4 * (threadIdx.x % kPieces);
  const int64_t q_row = int64_t(H) * kDim, k_row = int64_t(Hk) * kDim;  // floats between tokens
  const float* q_piece = q + int64_t(piece_row) * q_row + h * kDim + piece_col;
  const float* k_piece = k + int64_t(piece_row) * k_row + kh * kDim + piece_col;
  const auto issue_qk = [&](int64_t c, int stage) {
    uint32_t* Qs = lsmem + L::kQ + stage * L::kQKTile + piece_row * L::kQKStride + piece_col;
    uint32_t* Ks = lsmem + L::kK + stage * L::kQKTile + piece_row * L::kQKStride + piece_col;
    const int len = ChunkLen(T, c);
    const float* qc = q_piece + c * kChunk * q_row;
    const float* kc = k_piece + c * kChunk * k_row;
#pragma unroll
    for (int r = 0; r < kChunk; r += kRowStep) {
      const bool valid = piece_row + r < len;  // rows past the end are zero-filled from row 0
      CpAsync16(Qs + r * L::kQKStride, valid ? qc + r * q_row : qc, valid);
      CpAsync16(Ks + r * L::kQKStride, valid ? kc + r * k_row : kc, valid);
    }
    CpAsyncCommit();
  };
  // The slice of v, transposed: lane = token (of 32), the warp's 8 columns, loaded a chunk ahead
  // into registers, then stored rounded, plus the copy decayed for the state update.
  static_assert(kChunk * kSliceCols / 8 == kThreads, "two 16-byte pieces of v per thread");
  const int v_row = 32 * (warp / 4) + lane, v_col = 8 * (warp % 4);
  const auto load_v = [&](int64_t c, float4 (&x)[2]) {
    x[0] = x[1] = float4{0, 0, 0, 0};
    if (v_row < ChunkLen(T, c)) {
      const float4* src = reinterpret_cast<const float4*>(v + ((c * kChunk + v_row) * Hk + kh) * kDim + col0 + v_col);
      x[0] = src[0];
      x[1] = src[1];
    }
  };
  const auto store_v = [&](int64_t c, int stage, const float4 (&x)[2]) {
    const float w = __expf(g * float(ChunkLen(T, c) - 1 - v_row));
    uint32_t* Vt = lsmem + L::kV + stage * L::kVTile + v_col * L::kKeyStride + v_row;
    uint32_t* Vd = lsmem + L::kVDecayed + stage * L::kVTile + v_col * L::kKeyStride + v_row;
    const float e[8] = {x[0].x, x[0].y, x[0].z, x[0].w, x[1].x, x[1].y, x[1].z, x[1].w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      Vt[i * L::kKeyStride] = ToTf32(e[i]);
      Vd[i * L::kKeyStride] = ToTf32(w * e[i]);
    }
  };
  // Sᵀ alternates between two buffers, so that a chunk's S_out can be stored while other warps
  // still read its S_in.
  const auto store_state = [&](const float (&acc)[kStateTiles][4], int64_t c) {
#pragma unroll
    for (int n = 0; n < kStateTiles; ++n) {
      uint32_t* col = lsmem + L::kS + (c & 1) * L::kSTile + (sc0 + 8 * n + 2 * tq) * L::kQKStride + s0 + gq;
      col[0] = ToTf32(acc[n][0]);
      col[L::kQKStride] = ToTf32(acc[n][1]);
      col[8] = ToTf32(acc[n][2]);
      col[L::kQKStride + 8] = ToTf32(acc[n][3]);
    }
  };
  // Per-thread constants: the decay mask of its score entries, and the decay of its rows' S_in term.
  float mask[4][4];
#pragma unroll
  for (int n = 0; n < 4; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      const int i = i0 + gq + 8 * (e / 2), j = 32 * half + 8 * n + 2 * tq + e % 2;
      mask[n][e] = j <= i ? scale * __expf(g * float(i - j)) : 0.0f;
    }
  const float row_scale[2] = {scale * __expf(g * float(i0 + gq + 1)), scale * __expf(g * float(i0 + gq + 9))};

  float4 v_next[2];
  issue_qk(0, 0);
  load_v(0, v_next);
  store_v(0, 0, v_next);
  float* state_h = state + int64_t(h) * kDim * kDim;
  float sacc[kStateTiles][4];
#pragma unroll
  for (int n = 0; n < kStateTiles; ++n) {
    const int col = col0 + sc0 + 8 * n + 2 * tq;
    const float2 lo = *reinterpret_cast<const float2*>(state_h + (s0 + gq) * kDim + col);
    const float2 hi = *reinterpret_cast<const float2*>(state_h + (s0 + gq + 8) * kDim + col);
    sacc[n][0] = lo.x, sacc[n][1] = lo.y, sacc[n][2] = hi.x, sacc[n][3] = hi.y;
  }
  store_state(sacc, 0);

  for (int64_t c = 0; c < chunks; ++c) {
    const int stage = int(c & 1), len = ChunkLen(T, c);
    CpAsyncWait<0>();
    __syncthreads();  // chunk c's tiles and S_in are in place; every warp is done with chunk c − 1
    if (c + 1 < chunks) {
      issue_qk(c + 1, stage ^ 1);
      load_v(c + 1, v_next);
    }
    const uint32_t* Qs = lsmem + L::kQ + stage * L::kQKTile;
    const uint32_t* Ks = lsmem + L::kK + stage * L::kQKTile;
    const uint32_t* Vt = lsmem + L::kV + stage * L::kVTile;
    const uint32_t* Vd = lsmem + L::kVDecayed + stage * L::kVTile;
    const uint32_t* St = lsmem + L::kS + stage * L::kSTile;

    uint32_t qf[kDim / 8][4];
#pragma unroll
    for (int kk = 0; kk < kDim / 8; ++kk) LoadA(qf[kk], Qs, L::kQKStride, i0, kk);
    // Scores of this warp's rows against its 32 keys, the tiles wholly above the diagonal skipped.
    float sc[4][4] = {};
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int j0 = 32 * half + 8 * n;
      if (j0 > i0 + 15) break;
#pragma unroll
      for (int kp = 0; kp < kDim / 16; ++kp) {
        uint32_t b[4];
        LoadB2(b, Ks, L::kQKStride, j0, kp);
        MmaTf32Pair(sc[n], qf[2 * kp], qf[2 * kp + 1], b);
      }
    }
#pragma unroll
    for (int n = 0; n < 4; ++n) {
      const int j0 = 32 * half + 8 * n;
      if (j0 > i0 + 15) break;
#pragma unroll
      for (int e = 0; e < 4; e += 2)  // rows g and g + 8, two adjacent keys each
        *reinterpret_cast<uint2*>(A + (i0 + gq + 8 * (e / 2)) * L::kKeyStride + j0 + 2 * tq) =
            uint2{ToTf32(sc[n][e] * mask[n][e]), ToTf32(sc[n][e + 1] * mask[n][e + 1])};
    }
    // Inter-chunk part: Q S_in over this warp's 16 columns.
    float oacc[2][4] = {};
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int kp = 0; kp < kDim / 16; ++kp) {
        uint32_t b[4];
        LoadB2(b, St, L::kQKStride, 16 * half + 8 * n, kp);
        MmaTf32Pair(oacc[n], qf[2 * kp], qf[2 * kp + 1], b);
      }
    // The rows' score tile is complete: only the two warps of these rows wrote and read it.
    asm volatile("bar.sync %0, 64;\n" ::"r"(1 + warp % 4));
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) oacc[n][e] *= row_scale[e / 2];
    // Intra-chunk part: keys up to the last row of the warp's tile, 16 at a time.
#pragma unroll
    for (int kp = 0; kp < kChunk / 16; ++kp) {
      if (16 * kp > i0) break;
      uint32_t a0[4], a1[4];
      LoadA(a0, A, L::kKeyStride, i0, 2 * kp);
      LoadA(a1, A, L::kKeyStride, i0, 2 * kp + 1);
#pragma unroll
      for (int n = 0; n < 2; ++n) {
        uint32_t b[4];
        LoadB2(b, Vt, L::kKeyStride, 16 * half + 8 * n, kp);
        MmaTf32Pair(oacc[n], a0, a1, b);
      }
    }
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int i = i0 + gq + 8 * r;
        if (i < len)
          *reinterpret_cast<float2*>(o + ((c * kChunk + i) * H + h) * kDim + col0 + 16 * half + 8 * n + 2 * tq) =
              float2{oacc[n][2 * r], oacc[n][2 * r + 1]};
      }
    // State: S_out = exp(g len) S_in + Kᵀ (decayed V) in registers, then S_outᵀ rounded for the
    // next chunk's Q S_in.
    const float chunk_decay = __expf(g * float(len));
#pragma unroll
    for (int n = 0; n < kStateTiles; ++n)
#pragma unroll
      for (int e = 0; e < 4; ++e) sacc[n][e] *= chunk_decay;
#pragma unroll
    for (int kp = 0; kp < kChunk / 16; ++kp) {
      uint32_t a[2][4];
#pragma unroll
      for (int s = 0; s < 2; ++s) {
        const uint32_t* r = Ks + (16 * kp + 8 * s + tq) * L::kQKStride + s0 + gq;
        a[s][0] = r[0], a[s][1] = r[8], a[s][2] = r[4 * L::kQKStride], a[s][3] = r[4 * L::kQKStride + 8];
      }
#pragma unroll
      for (int n = 0; n < kStateTiles; ++n) {
        uint32_t b[4];
        LoadB2(b, Vd, L::kKeyStride, sc0 + 8 * n, kp);
        MmaTf32Pair(sacc[n], a[0], a[1], b);
      }
    }
    store_state(sacc, c + 1);
    if (c + 1 < chunks) store_v(c + 1, stage ^ 1, v_next);
  }
#pragma unroll
  for (int n = 0; n < kStateTiles; ++n) {
    const int col = col0 + sc0 + 8 * n + 2 * tq;
    *reinterpret_cast<float2*>(state_h + (s0 + gq) * kDim + col) = float2{sacc[n][0], sacc[n][1]};
    *reinterpret_cast<float2*>(state_h + (s0 + gq + 8) * kDim + col) = float2{sacc[n][2], sacc[n][3]};
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
                           float scale, const float* slopes, float* state, float* o, cudaStream_t stream) {
  constexpr size_t smem = ChunkTiles<kDim>::kBytes;
  SALA_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(ChunkedKernel<kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  ChunkedKernel<kDim><<<dim3(kDim / kSliceCols, heads), kThreads, smem, stream>>>(q, k, v, T, heads, kv_heads, scale,
                                                                                   slopes, state, o);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

}  // namespace

absl::Status LinearAttentionChunked(const float* q, const float* k, const float* v, int64_t T, int heads,
                                    int kv_heads, int dim, float scale, const float* slopes, float* state, float* o,
                                    cudaStream_t stream) {
  if (T == 0) return absl::OkStatus();
  if (dim != 64 && dim != 128) return absl::InvalidArgumentError("linear attention prefill needs head_dim 64 or 128");
  if (kv_heads <= 0 || heads % kv_heads != 0)
    return absl::InvalidArgumentError("linear attention prefill needs heads a multiple of kv_heads");
  return dim == 128 ? LaunchChunked<128>(q, k, v, T, heads, kv_heads, scale, slopes, state, o, stream)
                    : LaunchChunked<64>(q, k, v, T, heads, kv_heads, scale, slopes, state, o, stream);
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

#include <algorithm>
#include <map>
#include <mutex>
#include <utility>

#include "cuda_common.h"
#include "lightning.h"
#include "mma.cuh"
#include "rope.cuh"
#include "sala/status_macros.h"
#include "warp.cuh"
#include "wgmma.cuh"

namespace sala::cuda {
namespace {

constexpr int kChunk = 64;
constexpr float kLog2e = 1.4426950408889634f;
// The state is held divided by 64, so that as an f16 MMA operand it stays in range up to a
// magnitude of 4M; the decay weights of the update carry the factor.
constexpr float kStateScale = 1.0f / 64;

// Prefill walks 64-token chunks with each warp holding 16 value columns of the head's state
// (Sᵀ, fp32, in MMA accumulators), so the state never passes through shared memory:
//   Oᵀ     = exp(G_i) s Sᵀ_in Qᵀ + Vᵀ (s Q Kᵀ ⊙ exp(G_i − G_j) [j <= i])ᵀ
//   Sᵀ_out = exp(g len) Sᵀ_in + (V ⊙ exp(g (len − 1 − j)))ᵀ K
// An Sᵀ accumulator fragment, packed to f16 pairs, is the A fragment of the next product. The
// scores are the one thing the warps share: computed by all, through shared memory.
//
// Parallel over segments of the sequence: SegmentStatesKernel first computes each segment's own
// state (from zero), CombineStatesKernel chains them into each segment's starting state, and
// ChunkedKernel walks each segment from there (WgChunkedKernel on Hopper, the same math as
// warpgroup MMAs). Operands are f16 (q and k as HeadNormRope leaves them, v converted from bf16
// on its way into a fragment, the scores and the state packed), accumulation fp32.
template <int kDim>
struct Tiles {
  static constexpr int kWarps = kDim / 16;  // a warp per 16 value columns
  static constexpr int kThreads = 32 * kWarps;
  // Rows padded by 16 bytes, so that ldmatrix's eight row addresses fall in different banks (and
  // every address is a lane's base plus a constant).
  static constexpr int kStride = kDim + 8;
  static constexpr int kScoreStride = kChunk + 8;
  static constexpr int kTile = kChunk * kStride;  // 16-bit values of a Q, K or V tile, [token][dim]
  static constexpr int kScoreTile = kChunk * kScoreStride;
  static constexpr size_t kChunkedBytes = size_t(2 * 3 * kTile + kScoreTile) * 2;  // two stages of Q, K, V
  // Stages of the states pass (little to compute a chunk): 3 measured 9% slower than 2 on the H100.
  static constexpr int kStatesStages = 2;
  static constexpr size_t kStatesBytes = size_t(kStatesStages * 2 * kTile) * 2;  // stages of K, V
};

// Copies 64-token tiles of one head of a [T, heads, kDim] 16-bit tensor into shared memory by
// cp.async, 16 bytes a piece: a thread's pieces are one column position in every kRowStep-th row.
// The tile is [token][dim] with rows padded to kStride, or (kSwizzled) in the 128-byte-swizzled
// K-major layout of wgmma.cuh (64-row slabs of 64 values), where the warpgroup MMAs read it.
template <int kDim, bool kSwizzled = false>
struct TileLoader {
  static constexpr int kPieces = kDim / 8, kRowStep = Tiles<kDim>::kThreads / kPieces;
  static constexpr int kRowHalves = kSwizzled ? 64 : Tiles<kDim>::kStride;
  const uint16_t* src;  // this thread's first piece in the tile of rows 0 ..
  int64_t row_stride;
  int row, dst;

  // x: the head's first column in row 0.
  __device__ TileLoader(const uint16_t* x, int64_t row_stride) : row_stride(row_stride) {
    row = threadIdx.x / kPieces;
    const int col = 8 * (threadIdx.x % kPieces);
    src = x + row * row_stride + col;
    // The swizzle depends on the row modulo 8, the same in every kRowStep-th row.
    dst = kSwizzled ? Sw128Offset(row, col, kChunk) : row * kRowHalves + col;
  }
  // Rows first .. first + 63 into `tile`; rows at or past `end` read as zeros.
  __device__ __forceinline__ void Load(uint16_t* tile, int64_t first, int64_t end) const {
    static_assert(!kSwizzled || kRowStep % 8 == 0);
    const uint16_t* p = src + first * row_stride;
    const int64_t step = kRowStep * row_stride;
    const int64_t rows_left = end - first - row;
#pragma unroll
    for (int r = 0; r < kChunk; r += kRowStep, p += step) {
      const bool valid = r < rows_left;
      CpAsync16(tile + dst + r * kRowHalves, valid ? p : src, valid);
    }
  }
};

// The chunks of block (p, h) of the chunked kernels: segment p of head h (rows first .. end),
// the loaders of its Q, K (kSwizzledQK: in the wgmma layout) and V tiles, the head's decay g2
// (log2 units), and where the segment's state starts (the initial state itself when there is one
// segment) and, for the last segment, where the head's end state goes.
template <int kDim, bool kSwizzledQK>
struct SegmentChunks {
  int64_t first, end;
  int chunks;
  float g2;
  const float* state_in;
  float* state_out;  // null but for the last segment
  TileLoader<kDim, kSwizzledQK> q, k;
  TileLoader<kDim> v;

  __device__ SegmentChunks(const __half* q_all, const __half* k_all, const __nv_bfloat16* v_all, int64_t T, int H,
                           int Hk, int64_t seg_len, const float* slopes, float* state, const float* seg_states)
      : q(reinterpret_cast<const uint16_t*>(q_all) + blockIdx.y * kDim, int64_t(H) * kDim),
        k(reinterpret_cast<const uint16_t*>(k_all) + blockIdx.y / (H / Hk) * kDim, int64_t(Hk) * kDim),
        v(reinterpret_cast<const uint16_t*>(v_all) + blockIdx.y / (H / Hk) * kDim, int64_t(Hk) * kDim) {
    constexpr int64_t kHeadState = int64_t(kDim) * kDim;
    const int p = blockIdx.x, P = gridDim.x, h = blockIdx.y;
    first = p * seg_len;
    end = T < first + seg_len ? T : first + seg_len;
    chunks = int((end - first + kChunk - 1) / kChunk);
    g2 = -slopes[h] * kLog2e;
    state_in = P > 1 ? seg_states + (int64_t(p) * H + h) * kHeadState : state + h * kHeadState;
    state_out = p == P - 1 ? state + h * kHeadState : nullptr;
  }
  // Chunk c's Q, K and V tiles into `tiles`, `tile` values apart (a stage of the chunked
  // kernels), one commit group.
  __device__ __forceinline__ void Load(int c, uint16_t* tiles, int tile) const {
    const int64_t r0 = first + c * kChunk;
    q.Load(tiles, r0, end);
    k.Load(tiles + tile, r0, end);
    v.Load(tiles + 2 * tile, r0, end);
    CpAsyncCommit();
  }
};

// Four 8x8 matrices of a [row][col] tile (row stride kStride) by ldmatrix. Plain: the A fragment of rows
// r0 .. r0 + 15 (m) and cols c0 .. c0 + 15 (k), which is also the B fragments of two n tiles of
// rows (n) with cols as k: {r[0], r[2]} for rows r0 .., {r[1], r[3]} for rows r0 + 8 ...
template <int kStride>
__device__ __forceinline__ void LdRows(uint32_t (&r)[4], const uint16_t* tile, int r0, int c0) {
  const int lane = threadIdx.x % 32;
  LdMatrixX4(r, tile + (r0 + lane % 8 + 8 * (lane / 8 % 2)) * kStride + c0 + 8 * (lane / 16));
}
// Transposed: the A fragment of m = cols c0 .. c0 + 15 and k = rows r0 .. r0 + 15, and the B
// fragments of k = rows, n = two 8-col tiles: {r[0], r[2]} for cols c0 .., {r[1], r[3]} for c0 + 8 ...
template <int kStride>
__device__ __forceinline__ void LdRowsTrans(uint32_t (&r)[4], const uint16_t* tile, int r0, int c0) {
  const int lane = threadIdx.x % 32;
  LdMatrixX4Trans(r, tile + (r0 + lane % 8 + 8 * (lane / 16)) * kStride + c0 + 8 * (lane / 8 % 2));
}

__device__ __forceinline__ uint32_t MulF16x2(uint32_t a, uint32_t b) {
  const __half2 r = __hmul2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}

// Sᵀ of this warp's 16 columns (c0 ..) as C fragments over key-dim tiles of 8:
// acc[n][0..1] = S[8n + 2t (+1)][c0 + g] / 64, acc[n][2..3] the same at column c0 + g + 8.
template <int kDim>
__device__ __forceinline__ void LoadState(float (&acc)[kDim / 8][4], const float* S, int c0) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
  for (int n = 0; n < kDim / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] = kStateScale * S[(8 * n + 2 * t + e % 2) * kDim + c0 + g + 8 * (e / 2)];
}
template <int kDim>
__device__ __forceinline__ void StoreState(const float (&acc)[kDim / 8][4], float* S, int c0) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
#pragma unroll
  for (int n = 0; n < kDim / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) S[(8 * n + 2 * t + e % 2) * kDim + c0 + g + 8 * (e / 2)] = acc[n][e] / kStateScale;
}

// Sᵀ = exp(g len) Sᵀ + (V ⊙ w)ᵀ K for one chunk of `len` tokens, w_j = exp(g (len − 1 − j)):
// the decay here, and product(ks, a) adds (V ⊙ w)ᵀ K over tokens 16 ks .. 16 ks + 15, given the
// A fragment of (V ⊙ w)ᵀ for this warp's 16 columns.
template <int kDim, typename Product>
__device__ __forceinline__ void UpdateState(float (&acc)[kDim / 8][4], const uint16_t* Vs, int len, float g2, int c0,
                                            Product product) {
  const int t = threadIdx.x % 4;
  const float chunk_decay = exp2f(g2 * float(len));
#pragma unroll
  for (int n = 0; n < kDim / 8; ++n)
#pragma unroll
    for (int e = 0; e < 4; ++e) acc[n][e] *= chunk_decay;
  // Token j = 16 ks + j' has weight w'(j') exp(16 g (3 − ks)): four exponentials a chunk, not 16.
  float w_top[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) w_top[e] = kStateScale * exp2f(g2 * float(len - 49 - (2 * t + e % 2 + 8 * (e / 2))));
  const float w_step = exp2f(16.0f * g2);
#pragma unroll
  for (int ks = kChunk / 16 - 1; ks >= 0; --ks) {
    // Tokens 16 ks + 2t (+1) in va[0..1], 16 ks + 2t + 8 (+9) in va[2..3]. Rows past len are zero
    // in V, and so is their weight (the exponential of a positive argument may overflow).
    float w[4];
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      w[e] = 16 * ks + 2 * t + e % 2 + 8 * (e / 2) < len ? w_top[e] : 0.0f;
      w_top[e] *= w_step;
    }
    const uint32_t w_lo = PackF16(w[0], w[1]), w_hi = PackF16(w[2], w[3]);
    uint32_t va[4];
    LdRowsTrans<Tiles<kDim>::kStride>(va, Vs, 16 * ks, c0);
#pragma unroll
    for (int r = 0; r < 4; ++r) va[r] = MulF16x2(Bf16x2ToF16x2(va[r]), r < 2 ? w_lo : w_hi);
    product(ks, va);
  }
}
// The same with the products by mma.sync, K in a padded tile.
template <int kDim>
__device__ __forceinline__ void UpdateState(float (&acc)[kDim / 8][4], const uint16_t* Ks, const uint16_t* Vs,
                                            int len, float g2, int c0) {
  UpdateState<kDim>(acc, Vs, len, g2, c0, [&](int ks, const uint32_t(&va)[4]) {
#pragma unroll
    for (int np = 0; np < kDim / 16; ++np) {
      uint32_t b[4];
      LdRowsTrans<Tiles<kDim>::kStride>(b, Ks, 16 * ks, 16 * np);
      MmaF16(acc[2 * np], va, b[0], b[2]);
      MmaF16(acc[2 * np + 1], va, b[1], b[3]);
    }
  });
}

// The chunk's scores of this warp (query rows i0 .. i0 + 15, keys jb + 8 n .., sc[n] the C
// fragment of key tile n), masked and scaled into As [query][key] in f16. As has padded rows, or
// (kSwizzled) the 128-byte-swizzled K-major layout of one 64-key slab. Every entry the output
// reads is written: keys up to the end of the query's 16-row tile, or all keys (kSwizzled: the
// MMA reads the whole tile). The decay exp(g (i − j)) of tile n is that of tile 0 times
// exp(−8 g n); beyond the diagonal it may overflow, and is not used.
template <int kScoreStride, int kKeyTiles, bool kSwizzled = false>
__device__ __forceinline__ void StoreMaskedScores(const float (&sc)[kKeyTiles][4], uint16_t* As, int i0, int jb,
                                                  float scale, float g2) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  float mask[4];
#pragma unroll
  for (int e = 0; e < 4; ++e) mask[e] = scale * exp2f(g2 * float(i0 + g + 8 * (e / 2) - jb - 2 * t - e % 2));
  const float mask_step = exp2f(-8.0f * g2);
#pragma unroll
  for (int n = 0; n < kKeyTiles; ++n) {
    const int j0 = jb + 8 * n;
    if (!kSwizzled && j0 > i0 + 15) break;  // the swizzled form is read whole, so its zeros are written
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int i = i0 + g + 8 * r, j = j0 + 2 * t;
      const float x0 = j <= i ? sc[n][2 * r] * mask[2 * r] : 0.0f;
      const float x1 = j + 1 <= i ? sc[n][2 * r + 1] * mask[2 * r + 1] : 0.0f;
      const int at = kSwizzled ? Sw128Offset(i, j, kChunk) : i * kScoreStride + j;
      *reinterpret_cast<uint32_t*>(As + at) = PackF16Sat(x0, x1);
    }
#pragma unroll
    for (int e = 0; e < 4; ++e) mask[e] *= mask_step;
  }
}

// Oᵀ's S_in term (this warp's 16 columns, token i = 8 n + 2t (+1)) times exp(g (i + 1)) s, the
// state's scale undone.
__device__ __forceinline__ void ScaleStateTerm(float (&oacc)[kChunk / 8][4], float scale, float g2) {
  const int t = threadIdx.x % 4;
  float row_scale[2];
#pragma unroll
  for (int e = 0; e < 2; ++e) row_scale[e] = scale / kStateScale * exp2f(g2 * float(2 * t + e + 1));
  const float row_step = exp2f(8.0f * g2);
#pragma unroll
  for (int n = 0; n < kChunk / 8; ++n) {
#pragma unroll
    for (int e = 0; e < 4; ++e) oacc[n][e] *= row_scale[e % 2];
#pragma unroll
    for (int e = 0; e < 2; ++e) row_scale[e] *= row_step;
  }
}

// Oᵀ += Vᵀ Aᵀ over the chunk's masked scores As, for this warp's 16 columns from c0.
template <int kDim>
__device__ __forceinline__ void AddIntraChunk(float (&oacc)[kChunk / 8][4], const uint16_t* Vs, const uint16_t* As,
                                              int c0) {
#pragma unroll
  for (int ks = 0; ks < kChunk / 16; ++ks) {
    uint32_t va[4];
    LdRowsTrans<Tiles<kDim>::kStride>(va, Vs, 16 * ks, c0);
#pragma unroll
    for (int r = 0; r < 4; ++r) va[r] = Bf16x2ToF16x2(va[r]);
#pragma unroll
    for (int np = ks; np < kChunk / 16; ++np) {  // queries from the keys' tile on
      uint32_t b[4];
      LdRows<Tiles<kDim>::kScoreStride>(b, As, 16 * np, 16 * ks);
      MmaF16(oacc[2 * np], va, b[0], b[2]);
      MmaF16(oacc[2 * np + 1], va, b[1], b[3]);
    }
  }
}

// Oᵀ of this warp's 16 columns into o (the chunk's first token at this warp's first column, rows
// `stride` apart), the first len tokens, in bf16 pairs of adjacent columns: lanes g and g ^ 1 swap
// one token's value each, so the even lane stores token 2t's pair and the odd one token 2t + 1's.
__device__ __forceinline__ void StoreOutput(const float (&oacc)[kChunk / 8][4], __nv_bfloat16* o, int64_t stride,
                                            int len) {
  const int g = threadIdx.x % 32 / 4, t = threadIdx.x % 4;
  const bool odd = g & 1;
#pragma unroll
  for (int n = 0; n < kChunk / 8; ++n)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const float mine0 = oacc[n][2 * r], mine1 = oacc[n][2 * r + 1];
      const float theirs = __shfl_xor_sync(0xffffffffu, odd ? mine0 : mine1, 4);
      const int i = 8 * n + 2 * t + odd;
      if (i < len)
        *reinterpret_cast<__nv_bfloat162*>(o + i * stride + (g & ~1) + 8 * r) =
            odd ? __floats2bfloat162_rn(theirs, mine1) : __floats2bfloat162_rn(mine0, theirs);
    }
}

// Block (p, h), p < P − 1: segment p of head h from a zero state into seg_states slot 1 + p.
// CombineStatesKernel then turns the slots into each segment's starting state.
template <int kDim>
__global__ void __launch_bounds__(Tiles<kDim>::kThreads)
    SegmentStatesKernel(const __half* k, const __nv_bfloat16* v, int H, int Hk, int64_t seg_len, const float* slopes,
                        float* seg_states) {
  using L = Tiles<kDim>;
  extern __shared__ __align__(128) uint16_t lsmem[];
  const int p = blockIdx.x, h = blockIdx.y, kh = h / (H / Hk), c0 = 16 * (threadIdx.x / 32);
  constexpr int64_t kHeadState = int64_t(kDim) * kDim;
  const float g2 = -slopes[h] * kLog2e;
  const int64_t first = p * seg_len, row_stride = int64_t(Hk) * kDim;
  const TileLoader<kDim> k_tiles(reinterpret_cast<const uint16_t*>(k) + kh * kDim, row_stride);
  const TileLoader<kDim> v_tiles(reinterpret_cast<const uint16_t*>(v) + kh * kDim, row_stride);
  const int chunks = int(seg_len / kChunk);  // every segment but the last is whole chunks
  const auto load = [&](int c) {  // one commit group a call, empty past the end
    if (c < chunks) {
      uint16_t* tiles = lsmem + c % L::kStatesStages * 2 * L::kTile;
      k_tiles.Load(tiles, first + c * kChunk, first + seg_len);
      v_tiles.Load(tiles + L::kTile, first + c * kChunk, first + seg_len);
    }
    CpAsyncCommit();
  };
  float acc[kDim / 8][4] = {};
  for (int c = 0; c < L::kStatesStages - 1; ++c) load(c);
  for (int c = 0; c < chunks; ++c) {
    CpAsyncWait<L::kStatesStages - 2>();
    __syncthreads();  // chunk c's tiles are in place; every warp is done with chunk c − 1's
    load(c + L::kStatesStages - 1);
    const uint16_t* tiles = lsmem + c % L::kStatesStages * 2 * L::kTile;
    UpdateState<kDim>(acc, tiles, tiles + L::kTile, kChunk, g2, c0);
  }
  StoreState<kDim>(acc, seg_states + ((1 + p) * int64_t(H) + h) * kHeadState, c0);
}

// Each segment's starting state into its slot: S_0 = the initial state, S_p = exp(g seg_len)
// S_{p−1} + slot p (which held segment p − 1's own state). A thread per state entry. The copies
// leave `state` free for ChunkedKernel's last segment to overwrite.
__global__ void CombineStatesKernel(const float* state, float* seg_states, int P, int H, int64_t head_state,
                                    int64_t seg_len, const float* slopes) {
  const int h = blockIdx.y;
  const int64_t e = int64_t(blockIdx.x) * blockDim.x + threadIdx.x;
  if (e >= head_state) return;
  const float decay = expf(-slopes[h] * float(seg_len));
  float* x = seg_states + h * head_state + e;
  float S = state[h * head_state + e];
  x[0] = S;
  for (int p = 1; p < P; ++p) {
    float* slot = x + p * H * head_state;
    S = decay * S + *slot;
    *slot = S;
  }
}

// Block (p, h): the outputs of segment p of head h. The last segment leaves its end state in `state`.
template <int kDim>
__global__ void __launch_bounds__(Tiles<kDim>::kThreads, 2)
    ChunkedKernel(const __half* q, const __half* k, const __nv_bfloat16* v, int64_t T, int H, int Hk, int64_t seg_len,
                  float scale, const float* slopes, float* state, const float* seg_states, __nv_bfloat16* o) {
  using L = Tiles<kDim>;
  extern __shared__ __align__(128) uint16_t lsmem[];
  const int h = blockIdx.y, warp = threadIdx.x / 32, c0 = 16 * warp;
  const SegmentChunks<kDim, false> seg(q, k, v, T, H, Hk, seg_len, slopes, state, seg_states);
  uint16_t* As = lsmem + 6 * L::kTile;  // the chunk's masked scores [query][key]
  const auto load = [&](int c, int stage) { seg.Load(c, lsmem + stage * 3 * L::kTile, L::kTile); };
  load(0, 0);
  // The segment's starting state (the initial state itself when there is one segment).
  float acc[kDim / 8][4];
  LoadState<kDim>(acc, seg.state_in, c0);

  // Scores: warp w takes query rows 16 (w % 4) .. + 15 against kKeys keys from kKeys (w / 4).
  constexpr int kKeys = 4 * kChunk / L::kWarps, kKeyTiles = kKeys / 8;
  const int i0 = 16 * (warp % 4), jb = kKeys * (warp / 4);
  for (int c = 0; c < seg.chunks; ++c) {
    const int64_t r0 = seg.first + c * kChunk;
    const int len = seg.end - r0 < kChunk ? int(seg.end - r0) : kChunk;
    CpAsyncWait<0>();
    __syncthreads();  // chunk c's tiles are in place; every warp is done with chunk c − 1's and its scores
    if (c + 1 < seg.chunks) load(c + 1, (c + 1) & 1);
    const uint16_t* Qs = lsmem + (c & 1) * 3 * L::kTile;
    const uint16_t* Ks = Qs + L::kTile;
    const uint16_t* Vs = Qs + 2 * L::kTile;
    {
      float sc[kKeyTiles][4] = {};
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk) {
        uint32_t a[4];
        LdRows<L::kStride>(a, Qs, i0, 16 * kk);
#pragma unroll
        for (int np = 0; np < kKeyTiles / 2; ++np) {
          if (jb + 16 * np > i0 + 15) break;  // wholly above the diagonal
          uint32_t b[4];
          LdRows<L::kStride>(b, Ks, jb + 16 * np, 16 * kk);
          MmaF16(sc[2 * np], a, b[0], b[2]);
          MmaF16(sc[2 * np + 1], a, b[1], b[3]);
        }
      }
      StoreMaskedScores<L::kScoreStride>(sc, As, i0, jb, scale, seg.g2);
    }
    __syncthreads();  // the scores are complete
    // Oᵀ of this warp's 16 columns: the S_in term first, for all 64 tokens (each Sᵀ pair packed once).
    float oacc[kChunk / 8][4] = {};
#pragma unroll
    for (int kk = 0; kk < kDim / 16; ++kk) {
      const uint32_t a[4] = {PackF16Sat(acc[2 * kk][0], acc[2 * kk][1]), PackF16Sat(acc[2 * kk][2], acc[2 * kk][3]),
                             PackF16Sat(acc[2 * kk + 1][0], acc[2 * kk + 1][1]),
                             PackF16Sat(acc[2 * kk + 1][2], acc[2 * kk + 1][3])};
#pragma unroll
      for (int np = 0; np < kChunk / 16; ++np) {
        uint32_t b[4];
        LdRows<L::kStride>(b, Qs, 16 * np, 16 * kk);
        MmaF16(oacc[2 * np], a, b[0], b[2]);
        MmaF16(oacc[2 * np + 1], a, b[1], b[3]);
      }
    }
    ScaleStateTerm(oacc, scale, seg.g2);
    AddIntraChunk<kDim>(oacc, Vs, As, c0);
    StoreOutput(oacc, o + (r0 * H + h) * kDim + c0, H * kDim, len);
    UpdateState<kDim>(acc, Ks, Vs, len, seg.g2, c0);
  }
  if (seg.state_out) StoreState<kDim>(acc, seg.state_out, c0);
}

// ChunkedKernel on Hopper (dim 128): a chunk's products become warpgroup MMAs, each warpgroup
// (four warps, 64 value columns) issuing them once instead of each warp loading every Q, K and
// score fragment: the scores (warpgroup w: keys 32 w .. of all 64 queries, both operands in
// shared memory), the S_in term (A = the packed Sᵀ accumulators), the intra-chunk term (A = Vᵀ
// from registers, B = the masked scores) and the state update (A = (V ⊙ w)ᵀ from registers, B =
// the K tile read N-major). Q, K and the scores are in the 128-byte-swizzled layout the MMAs
// read; V stays in padded rows for ldmatrix.
struct WgTiles {
  static constexpr int kDim = 128, kThreads = 256;
  static constexpr int kSwTile = kChunk * kDim;  // 16-bit values of a swizzled Q or K tile
  static constexpr int kStage = 2 * kSwTile + Tiles<kDim>::kTile;  // Q, K (swizzled), V (padded)
  static constexpr int kSlabBytes = kChunk * 64 * 2;              // a swizzled tile's 64-column slab
  // Two stages and the scores, + alignment of the swizzle.
  static constexpr size_t kBytes = size_t(2 * kStage + kChunk * kChunk) * 2 + 1024;
};
static_assert(WgTiles::kStage * 2 % 1024 == 0 && WgTiles::kSlabBytes % 1024 == 0,
              "every swizzled tile and slab starts 1024-byte aligned");

// One block an SM: at two (128 registers a thread) ptxas serialised the MMAs and spilled, and the
// chunk took 0.19 ms against 0.163 at one (about 200 registers, four segments of 2048 tokens a head).
__global__ void __launch_bounds__(WgTiles::kThreads, 1)
    WgChunkedKernel(const __half* q, const __half* k, const __nv_bfloat16* v, int64_t T, int H, int Hk,
                    int64_t seg_len, float scale, const float* slopes, float* state, const float* seg_states,
                    __nv_bfloat16* o) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int kDim = WgTiles::kDim;
  using L = Tiles<kDim>;
  extern __shared__ unsigned char wg_smem[];
  uint16_t* smem = reinterpret_cast<uint16_t*>((reinterpret_cast<uintptr_t>(wg_smem) + 1023) & ~uintptr_t(1023));
  const int h = blockIdx.y, warp = threadIdx.x / 32, c0 = 16 * warp;
  const SegmentChunks<kDim, true> seg(q, k, v, T, H, Hk, seg_len, slopes, state, seg_states);
  uint16_t* As = smem + 2 * WgTiles::kStage;  // the chunk's masked scores [query][key]
  const auto load = [&](int c, int stage) { seg.Load(c, smem + stage * WgTiles::kStage, WgTiles::kSwTile); };
  load(0, 0);
  float acc[kDim / 8][4];
  float(&acc64)[64] = reinterpret_cast<float(&)[64]>(acc);
  LoadState<kDim>(acc, seg.state_in, c0);
  const int i0 = 16 * (warp % 4), jb = 32 * (warp / 4);
  // Descriptor words in 16-byte units: a swizzled tile's slab is 64 rows of 128 bytes; k step kk
  // of a K-major operand starts 32 bytes into its slab kk / 4's rows.
  constexpr uint32_t kSlab = WgTiles::kSlabBytes / 16;
  for (int c = 0; c < seg.chunks; ++c) {
    const int64_t r0 = seg.first + c * kChunk;
    const int len = seg.end - r0 < kChunk ? int(seg.end - r0) : kChunk;
    CpAsyncWait<0>();
    WgmmaWait<0>();  // chunk c − 1's state update, which reads the stage the next load overwrites
    WgmmaFenceOperands(acc64);
    FenceProxyAsync();
    __syncthreads();  // chunk c's tiles are in place; every warp is done with chunk c − 1's and its scores
    if (c + 1 < seg.chunks) load(c + 1, (c + 1) & 1);
    const uint16_t* Qs = smem + (c & 1) * WgTiles::kStage;
    const uint16_t* Ks = Qs + WgTiles::kSwTile;
    const uint16_t* Vs = Qs + 2 * WgTiles::kSwTile;
    const uint32_t q_desc = Sw128Descriptor(Qs), k_desc = Sw128Descriptor(Ks);
    {
      float sc[4][4];
      float(&sc16)[16] = reinterpret_cast<float(&)[16]>(sc);
      WgmmaFence();
#pragma unroll
      for (int kk = 0; kk < kDim / 16; ++kk)
        WgmmaF16M64N32K16(sc16, q_desc + (kk / 4) * kSlab + (kk % 4) * 2,
                          k_desc + jb * 128 / 16 + (kk / 4) * kSlab + (kk % 4) * 2, kk > 0);
      WgmmaCommit();
      WgmmaWait<0>();
      WgmmaFenceOperands(sc16);
      StoreMaskedScores<L::kScoreStride, 4, true>(sc, As, i0, jb, scale, seg.g2);
      FenceProxyAsync();
    }
    __syncthreads();  // the scores are complete
    float oacc[kChunk / 8][4];
    float(&o32)[32] = reinterpret_cast<float(&)[32]>(oacc);
    // A fence before each MMA: it orders the writes of its A registers (here the packed state,
    // below the weighted V) before the MMA reads them.
#pragma unroll
    for (int kk = 0; kk < kDim / 16; ++kk) {
      const uint32_t a[4] = {PackF16Sat(acc[2 * kk][0], acc[2 * kk][1]), PackF16Sat(acc[2 * kk][2], acc[2 * kk][3]),
                             PackF16Sat(acc[2 * kk + 1][0], acc[2 * kk + 1][1]),
                             PackF16Sat(acc[2 * kk + 1][2], acc[2 * kk + 1][3])};
      WgmmaFence();
      WgmmaM64N64K16Rs<__half>(o32, a, q_desc + (kk / 4) * kSlab + (kk % 4) * 2, kk > 0);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    WgmmaFenceOperands(o32);
    ScaleStateTerm(oacc, scale, seg.g2);
    const uint32_t s_desc = Sw128Descriptor(As);
#pragma unroll
    for (int ks = 0; ks < kChunk / 16; ++ks) {
      uint32_t va[4];
      LdRowsTrans<L::kStride>(va, Vs, 16 * ks, c0);
#pragma unroll
      for (int r = 0; r < 4; ++r) va[r] = Bf16x2ToF16x2(va[r]);
      WgmmaFence();
      WgmmaM64N64K16Rs<__half>(o32, va, s_desc + ks * 2, true);
    }
    WgmmaCommit();
    WgmmaWait<0>();
    WgmmaFenceOperands(o32);
    StoreOutput(oacc, o + (r0 * H + h) * kDim + c0, H * kDim, len);
    // The K tile N-major: rows of k (tokens) 128 bytes apart in each slab, 16 of them a k step.
    const uint32_t k_rows = (SmemAddress(Ks) & 0x3FFFF) >> 4;
    UpdateState<kDim>(acc, Vs, len, seg.g2, c0, [&](int ks, const uint32_t(&va)[4]) {
      WgmmaFence();
      WgmmaM64N128K16RsTransB<WgTiles::kSlabBytes, __half>(acc64, va, k_rows + ks * 16 * 128 / 16);
    });
    WgmmaCommit();
  }
  WgmmaWait<0>();
  WgmmaFenceOperands(acc64);
  if (seg.state_out) StoreState<kDim>(acc, seg.state_out, c0);
#endif
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

// Segments of whole chunks, as many as fill the GPU with ChunkedKernel blocks (one per segment
// and head), at most one per chunk.
struct SegmentPlan {
  int segments;
  int64_t seg_len;
  bool wgmma;  // the chunks by WgChunkedKernel
};
// What the plan needs of the current device: its SMs, whether it runs WgChunkedKernel (dim 128
// on compute capability 9.0) and how many blocks of the chunked kernel each SM holds. Found once
// per device (with the kernels' shared-memory limits set there), since a prefill chunk asks for
// it in every linear layer.
struct Residency {
  int sms, blocks_per_sm;
  bool wgmma;
};
template <int kDim>
absl::StatusOr<Residency> ChunkedResidency() {
  static std::mutex mu;
  static std::map<int, Residency> known;  // by device
  int device = 0;
  SALA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = known.find(device); it != known.end()) return it->second;
  SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(
      SegmentStatesKernel<kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(Tiles<kDim>::kStatesBytes)));
  SALA_ASSIGN_OR_RETURN(const bool hopper, HasWgmma());
  const bool wgmma = kDim == WgTiles::kDim && hopper;
  int resident = 0;
  if (wgmma) {
    SALA_CUDA_RETURN_IF_ERROR(
        cudaFuncSetAttribute(WgChunkedKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(WgTiles::kBytes)));
    SALA_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&resident, WgChunkedKernel,
                                                                            WgTiles::kThreads, WgTiles::kBytes));
  } else {
    SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ChunkedKernel<kDim>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   int(Tiles<kDim>::kChunkedBytes)));
    SALA_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveBlocksPerMultiprocessor(
        &resident, ChunkedKernel<kDim>, Tiles<kDim>::kThreads, Tiles<kDim>::kChunkedBytes));
  }
  SALA_ASSIGN_OR_RETURN(const int sms, MultiprocessorCount());
  return known[device] = Residency{sms, std::max(resident, 1), wgmma};
}

template <int kDim>
absl::StatusOr<SegmentPlan> PlanSegments(int64_t T, int heads) {
  SALA_ASSIGN_OR_RETURN(const Residency residency, ChunkedResidency<kDim>());
  const int64_t chunks = (T + kChunk - 1) / kChunk;
  const int64_t want = std::clamp<int64_t>(int64_t(residency.sms) * residency.blocks_per_sm / heads, 1, chunks);
  const int64_t seg_chunks = (chunks + want - 1) / want;
  return SegmentPlan{int((chunks + seg_chunks - 1) / seg_chunks), seg_chunks * kChunk, residency.wgmma};
}

absl::StatusOr<SegmentPlan> Plan(int64_t T, int heads, int dim) {
  if (dim != 64 && dim != 128) return absl::InvalidArgumentError("linear attention prefill needs head_dim 64 or 128");
  return dim == 128 ? PlanSegments<128>(T, heads) : PlanSegments<64>(T, heads);
}

template <int kDim>
void LaunchChunked(const __half* q, const __half* k, const __nv_bfloat16* v, int64_t T, int heads, int kv_heads,
                   float scale, const float* slopes, float* state, __nv_bfloat16* o, float* scratch, SegmentPlan plan,
                   cudaStream_t stream) {
  using L = Tiles<kDim>;
  if (plan.segments > 1) {
    SegmentStatesKernel<kDim><<<dim3(plan.segments - 1, heads), L::kThreads, L::kStatesBytes, stream>>>(
        k, v, heads, kv_heads, plan.seg_len, slopes, scratch);
    constexpr int kHeadState = kDim * kDim, kCombineThreads = 256;
    CombineStatesKernel<<<dim3(kHeadState / kCombineThreads, heads), kCombineThreads, 0, stream>>>(
        state, scratch, plan.segments, heads, kHeadState, plan.seg_len, slopes);
  }
  if (plan.wgmma)
    WgChunkedKernel<<<dim3(plan.segments, heads), WgTiles::kThreads, WgTiles::kBytes, stream>>>(
        q, k, v, T, heads, kv_heads, plan.seg_len, scale, slopes, state, scratch, o);
  else
    ChunkedKernel<kDim><<<dim3(plan.segments, heads), L::kThreads, L::kChunkedBytes, stream>>>(
        q, k, v, T, heads, kv_heads, plan.seg_len, scale, slopes, state, scratch, o);
}

}  // namespace

absl::StatusOr<int64_t> LinearAttentionScratchFloats(int64_t T, int heads, int dim) {
  if (T == 0) return 0;
  SALA_ASSIGN_OR_RETURN(const SegmentPlan plan, Plan(T, heads, dim));
  return plan.segments > 1 ? int64_t(plan.segments) * heads * dim * dim : 0;
}

absl::Status LinearAttentionChunked(const __half* q, const __half* k, const __nv_bfloat16* v, int64_t T, int heads,
                                    int kv_heads, int dim, float scale, const float* slopes, float* state,
                                    __nv_bfloat16* o, float* scratch, cudaStream_t stream) {
  if (T == 0) return absl::OkStatus();
  if (kv_heads <= 0 || heads % kv_heads != 0)
    return absl::InvalidArgumentError("linear attention prefill needs heads a multiple of kv_heads");
  SALA_ASSIGN_OR_RETURN(const SegmentPlan plan, Plan(T, heads, dim));
  if (plan.segments > 1 && scratch == nullptr)
    return absl::InvalidArgumentError("linear attention prefill needs LinearAttentionScratchFloats of scratch");
  if (dim == 128) LaunchChunked<128>(q, k, v, T, heads, kv_heads, scale, slopes, state, o, scratch, plan, stream);
  else LaunchChunked<64>(q, k, v, T, heads, kv_heads, scale, slopes, state, o, scratch, plan, stream);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
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

// Prefill attention of the sparse layers on tensor cores (MODEL_SPEC §4), in these kernels:
//   ScoreKernel: stage 1. For 32 query tokens of one 64-token block (16 in decode) and one KV
//     group, the k2 log-sum-exp of every head, then S(j) = Σ_h exp(q_h·k1_j/√d − lse_h) over the
//     candidate blocks' k1 entries, max-pooled into block scores. Each warp keeps its two tokens'
//     Q fragments in registers while bf16 key tiles stream through shared memory (cp.async, three
//     deep); the MMA computes keys × heads, and a second MMA with a matrix of ones sums the heads.
//   ScoreWgmmaKernel: stage 1 of a prefill on Hopper, the same scores from warpgroup MMAs that read
//     Q and the key tiles (loaded by TMA) from shared memory (see there).
//   TopKKernel: the `keep` best candidate blocks of each (token, group), a warp each, by a
//     bitwise search for the keep-th largest score (ties: the lower block) over the few scores
//     that reach a bound from segment maxima, plus the forced init and local blocks; lists come
//     out in ascending order.
//   SharedBlocksKernel, ChosenBlocksKernel: stage 2, the group's 16 heads of a token as the MMA
//     rows, K/V tiles streaming through shared memory with cp.async, online softmax in
//     registers. The first takes the blocks that all tokens of a query block attend (init and
//     local, or all of them for dense rows) with its warps sharing each K/V tile; the second each
//     token's chosen blocks, in launches over ranges of blocks that fit in L2.
//   SharedBlocksWgmmaKernel: the first of those on Hopper at dim 128, on warpgroup MMAs with the
//     K/V tiles loaded by TMA (see there).
// Only candidate blocks (init <= b < b_q - window) are scored: with a local window of at least one
// block, every k1 entry they pool over is visible to every token of the query block.
#include <algorithm>

#include "activation.cuh"
#include "cuda_common.h"
#include "driver_api.h"
#include "mma.cuh"
#include "sala/status_macros.h"
#include "sparse.h"
#include "wgmma.cuh"

namespace sala::cuda {
namespace {

using Bf16 = __nv_bfloat16;

constexpr float kLog2e = 1.4426950408889634f;
constexpr int kBlock = 64;          // tokens per attention block
// Query tokens per stage-1 thread block, each warp taking two: a prefill block reads every key
// tile once for 32 tokens; a decode row fills one slot, so its blocks stay at 16.
constexpr int kPrefillScoreTokens = 32;
constexpr int kDecodeScoreTokens = 16;
__host__ __device__ constexpr int ScoreThreads(int tokens) { return tokens * 16; }
constexpr int kKeyTile = 64;        // compressed keys per stage-1 tile: 16 blocks of k1
constexpr int kKeyStages = 3;       // stage-1 key tiles in flight
constexpr int kMaxScoreSplits = 64;  // decode: thread blocks per row and KV group
// Stage 2, measured on an H100 (sala-bench --sparse_contexts): shared blocks in 64-key steps
// took 1.30 ms a chunk against 1.48 in 32-key steps; chosen blocks in 16-key steps (small
// buffers, 12 warps an SM) 2% less than in 32-key steps at 1M.
constexpr int kAttnWarps = 2;     // ChosenBlocksKernel: rows (warps) per thread block
constexpr int kChosenKeys = 16;   // ChosenBlocksKernel: keys per step
constexpr int kSharedRows = 4;    // SharedBlocksKernel: rows (warps) per thread block
constexpr int kSharedStages = 3;  // SharedBlocksKernel: steps in flight
constexpr int kSharedKeys = 64;   // SharedBlocksKernel: keys per step
constexpr int kMaxSelectedBlocks = 4096;  // 256K keys a token; ChosenBlocksKernel's offsets fit in 64 KiB
// ChosenBlocksKernel's K/V buffers: two steps a warp; each warp's list of block offsets follows.
__host__ __device__ constexpr size_t ChosenStageBytes(int dim) {
  return size_t(kAttnWarps) * 2 * 2 * kChosenKeys * dim * sizeof(__nv_bfloat16);
}

struct Candidates {
  int init, window, keep;  // forced init blocks, local blocks before b_q, blocks chosen by score
  __host__ __device__ int64_t Count(int64_t bq) const { return bq - window - init; }
};

// The length of a row of block scores for queries up to block bq: every candidate, in whole
// 16-byte pieces (TopKKernel loads eight scores at a time).
int64_t ScoreRowLength(const Candidates& cand, int64_t bq) {
  return std::max<int64_t>(8, (cand.Count(bq) + 7) / 8 * 8);
}

// Rows come either from one sequence (positions first .. first + T − 1, caches k1/k2) or, with
// `views` set, one from each of T sequences (a decode step: row r at positions[r] of views[r]).
struct ScoreParams {
  const float* q;      // [T, H, D]: a decode step's rows
  const Bf16* q_bf16;  // or a prefill's, in bf16 (the MMAs' operand type)
  int64_t first, T;
  const Bf16* k1;  // [n1, Hk, D]
  const Bf16* k2;
  const SparseCacheView* views;  // device, or null
  const int64_t* positions;      // device, with views
  int H, Hk, G;
  Candidates cand;
  float scale_log2;
  __half* scores;  // [T, Hk, ncap]: block init + c at c, times 2^8 (see ScoreScaled)
  int64_t ncap;
  int splits;  // thread blocks per row and KV group, each scoring a share of the k1 tiles
  // Decode (views set): the k2 pass is split as well, in a launch of its own (phase 0) that
  // leaves each split's per-head (max, sum) in lse_partial [T, Hk, splits, 16, 2]; the k1 launch
  // (phase 1) merges them, instead of every split repeating the whole k2 pass.
  float* lse_partial;
  int phase;
};

__device__ __forceinline__ float Exp2(float x) { return exp2f(x); }

// A block score as stage 1 stores it: f16 (the Hopper kernel sums the heads in f16, so its
// scores are f16 values already, and the top-k reads half the bytes), times 2^8 so that scores
// down to 2^-22 stay normal. Only the order of the scores matters.
__device__ __forceinline__ __half ScoreScaled(float s) { return __float2half_rn(s * 256.0f); }

// Stage 1's shared memory: the Q tile, later the key stages, then the per-head log-sum-exps.
__host__ __device__ constexpr size_t ScoreSmemUnionBytes(int D, int tokens) {
  return (tokens * 16 > kKeyStages * kKeyTile ? tokens * 16 : kKeyStages * kKeyTile) * size_t(D) * sizeof(Bf16);
}
__host__ __device__ constexpr size_t ScoreSmemBytes(int D, int tokens) {
  return ScoreSmemUnionBytes(D, tokens) + tokens * 16 * sizeof(float);
}

// Streams key tiles t_begin .. t_end - 1 (tile t holds entries j_base + kKeyTile t ..; entries
// from j_end on read as 0) from the bf16 compressed keys through kKeyStages shared buffers with
// cp.async, kKeyStages - 1 tiles ahead of body(t, tile). Every thread must call it.
template <int D, int Threads, typename Body>
__device__ void ForEachKeyTile(Bf16* stages, const Bf16* src, int Hk, int g, int j_base, int j_end, int t_begin,
                               int t_end, Body body) {
  auto issue = [&](int t) {
    if (t < t_end) {
      Bf16* tile = stages + (t % kKeyStages) * kKeyTile * D;
      for (int e = threadIdx.x; e < kKeyTile * D / 8; e += Threads) {
        const int row = e / (D / 8), c8 = e % (D / 8);
        const int j = j_base + t * kKeyTile + row;
        const bool valid = j < j_end;
        CpAsync16(tile + Swizzled<D>(row, c8 * 8), src + (int64_t(valid ? j : 0) * Hk + g) * D + c8 * 8, valid);
      }
    }
    CpAsyncCommit();  // empty groups too, so that the wait below always counts the same
  };
  for (int s = 0; s < kKeyStages - 1; ++s) issue(t_begin + s);
  for (int t = t_begin; t < t_end; ++t) {
    CpAsyncWait<kKeyStages - 2>();
    // Tile t has landed for every thread, and every thread is done with tile t - 1, whose
    // buffer the next issue refills.
    __syncthreads();
    issue(t + kKeyStages - 1);
    body(t, stages + (t % kKeyStages) * kKeyTile * D);
  }
  CpAsyncWait<0>();
  __syncthreads();  // the buffers are free for the next pass
}

// acc[tk][n] = keys 16 m .. 16 m + 15 of the tile (MMA rows) x the 16 heads of the warp's token tk
// (columns; n picks heads 8 n ..). The warp's Q fragments stay in registers for the whole kernel.
template <int D>
__device__ __forceinline__ void KeyMma(const uint32_t (&qb)[D / 16][2][4], const Bf16* kt, int m,
                                       float (&acc)[2][2][4]) {
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int tk = 0; tk < 2; ++tk)
#pragma unroll
    for (int n = 0; n < 2; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) acc[tk][n][c] = 0.0f;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    LdMatrixX4(a, kt + Swizzled<D>(m * 16 + (lane % 8) + 8 * ((lane / 8) % 2), kk * 16 + 8 * (lane / 16)));
#pragma unroll
    for (int tk = 0; tk < 2; ++tk) {
      MmaBf16(acc[tk][0], a, qb[kk][tk][0], qb[kk][tk][1]);
      MmaBf16(acc[tk][1], a, qb[kk][tk][2], qb[kk][tk][3]);
    }
  }
}

// 512 threads per SM: the Q fragments (64 registers at D = 128) leave room for that.
template <int D, int Tokens>
__global__ void __launch_bounds__(ScoreThreads(Tokens), 512 / ScoreThreads(Tokens)) ScoreKernel(ScoreParams p) {
  constexpr int kThreads = ScoreThreads(Tokens);
  extern __shared__ __align__(16) unsigned char smem_raw[];
  // The Q tile [Tokens x 16 heads, D] is read into registers first; the key stages
  // [kKeyStages][kKeyTile, D] then reuse its memory.
  Bf16* qs = reinterpret_cast<Bf16*>(smem_raw);
  Bf16* stages = qs;
  float* lse2 = reinterpret_cast<float*>(smem_raw + ScoreSmemUnionBytes(D, Tokens));  // [Tokens][16 heads], log2 units
  const int g = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const bool per_row = p.views != nullptr;
  const int64_t first = per_row ? p.positions[blockIdx.x] : p.first;
  const int64_t base = (first / Tokens) * Tokens + (per_row ? 0 : Tokens * int64_t(blockIdx.x));
  const int64_t lo = max(base, first), hi = per_row ? first + 1 : min(base + Tokens, first + p.T);
  const int64_t row_of_first = per_row ? blockIdx.x : 0;  // output row of position `first`
  const Bf16* k1 = per_row ? p.views[blockIdx.x].k1 : p.k1;
  const Bf16* k2 = per_row ? p.views[blockIdx.x].k2 : p.k2;
  const int64_t bq = base / kBlock;
  if (p.cand.Count(bq) <= p.cand.keep) return;  // every block is taken; nothing to score

  for (int e = threadIdx.x; e < Tokens * 16 * D / 4; e += kThreads) {
    const int row = e / (D / 4), c4 = e % (D / 4), tk = row / 16, h = row % 16;
    const int64_t pos = base + tk;
    const int64_t at = ((pos - first + row_of_first) * p.H + g * p.G + h) * D + c4 * 4;
    uint2 x{0, 0};
    if (pos >= lo && pos < hi && h < p.G) {
      if (p.q_bf16) {
        x = *reinterpret_cast<const uint2*>(p.q_bf16 + at);
      } else {
        const float4 v = *reinterpret_cast<const float4*>(p.q + at);
        x = uint2{PackBf16(v.x, v.y), PackBf16(v.z, v.w)};
      }
    }
    *reinterpret_cast<uint2*>(qs + Swizzled<D>(row, c4 * 4)) = x;
  }
  __syncthreads();
  const int tok0 = 2 * warp, gq = lane / 4, tq = lane % 4;
  uint32_t qb[D / 16][2][4];  // B fragments: the 16 heads of tokens tok0, tok0 + 1
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int tk = 0; tk < 2; ++tk)
      LdMatrixX4(qb[kk][tk],
                 qs + Swizzled<D>((tok0 + tk) * 16 + (lane % 8) + 8 * (lane / 16), kk * 16 + 8 * ((lane / 8) % 2)));
  __syncthreads();  // the key stages overwrite the Q tile

  // Pass 1: log-sum-exp over the visible k2 entries, per (token, head): k2_j is visible to
  // position i when 64 j + 128 <= i + 1.
  // Entry counts and tile indices fit an int at any context the top-k allows (2M tokens).
  int n2[2];
  for (int tk = 0; tk < 2; ++tk) n2[tk] = base + tok0 + tk + 1 >= 128 ? int((base + tok0 + tk + 1 - 128) / 64 + 1) : 0;
  const int n2_all = hi >= 128 ? int((hi - 128) / 64 + 1) : 0;
  const int tiles2 = (n2_all + kKeyTile - 1) / kKeyTile;
  const int per_split2 = per_row ? (tiles2 + int(gridDim.z) - 1) / int(gridDim.z) : tiles2;
  const int t2_begin = per_row ? min(tiles2, per_split2 * int(blockIdx.z)) : 0;
  const int t2_end = per_row ? min(tiles2, t2_begin + per_split2) : tiles2;
  float* partial = per_row ? p.lse_partial + ((int64_t(blockIdx.x) * p.Hk + g) * gridDim.z) * 32 : nullptr;
  if (per_row && p.phase == 1) {
    // Merge the k2 splits' (max, sum) of the row's token; the other token slots hold no row.
    for (int e = threadIdx.x; e < Tokens * 16; e += kThreads) {
      const int tk = e / 16, h = e % 16;
      float mm = -INFINITY, ll = 0.0f;
      if (base + tk == first && h < p.G)
        for (int z = 0; z < int(gridDim.z); ++z) {
          const float m2 = partial[z * 32 + 2 * h], l2 = partial[z * 32 + 2 * h + 1];
          const float mx = fmaxf(mm, m2);
          if (mx == -INFINITY) continue;
          ll = ll * Exp2(mm - mx) + l2 * Exp2(m2 - mx);
          mm = mx;
        }
      lse2[e] = ll > 0.0f ? mm + log2f(ll) : INFINITY;
    }
    __syncthreads();
  } else {
    float m[2][4], l[2][4];  // [token][n * 2 + column parity]
    for (int tk = 0; tk < 2; ++tk)
      for (int s = 0; s < 4; ++s) {
        m[tk][s] = -INFINITY;
        l[tk][s] = 0.0f;
      }
    ForEachKeyTile<D, kThreads>(stages, k2, p.Hk, g, 0, n2_all, t2_begin, t2_end, [&](int t, const Bf16* kt) {
#pragma unroll 1
      for (int mt = 0; mt < kKeyTile / 16; ++mt) {
        float acc[2][2][4];
        KeyMma<D>(qb, kt, mt, acc);
#pragma unroll
        for (int tk = 0; tk < 2; ++tk)
#pragma unroll
          for (int s = 0; s < 4; ++s) {
            const int n = s / 2, par = s % 2;
            float x[2];  // keys 16 mt + gq + 8 half
#pragma unroll
            for (int half = 0; half < 2; ++half) {
              const int j = t * kKeyTile + mt * 16 + gq + 8 * half;
              x[half] = j < n2[tk] ? acc[tk][n][2 * half + par] * p.scale_log2 : -INFINITY;
            }
            const float mn = fmaxf(m[tk][s], fmaxf(x[0], x[1]));
            if (mn == -INFINITY) continue;
            l[tk][s] = (mn == m[tk][s] ? l[tk][s] : l[tk][s] * Exp2(m[tk][s] - mn)) + Exp2(x[0] - mn) + Exp2(x[1] - mn);
            m[tk][s] = mn;
          }
      }
    });
    // Merge over the key rows held by the eight lanes of each column.
    for (int tk = 0; tk < 2; ++tk)
      for (int s = 0; s < 4; ++s) {
        float mm = m[tk][s], ll = l[tk][s];
        for (int off = 4; off < 32; off <<= 1) {
          const float m2 = __shfl_xor_sync(0xffffffff, mm, off), l2 = __shfl_xor_sync(0xffffffff, ll, off);
          const float mx = fmaxf(mm, m2);
          if (mx != -INFINITY) {
            ll = ll * Exp2(mm - mx) + l2 * Exp2(m2 - mx);
            mm = mx;
          }
        }
        const int h = (s / 2) * 8 + 2 * tq + s % 2;
        if (gq != 0) continue;
        if (!per_row) {
          lse2[(tok0 + tk) * 16 + h] = ll > 0.0f ? mm + log2f(ll) : INFINITY;
        } else if (base + tok0 + tk == first) {
          partial[blockIdx.z * 32 + 2 * h] = mm;
          partial[blockIdx.z * 32 + 2 * h + 1] = ll;
        }
      }
    if (per_row) return;  // phase 0 ends with the partial sums
    __syncthreads();      // lse2 complete
  }

  // Pass 2: k1 scores of the candidate blocks, pooled over entries 4b-1 .. 4b+3. Tiles start at
  // a block boundary one block early, so that entry 4 init - 1 is scanned too.
  const int b0 = max(p.cand.init - 1, 0);
  const int b_end = int(bq) - p.cand.window;  // candidates are [init, b_end)
  const int j0 = 4 * b0, j_end = 4 * b_end;
  const int tiles1 = (j_end - j0 + kKeyTile - 1) / kKeyTile;
  // With several thread blocks per row (gridDim.z > 1: decode), each scores its share of the
  // tiles, starting one tile early for the carry into its first block.
  const int per_split = (tiles1 + int(gridDim.z) - 1) / int(gridDim.z);
  const int t_own = per_split * int(blockIdx.z), t_stop = min(tiles1, t_own + per_split);
  const int t_first = t_own > 0 ? t_own - 1 : 0;
  if (t_own >= t_stop) return;
  float carry[2] = {-INFINITY, -INFINITY};  // S of the last key of the previous m-tile (lanes tq = 0)
  float lse_row[2][4];
  __half* out[2];  // the tokens' score rows, indexed by block
  bool row_ok[2];
  for (int tk = 0; tk < 2; ++tk) {
    for (int s = 0; s < 4; ++s) {
      const int h = (s / 2) * 8 + 2 * tq + s % 2;
      lse_row[tk][s] = h < p.G ? lse2[(tok0 + tk) * 16 + h] : INFINITY;  // INFINITY: no such head
    }
    const int64_t pos = base + tok0 + tk;
    row_ok[tk] = pos >= lo && pos < hi && gq == 0;  // one row of lanes stores
    out[tk] = p.scores + ((pos - first + row_of_first) * p.Hk + g) * p.ncap - p.cand.init;
  }
  const uint32_t kOnes = 0x3F803F80u;  // bf16 pair (1, 1)
  const uint32_t ones[4] = {kOnes, kOnes, kOnes, kOnes};
  const int from_prev = (lane & ~3) | ((tq + 3) & 3);  // the previous lane of the quad, cyclically
  ForEachKeyTile<D, kThreads>(stages, k1, p.Hk, g, j0, j_end, t_first, t_stop, [&](int t, const Bf16* kt) {
#pragma unroll 1
    for (int mt = 0; mt < kKeyTile / 16; ++mt) {
      float acc[2][2][4];
      KeyMma<D>(qb, kt, mt, acc);
      const int blk = b0 + 16 * t + 4 * mt;
#pragma unroll
      for (int tk = 0; tk < 2; ++tk) {
        // p = exp(q·k1 − lse) as a B fragment (heads x keys gq, then keys gq + 8): the sum over
        // the heads is then one MMA with a matrix of ones, and leaves lane tq the sums of keys
        // 2 tq, 2 tq + 1 (lo8[0], lo8[1]) and 8 + 2 tq, 9 + 2 tq (hi8[0], hi8[1]) in every row.
        float pr[2][4];
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
          for (int c = 0; c < 4; ++c) pr[n][c] = Exp2(acc[tk][n][c] * p.scale_log2 - lse_row[tk][2 * n + c % 2]);
        float lo8[4] = {0, 0, 0, 0}, hi8[4] = {0, 0, 0, 0};
        MmaBf16(lo8, ones, PackBf16(pr[0][0], pr[0][1]), PackBf16(pr[1][0], pr[1][1]));
        MmaBf16(hi8, ones, PackBf16(pr[0][2], pr[0][3]), PackBf16(pr[1][2], pr[1][3]));
        // Block c of the m-tile pools its keys 4c − 1 .. 4c + 3: lanes tq = 0 finish blocks 0
        // and 2, lanes tq = 2 blocks 1 and 3, each with the previous lane's last keys.
        float pair_lo = fmaxf(lo8[0], lo8[1]), pair_hi = fmaxf(hi8[0], hi8[1]);
        pair_lo = fmaxf(pair_lo, __shfl_xor_sync(0xffffffff, pair_lo, 1));
        pair_hi = fmaxf(pair_hi, __shfl_xor_sync(0xffffffff, pair_hi, 1));
        const float prev1 = __shfl_sync(0xffffffff, lo8[1], from_prev), prev3 = __shfl_sync(0xffffffff, hi8[1], from_prev);
        const bool first_half = tq == 0;
        const float s_lo = fmaxf(first_half ? carry[tk] : prev1, pair_lo);
        const float s_hi = fmaxf(first_half ? prev1 : prev3, pair_hi);
        carry[tk] = prev3;  // key 15, at tq = 0
        const int c_lo = blk + tq / 2;
        if (row_ok[tk] && (tq & 1) == 0 && t >= t_own) {
          if (c_lo >= p.cand.init && c_lo < b_end) out[tk][c_lo] = ScoreScaled(s_lo);
          if (c_lo + 2 >= p.cand.init && c_lo + 2 < b_end) out[tk][c_lo + 2] = ScoreScaled(s_hi);
        }
      }
    }
  });
}

// Stage 1 of a prefill on Hopper (ScoreWgmmaKernel): the same scores as ScoreKernel, with
// warpgroup MMAs that read Q and the key tiles from shared memory. A block of four warpgroups
// takes 32 tokens of one KV group. Warpgroup w owns tokens 8 w .. 8 w + 7 as two MMA row tiles of
// 4 tokens x 16 heads, so in row tile m warp w % 4 holds token 8 w + 4 m + w % 4: heads g and
// g + 8 of each lane against the tile's keys. The MMA of one row tile runs while the warpgroup
// takes the exponentials of the other. The heads then sum with shuffles that also spread the keys
// over the lanes: lane (g, t) ends with keys 8 g + 2 t and 8 g + 2 t + 1.
constexpr int kWgTokens = 32;    // query tokens per block
constexpr int kWgThreads = 512;  // 4 warpgroups
constexpr int kWgKeys = 64;      // keys per tile: the MMA's N
constexpr int kWgStages = 5;     // key tiles in shared memory; loads run kWgStages - 2 tiles ahead
constexpr int kWgRows = kWgTokens * 16;

__host__ __device__ constexpr size_t ScoreWgmmaSmemBytes(int D) {
  // + the stages' barriers and release counts, + alignment of the swizzle
  return size_t(kWgRows + kWgStages * kWgKeys) * D * sizeof(Bf16) + kWgStages * (sizeof(uint64_t) + sizeof(uint32_t)) +
         1024;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
// v[i] = (the half of v[0 .. 2 Half) this lane keeps) + (the other half, from lane ^ lane_bit),
// for i < Half, on f16 pairs: the lane keeps the upper half where `upper` is set. Bit masks pick
// the halves (a conditional picked addresses instead, and put v in local memory).
template <int Half>
__device__ __forceinline__ void FoldHalf(uint32_t (&v)[8], bool upper, int lane_bit) {
  const uint32_t mask = upper ? ~0u : 0u;
#pragma unroll
  for (int i = 0; i < Half; ++i) {
    const uint32_t lo = v[i], hi = v[i + Half];
    const uint32_t send = (lo & mask) | (hi & ~mask), keep = (hi & mask) | (lo & ~mask);
    v[i] = AddF16x2(keep, __shfl_xor_sync(0xffffffff, send, lane_bit));
  }
}

// The key tiles of both stage-1 passes as one sequence through the stages: first `k2_tiles`
// tiles of k2 (tile t holds entries kWgKeys t ..), then `k1_tiles` of k1 (entries j1 + kWgKeys t
// ..); entries past the tensor maps' ends read as 0. They load by TMA, kWgStages - 2 tiles
// ahead, so the first k1 tiles load while the k2 pass ends. No barrier holds the warpgroups in
// step: each counts itself done with a stage, and the last of them refills it.
template <int D>
struct KeyPipeline {
  Bf16* stages;
  uint64_t* full;      // [kWgStages]: the stage's tile has landed
  static constexpr uint32_t kWarpgroups = kWgThreads / 128;
  uint32_t* released;  // [kWgStages]: warpgroups done with the stage's tiles so far (kWarpgroups a tile)
  const CUtensorMap* k2_map;
  const CUtensorMap* k1_map;
  int g, k2_tiles, k1_tiles, j1;

  __device__ Bf16* Stage(int t) const { return stages + (t % kWgStages) * kWgKeys * D; }

  // One thread: starts loading tile t, if there is one.
  __device__ void Load(int t) {
    if (t >= k2_tiles + k1_tiles) return;
    MbarArriveExpectTx(&full[t % kWgStages], kWgKeys * D * sizeof(Bf16));
    const bool k2 = t < k2_tiles;
    const int j = k2 ? kWgKeys * t : j1 + kWgKeys * (t - k2_tiles);
    for (int slab = 0; slab < D / 64; ++slab)
      TmaLoad3d(Stage(t) + slab * kWgKeys * 64, k2 ? k2_map : k1_map, 64 * slab, g, j, &full[t % kWgStages]);
  }
  // Every thread, before tile t's MMAs: this warpgroup is done with tile t - 2 (its MMAs of that
  // tile completed before it came here); the last warpgroup to say so loads tile
  // t + kWgStages - 2 into that stage (the stages of tiles kWgStages - 2 and kWgStages - 1 are
  // free from the start). Then waits for tile t. A stage's next tile starts loading only after
  // every warpgroup has waited for its current one, so the parity is unambiguous, and a stage's
  // count for one tile is complete before any warpgroup counts the next.
  __device__ void Next(int t) {
    if (threadIdx.x % 128 == 0) {
      __threadfence_block();  // orders this warpgroup's reads of the stage before its count
      if (atomicAdd(&released[(t + kWgStages - 2) % kWgStages], 1u) % kWarpgroups == kWarpgroups - 1) {
        __threadfence_block();
        Load(t + kWgStages - 2);
      }
    }
    MbarWait(&full[t % kWgStages], (t / kWgStages) & 1);
  }
};

// Runs tiles first .. first + tiles - 1 of the pipeline and calls process(u, m, acc) with tile
// first + u's scores against the warpgroup's row tile m (Q rows from descriptor q_desc, the
// warpgroup's first row tile, on), while the MMA of the next row tile runs. Every thread must
// call it.
template <int D, typename Process>
__device__ __forceinline__ void ScanKeysWgmma(KeyPipeline<D>& keys, uint32_t q_desc, int first, int tiles,
                                              Process process) {
  auto mma = [&](int u, int m, float(&acc)[32]) {
    const uint32_t k_desc = Sw128Descriptor(keys.Stage(first + u));
    WgmmaFenceOperands(acc);
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)  // descriptors count 16-byte units: slab kk / 4, 32 bytes per k step
      WgmmaM64N64K16(acc, q_desc + m * (64 * 128 / 16) + (kk / 4) * (kWgRows * 128 / 16) + (kk % 4) * 2,
                     k_desc + (kk / 4) * (kWgKeys * 128 / 16) + (kk % 4) * 2, kk > 0);
    WgmmaCommit();
  };
  // Half-step h is row tile h % 2 of key tile h / 2, in acc0 for even h and acc1 for odd h. The
  // loop ends at h = halves - 1, so the last `else` below never runs: it is there because ptxas
  // keeps the two MMAs in flight only with the code in this shape (a straight epilogue, or a loop
  // over key tiles, made it serialise them: warning C7514).
  auto issue = [&](int h, int m, float(&acc)[32]) {
    if (m == 0) keys.Next(first + h / 2);
    mma(h / 2, m, acc);
  };
  auto step = [&](int h, int m, float(&cur)[32], float(&prev)[32]) {
    issue(h, m, cur);
    WgmmaWait<1>();
    WgmmaFenceOperands(prev);
    process((h - 1) / 2, 1 - m, prev);
  };
  const int halves = 2 * tiles;
  if (halves > 0) {
    float acc0[32], acc1[32];
    issue(0, 0, acc0);
    int h = 1;
    for (; h + 1 < halves; h += 2) {
      step(h, 1, acc1, acc0);
      step(h + 1, 0, acc0, acc1);
    }
    if (h < halves) {
      step(h, 1, acc1, acc0);
      WgmmaWait<0>();
      WgmmaFenceOperands(acc1);
      process(h / 2, 1, acc1);
    } else {
      WgmmaWait<0>();
      WgmmaFenceOperands(acc0);
      process((h - 1) / 2, 0, acc0);
    }
  }
}
#endif

// k2_map and k1_map: the compressed keys [entries, Hk, D] as 3-D TMA tensor maps (KeyTensorMap),
// covering the entries that the launch's last query block reads.
template <int D>
__global__ void __launch_bounds__(kWgThreads, 1)
    ScoreWgmmaKernel(ScoreParams p, const __grid_constant__ CUtensorMap k2_map,
                     const __grid_constant__ CUtensorMap k1_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  Bf16* qs = reinterpret_cast<Bf16*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  Bf16* stages = qs + kWgRows * D;
  uint64_t* bars = reinterpret_cast<uint64_t*>(stages + kWgStages * kWgKeys * D);
  const int g = blockIdx.y, warp = threadIdx.x / 32, lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
  const int64_t base = (p.first / kWgTokens) * kWgTokens + kWgTokens * int64_t(blockIdx.x);
  const int64_t lo = max(base, p.first), hi = min(base + kWgTokens, p.first + p.T);
  const int64_t bq = base / kBlock;
  if (p.cand.Count(bq) <= p.cand.keep) return;  // every block is taken; nothing to score

  // k2 entries visible to the block's last token (64 j + 128 <= pos + 1); the candidate blocks
  // [init, b_end), whose k1 entries are scanned from a block early so that entry 4 init - 1 is too.
  const int n2_all = hi >= 128 ? int((hi - 128) / 64 + 1) : 0;
  const int b0 = max(p.cand.init - 1, 0);
  const int b_end = int(bq) - p.cand.window;
  const int j0 = 4 * b0, j_end = 4 * b_end;
  KeyPipeline<D> keys{stages, bars, reinterpret_cast<uint32_t*>(bars + kWgStages), &k2_map, &k1_map, g,
                      (n2_all + kWgKeys - 1) / kWgKeys, (j_end - j0 + kWgKeys - 1) / kWgKeys, j0};
  if (threadIdx.x == 0) {
    for (int s = 0; s < kWgStages; ++s) {
      MbarInit(&keys.full[s], 1);
      keys.released[s] = 0;
    }
    FenceMbarInit();
    for (int t = 0; t < kWgStages - 2; ++t) keys.Load(t);  // the first tiles load while Q is formed
  }

  // Q rows: token tk, head h at row 16 tk + h; row tile m of warpgroup w is rows 128 w + 64 m ...
  for (int e = threadIdx.x; e < kWgRows * D / 8; e += kWgThreads) {  // 16-byte pieces
    const int row = e / (D / 8), c8 = e % (D / 8), tk = row / 16, h = row % 16;
    const int64_t pos = base + tk;
    uint4 x{0, 0, 0, 0};
    if (pos >= lo && pos < hi && h < p.G)
      x = *reinterpret_cast<const uint4*>(p.q_bf16 + ((pos - p.first) * p.H + g * p.G + h) * D + c8 * 8);
    *reinterpret_cast<uint4*>(qs + Sw128Offset(row, c8 * 8, kWgRows)) = x;
  }
  FenceProxyAsync();
  __syncthreads();
  const uint32_t q_desc = Sw128Descriptor(qs + (warp / 4) * 128 * 64);
  // This warp's token in row tile m.
  auto pos = [&](int m) { return base + (warp / 4) * 8 + 4 * m + warp % 4; };
  const float sc = p.scale_log2;

  // Pass 1: log-sum-exp over the visible k2 entries (64 j + 128 <= pos + 1) of heads gq, gq + 8,
  // in raw-score units until the end: a running max mx and sum sum of exp2(sc (x - mx)).
  int n2[2];
  for (int m = 0; m < 2; ++m) n2[m] = pos(m) + 1 >= 128 ? int((pos(m) + 1 - 128) / 64 + 1) : 0;
  float mx[2][2] = {{-INFINITY, -INFINITY}, {-INFINITY, -INFINITY}}, sum[2][2] = {{0, 0}, {0, 0}};  // [row tile][head]
  ScanKeysWgmma<D>(keys, q_desc, 0, keys.k2_tiles, [&](int u, int m, float(&acc)[32]) {
    if ((u + 1) * kWgKeys > n2[m]) {  // the token sees only part of this tile
#pragma unroll
      for (int i = 0; i < 32; ++i)
        if (u * kWgKeys + 8 * (i / 4) + 2 * tq + i % 2 >= n2[m]) acc[i] = -INFINITY;
    }
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      float top = mx[m][r];
#pragma unroll
      for (int n = 0; n < 8; ++n) top = fmaxf(top, fmaxf(acc[4 * n + 2 * r], acc[4 * n + 2 * r + 1]));
      if (top == -INFINITY) continue;
      const float off = top * sc;
      float s = 0.0f;
#pragma unroll
      for (int n = 0; n < 8; ++n)
        s += Exp2(fmaf(acc[4 * n + 2 * r], sc, -off)) + Exp2(fmaf(acc[4 * n + 2 * r + 1], sc, -off));
      sum[m][r] = sum[m][r] * Exp2((mx[m][r] - top) * sc) + s;
      mx[m][r] = top;
    }
  });
  // The log-sum-exp less 8 (pass 2 takes 2^8 p), log2 units; INFINITY for a padding head, so
  // that its terms vanish.
  float lse8[2][2];
#pragma unroll
  for (int m = 0; m < 2; ++m)
#pragma unroll
    for (int r = 0; r < 2; ++r) {
#pragma unroll
      for (int off = 1; off < 4; off <<= 1) {  // merge the four lanes of the quad (the row's other keys)
        const float m2 = __shfl_xor_sync(0xffffffff, mx[m][r], off), s2 = __shfl_xor_sync(0xffffffff, sum[m][r], off);
        const float top = fmaxf(mx[m][r], m2);
        if (top != -INFINITY) {
          sum[m][r] = sum[m][r] * Exp2((mx[m][r] - top) * sc) + s2 * Exp2((m2 - top) * sc);
          mx[m][r] = top;
        }
      }
      lse8[m][r] = gq + 8 * r < p.G && sum[m][r] > 0.0f ? mx[m][r] * sc + log2f(sum[m][r]) - 8.0f : INFINITY;
    }

  // Pass 2: k1 scores of the candidate blocks, pooled over entries 4b-1 .. 4b+3. Tile u holds
  // blocks b0 + 16 u ...
  bool row_ok[2];
  for (int m = 0; m < 2; ++m) row_ok[m] = pos(m) >= lo && pos(m) < hi && (tq & 1) == 0;  // lanes t = 0, 2 store
  const int from_prev = (lane & ~3) | ((tq + 3) & 3);  // the previous lane of the quad, cyclically
  const int from_prev_group = ((gq + 7) % 8) * 4 + 3;  // lane t = 3 of the previous 8 keys, cyclically
  float carry[2] = {-INFINITY, -INFINITY};              // key 63 of the previous tile (lanes g = 0)
  ScanKeysWgmma<D>(keys, q_desc, keys.k2_tiles, keys.k1_tiles, [&](int u, int m, float(&acc)[32]) {
    // v[n]: 2^8 S of keys 8 n + 2 t and 8 n + 2 t + 1 as an f16 pair, summed over
    // this lane's two heads. Folding pairs halves the shuffles and adds, which
    // with the MUFU queue stalled the warps most. The 2^8 (in lse8) keeps the
    // sums of 16 heads in f16's normal range from p = 2^-22 up to 16; a larger
    // sum saturates to infinity, which still ranks its block first.
    uint32_t v[8];
#pragma unroll
    for (int n = 0; n < 8; ++n) {
      float x[4];
#pragma unroll
      for (int c = 0; c < 4; ++c) x[c] = fmaf(acc[4 * n + c], sc, -lse8[m][c / 2]);
      // A quarter off the MUFU. With the warpgroups in step (a block barrier a
      // tile) three eighths were best; since they drift apart, a quarter: TTFT
      // at 1M 39.50-39.53 s against 39.57-39.63 (H100, same call). Those terms
      // carry f16's rounding of x (up to 0.3%) and floor at p = 2^-21.
      if (n % 4 == 3) {
        v[n] = AddF16x2(Exp2F16x2OnFma(PackF16(x[0], x[1])), Exp2F16x2OnFma(PackF16(x[2], x[3])));
      } else {
        v[n] = PackF16(Exp2(x[0]) + Exp2(x[2]), Exp2(x[1]) + Exp2(x[3]));
      }
    }
    // Sum over the eight lanes of a column (the other heads), halving the keys
    // each lane keeps at each step: lane bit 4 (g & 4) keeps keys 32 .., then
    // bit 3 keys 16 .. of those, bit 2 keys 8 ..: lane g ends with keys 8 g ...
    FoldHalf<4>(v, gq & 4, 16);
    FoldHalf<2>(v, gq & 2, 8);
    FoldHalf<1>(v, gq & 1, 4);
    float key_even, key_odd;
    UnpackF16(v[0], 1.0f / 256, key_even, key_odd);
    // Lanes t = 0 finish block 2 g of the tile (keys 8 g - 1 .. 8 g + 3), lanes
    // t = 2 block 2 g + 1 (keys 8 g + 3 .. 8 g + 7).
    float pair = fmaxf(key_even, key_odd);
    pair = fmaxf(pair, __shfl_xor_sync(0xffffffff, pair, 1));
    const float prev = __shfl_sync(0xffffffff, key_odd, from_prev);
    const float prev_group = __shfl_sync(0xffffffff, key_odd, from_prev_group);
    const float before = tq == 0 ? (gq > 0 ? prev_group : carry[m]) : prev;
    carry[m] = prev_group;  // at g = 0: key 63, from lane 31
    const int c = b0 + 16 * u + 2 * gq + tq / 2;
    if (row_ok[m] && c >= p.cand.init && c < b_end)
      p.scores[((pos(m) - p.first) * p.Hk + g) * p.ncap + c - p.cand.init] = ScoreScaled(fmaxf(before, pair));
  });
#endif
}

struct TopKParams {
  const __half* scores;  // as ScoreParams::scores
  int64_t first, T, ncap;
  const int64_t* positions;  // device: row r at positions[r]; or null: at first + r
  int Hk, selected;
  Candidates cand;
  int* blocks;  // [T, Hk, selected]
  int* counts;  // [T, Hk]
};

// TopKKernel's shape: a warp per (token, group), kTopKWarps a thread block. A warp gathers up to
// kTopKGathered scores at or above its bound into shared memory, each with its candidate's
// index in the low 16 bits (so at most 2^15 candidates: contexts up to 2M tokens).
constexpr int kTopKWarps = 8;
constexpr int kTopKGathered = 1024;
constexpr int64_t kTopKMaxCandidates = int64_t(1) << 15;

// The largest x below 2^15 (a non-negative f16's bits) for which count(x) >= keep, where count
// is non-increasing in x: a bitwise search from the top bit, one count a round.
template <typename Count>
__device__ __forceinline__ uint32_t LargestReaching(int keep, Count count) {
  uint32_t x = 0;
  for (int bit = 14; bit >= 0; --bit) {
    const uint32_t trial = x | (1u << bit);
    if (count(trial) >= keep) x = trial;
  }
  return x;
}

// Eight scores (non-negative f16s, which order as their bit patterns) from `at` on, those from
// `end` on as 0 (read from the row's last piece, to stay in bounds).
__device__ __forceinline__ uint4 LoadScores8(const uint16_t* row, int64_t at, int64_t end) {
  uint4 x = *reinterpret_cast<const uint4*>(row + min(at, (end - 1) / 8 * 8));
  if (at + 8 > end) {
    const int valid = end > at ? int(end - at) : 0;
    auto mask = [&](int word) { return (2 * word < valid ? 0xFFFFu : 0u) | (2 * word + 1 < valid ? 0xFFFF0000u : 0u); };
    x.x &= mask(0);
    x.y &= mask(1);
    x.z &= mask(2);
    x.w &= mask(3);
  }
  return x;
}

// Score e of eight loaded by LoadScores8.
__device__ __forceinline__ uint32_t Score16(const uint4& x, int e) {
  const uint32_t* word = &x.x;
  return (word[e / 2] >> (16 * (e % 2))) & 0xFFFFu;
}

// The `keep` best candidate blocks of each (token, group): the scores above tau, the keep-th
// largest score, and the lowest blocks of those equal to it; plus the forced init and local
// blocks. Lists come out in ascending order. A warp a row, with no block-wide barrier: the
// earlier form (a thread block a row, bitwise searches of block-wide counts) waited on a chain
// of ~30 barriers a row, 0.20 ms for a chunk of 8448 rows at 128K and 0.66 ms at 1M (H100).
//
// The row's candidates fall into segments of 16 M scores, 32 a lane. The keep-th largest
// segment maximum bounds tau from below (keep segments hold a score at least that); where the
// maxima are distinct, only keep segments reach it, so the scores at or above the bound (about
// keep of them unless the scores are mostly ties) are few. They are gathered in block order into
// shared memory, where the search for tau and the selection run; where more than kTopKGathered
// reach the bound (a sea of ties), both run over the whole row instead.
template <int M>
__global__ void __launch_bounds__(kTopKWarps * 32, M == 1 ? 4 : 2) TopKKernel(TopKParams p) {
  constexpr int kSeg = 16 * M;
  __shared__ uint32_t gathered_at[kTopKWarps][kTopKGathered];  // score << 16 | candidate
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t w = int64_t(blockIdx.x) * kTopKWarps + warp;  // row * Hk + group
  if (w >= p.T * p.Hk) return;
  const int64_t r = w / p.Hk;
  const int64_t pos = p.positions ? p.positions[r] : p.first + r, bq = pos / kBlock;
  const int64_t nc = p.cand.Count(bq);
  const int keep = p.cand.keep;
  int* out = p.blocks + w * p.selected;
  if (nc <= keep) {  // every block up to b_q
    for (int64_t b = lane; b <= bq; b += 32) out[b] = int(b);
    if (lane == 0) p.counts[w] = int(bq + 1);
    return;
  }
  const uint16_t* row = reinterpret_cast<const uint16_t*>(p.scores + w * p.ncap);  // ncap: a multiple of 8
  const int64_t segments = (nc + kSeg - 1) / kSeg;
  // Loads go kGroup rounds (segments lane + 32 i, i in a group) at a time, so that their
  // latencies overlap; rounds past the last segment are skipped (the same in every lane). Two
  // for segments of 16, so that a thread fits in 64 registers: four blocks an SM, and a 1M
  // chunk's launch of 2112 rows in one wave (at three blocks an SM, 1.33 waves: 131-133 against
  // 152-155 us a launch under `ncu`, H100).
  constexpr int kGroup = M == 1 ? 2 : 4;
  const int rounds = int((segments + 31) / 32);
  // The maximum of segment lane + 32 i in half i % 2 of seg_max[i / 2] (f16 bits: two to a
  // register, which leaves room for four blocks an SM); 0 past the last.
  uint32_t seg_max[16];
#pragma unroll
  for (int i0 = 0; i0 < 32; i0 += kGroup) {
    uint4 x[kGroup][kSeg / 8];
    if (i0 < rounds) {
#pragma unroll
      for (int i = 0; i < kGroup; ++i)
#pragma unroll
        for (int k = 0; k < kSeg / 8; ++k) x[i][k] = LoadScores8(row, (lane + 32 * (i0 + i)) * kSeg + 8 * k, nc);
    }
#pragma unroll
    for (int i = 0; i < kGroup; i += 2) {
      uint32_t m[2] = {0, 0};
#pragma unroll
      for (int h = 0; h < 2; ++h)
#pragma unroll
        for (int k = 0; k < kSeg / 8; ++k)
          if (i0 < rounds)
            m[h] = __vmaxu2(m[h], __vmaxu2(__vmaxu2(x[i + h][k].x, x[i + h][k].y), __vmaxu2(x[i + h][k].z, x[i + h][k].w)));
      seg_max[(i0 + i) / 2] = max(m[0] & 0xFFFFu, m[0] >> 16) | max(m[1] & 0xFFFFu, m[1] >> 16) << 16;
    }
  }
  // With fewer segments than keep there is no bound: every score is gathered.
  const uint32_t bound = segments < keep ? 0u : LargestReaching(keep, [&](uint32_t trial) {
    int n = 0;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      if (2 * i >= rounds) break;
      n += __popc(__vcmpgeu2(seg_max[i], trial * 0x10001u)) / 16;
    }
    return int(__reduce_add_sync(0xffffffff, unsigned(n)));
  });
  unsigned reaching = 0;  // bit i: segment lane + 32 i reaches the bound
#pragma unroll
  for (int i = 0; i < 32; ++i)
    reaching |= unsigned(lane + 32 * i < segments && (seg_max[i / 2] >> (16 * (i % 2)) & 0xFFFFu) >= bound) << i;
  uint32_t* gathered = gathered_at[warp];
  int count = 0;  // gathered so far (the same in every lane)
#pragma unroll 1
  for (int i0 = 0; i0 < rounds; i0 += kGroup) {
    const unsigned group = (reaching >> i0) & ((1u << kGroup) - 1);
    if (!__any_sync(0xffffffff, group != 0)) continue;
    uint4 x[kGroup][kSeg / 8];
#pragma unroll
    for (int i = 0; i < kGroup; ++i)
#pragma unroll
      for (int k = 0; k < kSeg / 8; ++k)
        x[i][k] = (group >> i) & 1 ? LoadScores8(row, (lane + 32 * (i0 + i)) * kSeg + 8 * k, nc) : uint4{0, 0, 0, 0};
#pragma unroll
    for (int i = 0; i < kGroup; ++i) {
      // hits, bit j: this lane's score c0 + j reaches the bound (none where its segment does
      // not); then their places: a round's segments, in lane order, are in block order.
      const int64_t c0 = (lane + 32 * (i0 + i)) * kSeg;
      uint32_t hits = 0;
      if ((group >> i) & 1) {
#pragma unroll
        for (int j = 0; j < kSeg; ++j) hits |= uint32_t(Score16(x[i][j / 8], j % 8) >= bound) << j;
      }
      const int n = __popc(hits);
      int before = n;
#pragma unroll
      for (int off = 1; off < 32; off <<= 1) {
        const int y = __shfl_up_sync(0xffffffff, before, off);
        if (lane >= off) before += y;
      }
      // One round per hit of this lane (a few), the score read again (from L1) rather than
      // picked from the registers by a loop over all kSeg: 16% fewer instructions, 122-123
      // against 131-133 us a launch at 1M. Past the row's end (hits only where the bound is 0)
      // the score is the 0 that LoadScores8 gave.
      for (int at = count + before - n; hits != 0 && at < kTopKGathered; ++at, hits &= hits - 1) {
        const int64_t c = c0 + __ffs(hits) - 1;
        gathered[at] = (c < nc ? uint32_t(row[c]) << 16 : 0u) | uint32_t(c);
      }
      count += __shfl_sync(0xffffffff, before, 31);
    }
  }
  __syncwarp();
  // Search and select among the gathered scores, or (too many ties) the whole row.
  const bool in_shared = count <= kTopKGathered;
  const int64_t n = in_shared ? count : nc;
  auto score = [&](int64_t k) { return in_shared ? gathered[k] >> 16 : uint32_t(row[k]); };
  auto candidate = [&](int64_t k) { return in_shared ? int64_t(gathered[k] & 0xFFFFu) : k; };
  const uint32_t tau = LargestReaching(keep, [&](uint32_t trial) {
    int c = 0;
    for (int64_t k = lane; k < n; k += 32) c += score(k) >= trial;
    return int(__reduce_add_sync(0xffffffff, unsigned(c)));
  });
  int above = 0;
  for (int64_t k = lane; k < n; k += 32) above += score(k) > tau;
  const int need_eq = keep - int(__reduce_add_sync(0xffffffff, unsigned(above)));  // ties at tau: the lowest blocks
  const unsigned lower_lanes = (1u << lane) - 1;
  int taken = 0, equal = 0;  // so far, in block order (the same in every lane)
  for (int64_t k0 = 0; k0 < n && taken < keep; k0 += 32) {
    const int64_t k = k0 + lane;
    const uint32_t s = k < n ? score(k) : 0u;
    const unsigned eq = __ballot_sync(0xffffffff, k < n && s == tau);
    const bool take = k < n && (s > tau || (s == tau && equal + __popc(eq & lower_lanes) < need_eq));
    const unsigned took = __ballot_sync(0xffffffff, take);
    if (take) out[p.cand.init + taken + __popc(took & lower_lanes)] = int(p.cand.init + candidate(k));
    taken += __popc(took);
    equal += __popc(eq);
  }
  for (int b = lane; b < p.cand.init; b += 32) out[b] = b;
  for (int v = lane; v <= p.cand.window; v += 32) out[p.cand.init + keep + v] = int(bq - p.cand.window + v);
  if (lane == 0) p.counts[w] = p.cand.init + keep + p.cand.window + 1;
}

struct AttnParams {
  const Bf16* q;  // [T, H, D]
  int64_t first, T;
  SparseCacheView cache;  // K/V rows
  int H, Hk, G;
  float scale_log2;
  const int* blocks;  // [T, Hk, selected] as TopKKernel lays them out, or null: dense causal
  int selected;
  Candidates cand;
  Bf16* o;            // [T, H, D]: the output, times sigmoid(gate) where given
  const Bf16* gate;  // [T, H, D], or null
  __half* carry;   // [T, H, D]: between launches, rows' normalised sums
  float* running;  // [T, H, 2]: between launches, each (row, head)'s running max and sum
  // ChosenBlocksKernel: this launch's blocks [block_lo, block_hi); `last` normalises the output.
  int64_t block_lo, block_hi;
  bool last;
};

// Whether a row attends blocks of its own choice beyond the blocks that every row of its query
// block attends (the init and local blocks): only sparse rows past the point where the
// candidates outnumber the blocks to keep.
__device__ __forceinline__ bool HasChosenBlocks(const AttnParams& p, int64_t bq) {
  return p.blocks != nullptr && p.cand.Count(bq) > p.cand.keep;
}

// The group's heads of one row as A fragments: rows = heads (zero beyond G), bf16.
template <int D>
__device__ __forceinline__ void LoadQueryFragments(const Bf16* qrow, int G, uint32_t (&qa)[D / 16][4]) {
  const int lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
    for (int i = 0; i < 4; ++i) {
      const int h = gq + 8 * (i % 2), col = kk * 16 + 2 * tq + 8 * (i / 2);
      qa[kk][i] = h < G ? __ldcs(reinterpret_cast<const unsigned*>(qrow + int64_t(h) * D + col)) : 0u;
    }
}

// A warp's online-softmax state for its 16 head rows: lane (g, t) holds rows g and g + 8,
// columns n * 8 + 2t, +1 of the output, and its own keys' share of each row's sum.
template <int D>
struct SoftmaxState {
  float o[D / 8][4];
  float m[2], l[2];

  __device__ __forceinline__ void Clear() {
#pragma unroll
    for (int n = 0; n < D / 8; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) o[n][c] = 0.0f;
    m[0] = m[1] = -INFINITY;
    l[0] = l[1] = 0.0f;
  }

  // One step of Keys keys: scores of the rows against the K tile ks, then O += P V from vs (both
  // [Keys, D] swizzled). With kCausal, keys after `pos` are masked; the step must hold a key at
  // or before pos.
  template <bool kCausal, int Keys>
  __device__ __forceinline__ void Attend(const uint32_t (&qa)[D / 16][4], const Bf16* ks, const Bf16* vs,
                                         int64_t key0, int64_t pos, float scale_log2) {
    const int lane = threadIdx.x % 32;
    float s[Keys / 8][4];  // scores: heads x keys
#pragma unroll
    for (int n = 0; n < Keys / 8; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[n][c] = 0.0f;
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
#pragma unroll
      for (int np = 0; np < Keys / 16; ++np) {
        uint32_t kb[4];
        LdMatrixX4(kb, ks + Swizzled<D>(np * 16 + (lane % 8) + 8 * (lane / 16), kk * 16 + 8 * ((lane / 8) % 2)));
        MmaBf16(s[2 * np], qa[kk], kb[0], kb[1]);
        MmaBf16(s[2 * np + 1], qa[kk], kb[2], kb[3]);
      }
    uint32_t pa[Keys / 16][4];
    Update<kCausal, Keys>(s, key0, pos, scale_log2, pa);
#pragma unroll
    for (int ks16 = 0; ks16 < Keys / 16; ++ks16)
#pragma unroll
      for (int dp = 0; dp < D / 16; ++dp) {
        uint32_t vb[4];
        LdMatrixX4Trans(vb, vs + Swizzled<D>(ks16 * 16 + (lane % 8) + 8 * ((lane / 8) % 2), dp * 16 + 8 * (lane / 16)));
        MmaBf16(o[2 * dp], pa[ks16], vb[0], vb[1]);
        MmaBf16(o[2 * dp + 1], pa[ks16], vb[2], vb[3]);
      }
  }

  // The online softmax over one step's raw scores s (the rows' C fragments, keys key0 ..): the
  // max, the rescale of o and l, and P = exp2(s − max) summed into l and packed to bf16 A
  // fragments for O += P V.
  template <bool kCausal, int Keys>
  __device__ __forceinline__ void Update(float (&s)[Keys / 8][4], int64_t key0, int64_t pos, float scale_log2,
                                         uint32_t (&pa)[Keys / 16][4]) {
    float corr[2];
    Max<kCausal, Keys>(s, key0, pos, scale_log2, corr);
    Rescale(corr);
    Exponentials<Keys>(s, scale_log2);
    Pack<Keys>(s, pa);
  }

  // Update without touching o, for a caller whose previous O += P V may still be running: the
  // max, l, and P = exp2(s − max) in s; o is to be scaled by `corr` (Rescale) once that product
  // is done.
  template <bool kCausal, int Keys>
  __device__ __forceinline__ void Scores(float (&s)[Keys / 8][4], int64_t key0, int64_t pos, float scale_log2,
                                         float (&corr)[2]) {
    Max<kCausal, Keys>(s, key0, pos, scale_log2, corr);
    Exponentials<Keys>(s, scale_log2);
  }

  // The rows' new max (of the raw scores, scale_log2 > 0, so that each exponent is one FMA) and
  // the factor `corr` that l (here) and o (Rescale) take for it.
  template <bool kCausal, int Keys>
  __device__ __forceinline__ void Max(float (&s)[Keys / 8][4], int64_t key0, int64_t pos, float scale_log2,
                                      float (&corr)[2]) {
    const int tq = threadIdx.x % 4;
    if (kCausal) {
#pragma unroll
      for (int n = 0; n < Keys / 8; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c)
          if (key0 + n * 8 + 2 * tq + (c % 2) > pos) s[n][c] = -INFINITY;
    }
    float mx[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      mx[h] = TreeReduce<Keys>(s, h, [](float a, float b) { return fmaxf(a, b); });
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 1));
      mx[h] = fmaxf(mx[h], __shfl_xor_sync(0xffffffff, mx[h], 2));
      const float mn = fmaxf(m[h], mx[h] * scale_log2);  // finite: the step has a visible key
      corr[h] = Exp2(m[h] - mn);
      m[h] = mn;
      l[h] *= corr[h];
    }
  }

  // P = exp2(s scale_log2 − max) in s, summed into l.
  template <int Keys>
  __device__ __forceinline__ void Exponentials(float (&s)[Keys / 8][4], float scale_log2) {
#pragma unroll
    for (int n = 0; n < Keys / 8; ++n)
#pragma unroll
      for (int c = 0; c < 4; ++c) s[n][c] = Exp2(fmaf(s[n][c], scale_log2, -m[c / 2]));
#pragma unroll
    for (int h = 0; h < 2; ++h) l[h] += TreeReduce<Keys>(s, h, [](float a, float b) { return a + b; });
  }

  // op over this thread's scores of row half h (s[n][2h], s[n][2h + 1]) as a tree, whose short
  // dependency chains leave the few warps of a scheduler more to issue.
  template <int Keys, typename Op>
  __device__ __forceinline__ static float TreeReduce(const float (&s)[Keys / 8][4], int h, Op op) {
    static_assert((Keys / 8 & (Keys / 8 - 1)) == 0, "a power of two of 8-key fragments");
    float t[Keys / 8];
#pragma unroll
    for (int n = 0; n < Keys / 8; ++n) t[n] = op(s[n][2 * h], s[n][2 * h + 1]);
#pragma unroll
    for (int width = Keys / 16; width >= 1; width /= 2)
#pragma unroll
      for (int n = 0; n < width; ++n) t[n] = op(t[n], t[n + width]);
    return t[0];
  }

  // Once a row's max has settled, most steps leave it alone: skip the rescale (a quarter of a
  // step's instructions) when no row of the warp moved.
  __device__ __forceinline__ void Rescale(const float (&corr)[2]) {
    if (__any_sync(0xffffffff, corr[0] != 1.0f || corr[1] != 1.0f)) {
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
#pragma unroll
        for (int c = 0; c < 4; ++c) o[n][c] *= corr[c / 2];
    }
  }

  template <int Keys>
  __device__ __forceinline__ static void Pack(const float (&s)[Keys / 8][4], uint32_t (&pa)[Keys / 16][4]) {
#pragma unroll
    for (int ks16 = 0; ks16 < Keys / 16; ++ks16) {
      pa[ks16][0] = PackBf16(s[2 * ks16][0], s[2 * ks16][1]);
      pa[ks16][1] = PackBf16(s[2 * ks16][2], s[2 * ks16][3]);
      pa[ks16][2] = PackBf16(s[2 * ks16 + 1][0], s[2 * ks16 + 1][1]);
      pa[ks16][3] = PackBf16(s[2 * ks16 + 1][2], s[2 * ks16 + 1][3]);
    }
  }

  // The state a launch left for this row (carry: its G head rows, normalised; running: their
  // max and sum).
  __device__ __forceinline__ void Load(const __half* carry, const float* running, int G) {
    const int lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int head = gq + 8 * h;
      m[h] = head < G ? running[2 * head] : -INFINITY;
      const float total = head < G ? running[2 * head + 1] : 0.0f;
      l[h] = tq == 0 ? total : 0.0f;  // one lane holds the carried sum
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        float2 x{0.0f, 0.0f};
        if (head < G)
          x = __half22float2(__ldcs(reinterpret_cast<const __half2*>(carry + int64_t(head) * D + n * 8 + 2 * tq)));
        o[n][2 * h] = x.x * total;
        o[n][2 * h + 1] = x.y * total;
      }
    }
  }

  // Writes the rows, normalised: the output into orow (`last`; times sigmoid(gate) where the
  // gate row is given, then rounded to bf16, as the output projection takes it), or the state
  // for a later launch into carry (f16: half the bytes of fp32, and a normalised row is a mean of
  // value rows, so it stays in range) with each row's max and sum into `running`.
  __device__ __forceinline__ void Store(Bf16* orow, const Bf16* gate, __half* carry, float* running, int G,
                                        bool last) {
    const int lane = threadIdx.x % 32, gq = lane / 4, tq = lane % 4;
    float total[2];
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      total[h] = l[h] + __shfl_xor_sync(0xffffffff, l[h], 1);
      total[h] += __shfl_xor_sync(0xffffffff, total[h], 2);
    }
    // The gate's loads all go first, so that they are in flight together (the stores to orow
    // would otherwise order them).
    __nv_bfloat162 z[2][D / 8];
#pragma unroll
    for (int h = 0; h < 2; ++h)
#pragma unroll
      for (int n = 0; n < D / 8; ++n)
        if (last && gate && gq + 8 * h < G)
          z[h][n] = __ldcs(reinterpret_cast<const __nv_bfloat162*>(gate + int64_t(gq + 8 * h) * D + n * 8 + 2 * tq));
#pragma unroll
    for (int h = 0; h < 2; ++h) {
      const int head = gq + 8 * h;
      if (head >= G) continue;
      const float scale = 1.0f / total[h];  // a row has a visible key, so total >= 1
#pragma unroll
      for (int n = 0; n < D / 8; ++n) {
        float x = o[n][2 * h] * scale, y = o[n][2 * h + 1] * scale;
        const int64_t at = int64_t(head) * D + n * 8 + 2 * tq;
        if (last) {
          if (gate) {
            const float2 zf = __bfloat1622float2(z[h][n]);
            x *= SigmoidF(zf.x);
            y *= SigmoidF(zf.y);
          }
          __stcs(reinterpret_cast<__nv_bfloat162*>(orow + at), __floats2bfloat162_rn(x, y));
        } else {
          __stcs(reinterpret_cast<__half2*>(carry + at), __floats2half2_rn(x, y));
        }
      }
      if (!last && tq == 0) {
        running[2 * head] = m[h];
        running[2 * head + 1] = total[h];
      }
    }
  }
};

// Issues the K/V of keys key0 .. key0 + Keys - 1 of group g (those after `last_key` as zeros)
// into ks / vs with cp.async, in the ldmatrix swizzle, threads `part` of `parts` each taking a
// share.
template <int D, int Keys>
__device__ __forceinline__ void IssueKeys(const AttnParams& p, int g, int64_t key0, int64_t last_key, Bf16* ks,
                                          Bf16* vs, int part, int parts) {
  const int64_t tile_at = KvRowOffset(p.cache, key0, p.Hk * D) + g * D;  // a block is whole in one page
  for (int c = part; c < Keys * D / 8; c += parts) {
    const int row = c / (D / 8), cc = c % (D / 8);
    const bool valid = key0 + row <= last_key;
    const int64_t at = tile_at + int64_t(valid ? row : 0) * p.Hk * D + cc * 8;
    const int to = Swizzled<D>(row, cc * 8);
    CpAsync16(ks + to, p.cache.k + at, valid);
    CpAsync16(vs + to, p.cache.v + at, valid);
  }
  CpAsyncCommit();
}

// What a SharedBlocksKernel thread block walks: `rows` consecutive positions (a warp each, all
// in one query block) of one KV group, and the steps of kSharedKeys keys they attend: the
// init blocks, then from block `local0` on up to b_q (every block up to b_q where no row has
// blocks of its own choice).
struct SharedSteps {
  static constexpr int kPerBlock = kBlock / kSharedKeys;
  int64_t pos0, pos, r, bq, last_pos, local0, used;
  bool active, chosen;
  int init;

  __device__ SharedSteps(const AttnParams& p, int rows, int warp) {
    pos0 = (p.first / rows + blockIdx.x) * rows;  // an aligned group of positions
    pos = pos0 + warp;
    r = pos - p.first;
    bq = pos0 / kBlock;
    active = pos >= p.first && r < p.T;
    last_pos = min(pos0 + rows, p.first + p.T) - 1;  // the block's last row
    chosen = HasChosenBlocks(p, bq);
    init = chosen ? p.cand.init : 0;
    local0 = chosen ? bq - p.cand.window : init;
    const int64_t steps = kPerBlock * (init + bq - local0 + 1);
    // With steps shorter than a block, the last may hold no key of this thread block.
    used = Key0(steps - 1) > last_pos ? steps - 1 : steps;
  }
  __device__ int64_t Key0(int64_t s) const {
    const int64_t b = s / kPerBlock < init ? s / kPerBlock : local0 + (s / kPerBlock - init);
    return b * kBlock + (s % kPerBlock) * kSharedKeys;
  }
};

// The blocks every row of a query block attends: the init and local blocks for rows with
// blocks of their own choice, else (dense rows, and sparse rows with fewer candidates than
// blocks to keep) every block up to the query's. A thread block takes the rows of SharedSteps,
// and its warps share each K/V tile in shared memory: the local window is read once per
// kSharedRows rows instead of once per row. Rows with chosen blocks leave their state for
// ChosenBlocksKernel, the rest their output.
template <int D>
__global__ void __launch_bounds__(kSharedRows * 32) SharedBlocksKernel(AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  Bf16* stages = reinterpret_cast<Bf16*>(smem_raw);  // [kSharedStages][K | V][kSharedKeys, D]
  const int warp = threadIdx.x / 32, g = blockIdx.y;
  const SharedSteps w(p, kSharedRows, warp);
  const int64_t pos = w.pos, r = w.r, last_pos = w.last_pos, used = w.used;
  const bool active = w.active, chosen = w.chosen;

  uint32_t qa[D / 16][4];
  if (active) LoadQueryFragments<D>(p.q + (r * p.H + int64_t(g) * p.G) * D, p.G, qa);
  SoftmaxState<D> st;
  st.Clear();
  auto issue = [&](int64_t s) {
    Bf16* ks = stages + (s % kSharedStages) * 2 * kSharedKeys * D;
    IssueKeys<D, kSharedKeys>(p, g, w.Key0(s), last_pos, ks, ks + kSharedKeys * D, threadIdx.x, kSharedRows * 32);
  };
  for (int64_t s = 0; s < kSharedStages - 1; ++s)
    if (s < used) issue(s);
    else CpAsyncCommit();  // empty groups keep the wait count uniform
  for (int64_t s = 0; s < used; ++s) {
    CpAsyncWait<kSharedStages - 2>();
    __syncthreads();  // step s is in for every thread, and step s - 1's buffer is free
    if (s + kSharedStages - 1 < used) issue(s + kSharedStages - 1);
    else CpAsyncCommit();
    const int64_t key0 = w.Key0(s);
    if (active && key0 <= pos) {
      const Bf16* ks = stages + (s % kSharedStages) * 2 * kSharedKeys * D;
      if (key0 + kSharedKeys - 1 > pos)
        st.template Attend<true, kSharedKeys>(qa, ks, ks + kSharedKeys * D, key0, pos, p.scale_log2);
      else
        st.template Attend<false, kSharedKeys>(qa, ks, ks + kSharedKeys * D, key0, pos, p.scale_log2);
    }
  }
  if (active) {
    const int64_t at = r * p.H + int64_t(g) * p.G;
    st.Store(p.o + at * D, p.gate ? p.gate + at * D : nullptr, p.carry + at * D, p.running + at * 2, p.G,
             /*last=*/!chosen);
  }
}

// SharedBlocksKernel on Hopper (D = 128): each warpgroup takes four rows as 64 MMA rows (four
// tokens of 16 heads), and the thread block's kSharedWgGroups warpgroups share each K/V tile.
// One warp of a producer warpgroup loads the tiles with TMA (k_map, v_map: KvTensorMap) into
// kSharedWgStages stages, each refilled once every consumer warp has released it; the products
// are warpgroup MMAs: S = Q Kᵀ with Q from registers (each warp's row as the A fragment) and the
// K tile in shared memory, O += P V with P from registers and the V tile read N-major, both
// tiles in the 128-byte swizzle. A warpgroup issues step s + 1's S before step s's O += P V, so
// that its softmax of step s + 1 runs while that product does, and rescales o once it is done.
// A warp whose row sees no key of a step takes P = 0 there. The warpgroups meet at no
// block-wide barrier, so one's softmax also runs under the other's MMAs. The producer
// warpgroup gives its registers to the consumers, which hold Q, o, S and P.
// Stage 2 of one layer's last chunk at 128K on an H100: 5.51 ms with one warpgroup a block and
// every thread issuing cp.async, 5.77 with one and TMA, 5.29 with two and TMA (four: 5.23, with
// spills at 128 registers); with a producer warp instead of a block-wide barrier a step, 5.16
// against 5.25 in one call (the kernel 0.75 against 0.81 ms; three or six stages: 0.82-0.83);
// with Q in registers, the next step's S issued before O += P V and each exponent one FMA,
// 5.13-5.15 against 5.29-5.30 (the kernel under `ncu` 0.71-0.72 against 0.92 ms; three or five
// stages: 0.78; the warpgroups taking turns at their MMAs: 0.72-0.74).
constexpr int kSharedWgDim = 128;
constexpr int kSharedWgGroups = 2;
constexpr int kSharedWgRows = 4 * kSharedWgGroups;                // consumer warps, a row each
constexpr int kSharedWgThreads = kSharedWgRows * 32 + 128;         // and the producer warpgroup
constexpr int kSharedWgStages = 4;
// Registers a thread: the producer's few and the consumers' many within what the launch holds
// (the 64K registers of an SM over its threads, in eights).
constexpr int kSharedWgProducerRegs = 56, kSharedWgConsumerRegs = 224;
static_assert(128 * kSharedWgProducerRegs + kSharedWgRows * 32 * kSharedWgConsumerRegs <=
                  65536 / kSharedWgThreads / 8 * 8 * kSharedWgThreads,
              "the register split must fit the launch's allocation");
constexpr size_t kSharedWgBytes = size_t(kSharedWgStages * 2 * kSharedKeys) * kSharedWgDim * sizeof(Bf16) +
                                  (2 * kSharedWgStages + 1) * sizeof(uint64_t) + 1024;

__global__ void __launch_bounds__(kSharedWgThreads, 1)
    SharedBlocksWgmmaKernel(AttnParams p, const __grid_constant__ CUtensorMap k_map,
                            const __grid_constant__ CUtensorMap v_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  constexpr int D = kSharedWgDim, S = kSharedWgStages;
  static_assert(kSharedKeys == 64 && kKvPageTokens % kSharedKeys == 0,
                "64-key steps (the N of S = Q K^T), each whole in a page");
  extern __shared__ unsigned char smem_raw[];
  // [S][K | V][kSharedKeys, D]
  Bf16* stages = reinterpret_cast<Bf16*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(stages + S * 2 * kSharedKeys * D);  // [S]: the step's K/V landed
  uint64_t* empty = full + S;  // [S]: every consumer warp is done with the stage
  uint64_t* zeroed = empty + S;  // the last step's V rows past the block's last key are zeros
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = blockIdx.y;
  const bool producer = warp >= kSharedWgRows;
  const SharedSteps w(p, kSharedWgRows, producer ? 0 : warp);
  const int64_t pos = w.pos, r = w.r, last_pos = w.last_pos, used = w.used;
  const bool active = w.active, chosen = w.chosen;  // the producer, which returns early, has no row
  // Only the last step can reach past the block's last key (steps ascend).
  const bool partial_last = used > 0 && w.Key0(used - 1) + kSharedKeys - 1 > last_pos;
  auto stage = [&](int64_t s) { return stages + (s % S) * 2 * kSharedKeys * D; };
  if (threadIdx.x == 0) {
    for (int s = 0; s < S; ++s) {
      MbarInit(&full[s], 1);
      MbarInit(&empty[s], kSharedWgRows);
    }
    MbarInit(zeroed, 1);
    FenceMbarInit();
  }
  __syncthreads();  // the barriers' initialisation

  if (producer) {
    WarpgroupReleaseRegisters<kSharedWgProducerRegs>();
    if (warp > kSharedWgRows) return;  // the others only make the producer a whole warpgroup
    // Step s's K and V tiles (a step's keys lie in one page), as 64-column slabs, once every
    // consumer warp has released step s − S's stage.
    if (lane == 0) {
      for (int64_t s = 0; s < used; ++s) {
        if (s >= S) MbarWait(&empty[s % S], uint32_t(s / S - 1) & 1);
        const int64_t key0 = w.Key0(s);
        const int page = p.cache.pages[key0 / kKvPageTokens], row = int(key0 % kKvPageTokens);
        uint64_t* bar = &full[s % S];
        MbarArriveExpectTx(bar, 2 * kSharedKeys * D * sizeof(Bf16));
        for (int slab = 0; slab < D / 64; ++slab) {
          TmaLoad4d(stage(s) + slab * kSharedKeys * 64, &k_map, 64 * slab, g, row, page, bar);
          TmaLoad4d(stage(s) + kSharedKeys * D + slab * kSharedKeys * 64, &v_map, 64 * slab, g, row, page, bar);
        }
      }
    }
    if (partial_last) {
      // The rows after the block's last key may hold anything (NaN too), and P = 0 does not
      // cancel NaN in P V: those V rows become zeros (each a whole 128-byte line of each slab)
      // before the consumers take the last step.
      __syncwarp();
      const int64_t s = used - 1;
      MbarWait(&full[s % S], uint32_t(s / S) & 1);
      Bf16* vs = stage(s) + kSharedKeys * D;
      const int first_zero = int(last_pos - w.Key0(s) + 1);
      for (int c = lane; c < (kSharedKeys - first_zero) * (D / 8); c += 32) {
        const int row = first_zero + c / (D / 8), part = c % (D / 8);
        *reinterpret_cast<uint4*>(vs + ((part / 8) * kSharedKeys + row) * 64 + (part % 8) * 8) = uint4{0, 0, 0, 0};
      }
      FenceProxyAsync();
      __syncwarp();
      if (lane == 0) MbarArrive(zeroed);
    }
    return;
  }

  WarpgroupTakeRegisters<kSharedWgConsumerRegs>();
  // This warp's row: its 16 heads, as the A rows 16 (warp % 4) .. of the warpgroup's MMAs (zeros
  // past G and for a row outside the chunk).
  uint32_t qa[D / 16][4] = {};
  if (active) LoadQueryFragments<D>(p.q + (r * p.H + int64_t(g) * p.G) * D, p.G, qa);
  SoftmaxState<D> st;
  st.Clear();
  float(&o64)[64] = reinterpret_cast<float(&)[64]>(st.o);
  float sc[kSharedKeys / 8][4];  // a step's scores, then its P
  float(&s32)[32] = reinterpret_cast<float(&)[32]>(sc);
  uint32_t pa[kSharedKeys / 16][4];  // P as bf16 A fragments for O += P V
  // Descriptor words count 16 bytes: a slab of a 64-row tile is 64 rows of 128 bytes.
  constexpr uint32_t kSlab = kSharedKeys * 128 / 16;
  // S = Q Kᵀ of step s into sc, once its K/V has landed (and, for the last step, once the V rows
  // past the block's last key are zeros, which its O += P V, issued after this, reads).
  auto issue_scores = [&](int64_t s) {
    MbarWait(&full[s % S], uint32_t(s / S) & 1);
    if (partial_last && s == used - 1) MbarWait(zeroed, 0);
    const uint32_t k_desc = Sw128Descriptor(stage(s));
    WgmmaFence();
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk)
      WgmmaM64N64K16Rs<Bf16>(s32, qa[kk], k_desc + (kk / 4) * kSlab + (kk % 4) * 2, kk > 0);
    WgmmaCommit();
  };
  // Step s's P in sc (zeros for a row that sees none of its keys), and the factor that o takes.
  auto softmax = [&](int64_t s, float(&corr)[2]) {
    const int64_t key0 = w.Key0(s);
    corr[0] = corr[1] = 1.0f;
    if (active && key0 <= pos) {
      if (key0 + kSharedKeys - 1 > pos) st.template Scores<true, kSharedKeys>(sc, key0, pos, p.scale_log2, corr);
      else st.template Scores<false, kSharedKeys>(sc, key0, pos, p.scale_log2, corr);
    } else {
#pragma unroll
      for (int i = 0; i < 32; ++i) s32[i] = 0.0f;
    }
  };
  // O += P V of step s, from the P in pa.
  auto issue_values = [&](int64_t s) {
    const uint32_t v_rows = (SmemAddress(stage(s) + kSharedKeys * D) & 0x3FFFF) >> 4;
    WgmmaFence();  // orders the writes of P and the rescale of o before the MMAs
#pragma unroll
    for (int ks16 = 0; ks16 < kSharedKeys / 16; ++ks16)
      WgmmaM64N128K16RsTransB<kSharedKeys * 128, Bf16>(o64, pa[ks16], v_rows + ks16 * 16 * 128 / 16);
    WgmmaCommit();
  };
  // Once step s's O += P V is done: its stage goes back to the producer.
  auto values_done = [&](int64_t s) {
    WgmmaWait<0>();
    WgmmaFenceOperands(o64);
    WgmmaFenceOperands(pa);  // P's registers stay untouched until here: the MMA reads them while it runs
    if (lane == 0) MbarArrive(&empty[s % S]);
  };
  if (used > 0) {
    float corr[2];  // o is still zero
    issue_scores(0);
    WgmmaWait<0>();
    WgmmaFenceOperands(s32);
    softmax(0, corr);
    st.template Pack<kSharedKeys>(sc, pa);
    for (int64_t s = 0; s + 1 < used; ++s) {
      issue_scores(s + 1);
      issue_values(s);
      WgmmaWait<1>();  // step s + 1's S; step s's O += P V may still run
      WgmmaFenceOperands(s32);
      softmax(s + 1, corr);
      values_done(s);
      st.Rescale(corr);
      st.template Pack<kSharedKeys>(sc, pa);
    }
    issue_values(used - 1);
    values_done(used - 1);
  }
  if (active) {
    const int64_t at = r * p.H + int64_t(g) * p.G;
    st.Store(p.o + at * D, p.gate ? p.gate + at * D : nullptr, p.carry + at * D, p.running + at * 2, p.G,
             /*last=*/!chosen);
  }
#endif
}

// The blocks a sparse row chose (its list's entries after the init blocks, before the local
// ones), those in [block_lo, block_hi): one warp per (row, group), continuing the state that
// SharedBlocksKernel or the previous launch left. Chosen blocks lie wholly before the query,
// so no key is masked. Each warp streams its K/V tiles through its own two buffers.
//
// The chosen blocks of different rows seldom coincide, so their K/V comes from L2 or memory
// once per row. Launches over ranges of blocks whose K/V fits in L2 keep a long context's
// reads in L2; each launch then reads and writes the state once more. The rows' q and state
// move as streaming accesses (evict first), which leaves more of L2 to the K/V: 7.27-7.30 ->
// 7.12 ms at 1M (one layer's last chunk, H100).
//
// The warp first notes where each of its blocks starts in the cache (page table looked up once
// a block, in shared memory), so that a step's copy is only its cp.async: with the page lookup
// and the general copy's row checks, a step took some 570 instructions, over half of them
// addressing; now some 340, and the kernel is at L2 throughput at 1M as well as at 128K.
template <int D>
__global__ void __launch_bounds__(kAttnWarps * 32) ChosenBlocksKernel(AttnParams p) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int64_t r = int64_t(blockIdx.x) * kAttnWarps + warp;
  if (r >= p.T) return;  // warps never synchronise with each other
  const int g = blockIdx.y;
  const int64_t pos = p.first + r;
  if (!HasChosenBlocks(p, pos / kBlock)) return;
  Bf16* stage_base = reinterpret_cast<Bf16*>(smem_raw) + warp * 2 * 2 * kChosenKeys * D;  // [2][K | V][kChosenKeys, D]
  int64_t* block_at = reinterpret_cast<int64_t*>(smem_raw + ChosenStageBytes(D)) + warp * p.cand.keep;
  const int* list = p.blocks + (r * p.Hk + g) * p.selected + p.cand.init;
  const int row_elems = p.Hk * D;
  // block_at[0, blocks): where this launch's entries of the ascending list start in the cache.
  int blocks = 0;
  for (int e0 = 0; e0 < p.cand.keep; e0 += 32) {
    const int b = e0 + lane < p.cand.keep ? list[e0 + lane] : INT_MAX;
    const bool here = b >= p.block_lo && b < p.block_hi;
    const unsigned mask = __ballot_sync(0xffffffff, here);
    if (here)
      block_at[blocks + __popc(mask & ((1u << lane) - 1))] =
          KvRowOffset(p.cache, int64_t(b) * kBlock, row_elems) + int64_t(g) * D;
    blocks += __popc(mask);
  }
  const int64_t at = r * p.H + int64_t(g) * p.G;
  float* running = p.running + at * 2;
  if (blocks == 0 && !p.last) return;  // nothing to add in this range
  __syncwarp();

  // A step's copy: lane takes chunk cc of rows row0, row0 + kRowStep, ...
  constexpr int kPerBlock = kBlock / kChosenKeys, kChunks = D / 8, kRowStep = 32 / kChunks;
  const int cc = lane % kChunks, row0 = lane / kChunks;
  const int64_t lane_at = int64_t(row0) * row_elems + cc * 8;
  auto issue = [&](int s, int stage) {
    Bf16* ks = stage_base + stage * 2 * kChosenKeys * D;
    const int64_t from = block_at[s / kPerBlock] + int64_t(s % kPerBlock) * kChosenKeys * row_elems + lane_at;
#pragma unroll
    for (int i = 0; i < kChosenKeys / kRowStep; ++i) {
      const int to = Swizzled<D>(row0 + kRowStep * i, cc * 8);
      const int64_t row_at = from + int64_t(kRowStep * i) * row_elems;
      CpAsync16(ks + to, p.cache.k + row_at, true);
      CpAsync16(ks + kChosenKeys * D + to, p.cache.v + row_at, true);
    }
    CpAsyncCommit();
  };
  const int steps = kPerBlock * blocks;
  if (steps > 0) issue(0, 0);

  uint32_t qa[D / 16][4];
  LoadQueryFragments<D>(p.q + at * D, p.G, qa);
  SoftmaxState<D> st;
  st.Load(p.carry + at * D, running, p.G);
  for (int s = 0; s < steps; ++s) {
    if (s + 1 < steps) {
      issue(s + 1, (s + 1) % 2);
      CpAsyncWait<1>();
    } else {
      CpAsyncWait<0>();
    }
    __syncwarp();
    const Bf16* ks = stage_base + (s % 2) * 2 * kChosenKeys * D;
    st.template Attend<false, kChosenKeys>(qa, ks, ks + kChosenKeys * D, /*key0=*/0, pos, p.scale_log2);
    __syncwarp();  // this stage is refilled two steps later
  }
  st.Store(p.o + at * D, p.gate ? p.gate + at * D : nullptr, p.carry + at * D, running, p.G, p.last);
}

static_assert(kKvPageTokens % kBlock == 0, "a sparse block must not straddle KV pages");

absl::Status CheckShape(const SparseShape& sh) {
  if (sh.dim != 64 && sh.dim != 128) return absl::InvalidArgumentError("sparse head_dim must be 64 or 128");
  if (sh.heads % sh.kv_heads != 0 || sh.heads / sh.kv_heads > 16)
    return absl::InvalidArgumentError("at most 16 query heads per KV head");
  if (sh.block != kBlock || sh.kernel != 32 || sh.stride != 16)
    return absl::InvalidArgumentError("sparse attention needs block 64, kernel 32, stride 16");
  if (sh.window_blocks < 1 || sh.init_blocks < 0 || sh.selected_blocks <= sh.init_blocks + sh.window_blocks + 1)
    return absl::InvalidArgumentError("sparse selection needs a local window and room for scored blocks");
  // ChosenBlocksKernel keeps each row's chosen blocks' offsets in shared memory.
  if (sh.selected_blocks > kMaxSelectedBlocks)
    return absl::InvalidArgumentError(absl::StrCat("at most ", kMaxSelectedBlocks, " selected blocks per token"));
  return absl::OkStatus();
}

Candidates MakeCandidates(const SparseShape& sh) {
  return {sh.init_blocks, sh.window_blocks, sh.selected_blocks - sh.init_blocks - sh.window_blocks - 1};
}

// ScoreKernel<D, Tokens> with its shared-memory limit raised (set on every use: the limit
// belongs to the current device).
template <int D, int Tokens>
absl::StatusOr<void (*)(ScoreParams)> ScoreKernelFor() {
  SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ScoreKernel<D, Tokens>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 int(ScoreSmemBytes(D, Tokens))));
  return ScoreKernel<D, Tokens>;
}

template <int D, int Tokens>
absl::Status LaunchScoreKernel(const ScoreParams& p, int64_t blocks, cudaStream_t stream) {
  SALA_ASSIGN_OR_RETURN(auto* kernel, (ScoreKernelFor<D, Tokens>()));
  kernel<<<dim3(unsigned(blocks), p.Hk, p.splits), ScoreThreads(Tokens), ScoreSmemBytes(D, Tokens), stream>>>(p);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

// A decode step: a block per row (and split).
template <int D>
absl::Status LaunchDecodeScores(const ScoreParams& p, cudaStream_t stream) {
  return LaunchScoreKernel<D, kDecodeScoreTokens>(p, p.T, stream);
}

// The stage-1 kernel of a prefill and its launch shape: ScoreWgmmaKernel on Hopper, ScoreKernel
// elsewhere.
struct PrefillScorer {
  void (*kernel)(ScoreParams);                                // ScoreKernel, or null
  void (*wgmma_kernel)(ScoreParams, CUtensorMap, CUtensorMap);  // ScoreWgmmaKernel, or null
  int dim;
  int tokens, threads;  // query tokens and threads per block
  size_t smem;

  const void* Function() const {
    return kernel ? reinterpret_cast<const void*>(kernel) : reinterpret_cast<const void*>(wgmma_kernel);
  }
};

template <int D>
absl::StatusOr<PrefillScorer> PrefillScorerFor() {
  SALA_ASSIGN_OR_RETURN(const bool wgmma, HasWgmma());
  if (!wgmma) {
    SALA_ASSIGN_OR_RETURN(auto* kernel, (ScoreKernelFor<D, kPrefillScoreTokens>()));
    return PrefillScorer{kernel, nullptr, D, kPrefillScoreTokens, ScoreThreads(kPrefillScoreTokens),
                         ScoreSmemBytes(D, kPrefillScoreTokens)};
  }
  SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(ScoreWgmmaKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                 int(ScoreWgmmaSmemBytes(D))));
  return PrefillScorer{nullptr, ScoreWgmmaKernel<D>, D, kWgTokens, kWgThreads, ScoreWgmmaSmemBytes(D)};
}

// The first `entries` compressed keys [entries, Hk, dim] as a tensor map whose boxes are kWgKeys
// entries x 64 values of one KV group. No entries: a map that no load uses.
absl::StatusOr<CUtensorMap> KeyTensorMap(const Bf16* keys, int64_t entries, int Hk, int dim) {
  if (entries <= 0) return CUtensorMap{};
  return Bf16TensorMap<3>(keys, {cuuint64_t(dim), cuuint64_t(Hk), cuuint64_t(entries)},
                          {cuuint64_t(dim) * sizeof(Bf16), cuuint64_t(Hk) * dim * sizeof(Bf16)}, {64, 1, kWgKeys});
}

// A layer's K (or V) rows in the paged cache [page, token, Hk, dim] as a tensor map whose boxes
// are kSharedKeys tokens x 64 values of one head.
absl::StatusOr<CUtensorMap> KvTensorMap(const Bf16* rows, const SparseCacheView& cache, int Hk, int dim) {
  if (cache.page_end <= 0) return absl::InvalidArgumentError("the sparse cache view names no pages");
  return Bf16TensorMap<4>(
      rows, {cuuint64_t(dim), cuuint64_t(Hk), cuuint64_t(kKvPageTokens), cuuint64_t(cache.page_end)},
      {cuuint64_t(dim) * sizeof(Bf16), cuuint64_t(Hk) * dim * sizeof(Bf16), cuuint64_t(cache.page_elems) * sizeof(Bf16)},
      {64, 1, kSharedKeys, 1});
}

absl::Status LaunchPrefillScores(const PrefillScorer& scorer, const ScoreParams& p, cudaStream_t stream) {
  const int64_t blocks = (p.first + p.T + scorer.tokens - 1) / scorer.tokens - p.first / scorer.tokens;
  const dim3 grid(unsigned(blocks), p.Hk);
  if (scorer.kernel) {
    scorer.kernel<<<grid, scorer.threads, scorer.smem, stream>>>(p);
  } else {
    // The entries that the launch's last query block reads (ScoreWgmmaKernel): k2 up to its
    // last token, k1 up to its last candidate block.
    const int64_t end = p.first + p.T;
    const int64_t k2_entries = end >= 128 ? (end - 128) / 64 + 1 : 0;
    const int64_t k1_entries = 4 * ((end - 1) / kBlock - p.cand.window);
    SALA_ASSIGN_OR_RETURN(const CUtensorMap k2_map, KeyTensorMap(p.k2, k2_entries, p.Hk, scorer.dim));
    SALA_ASSIGN_OR_RETURN(const CUtensorMap k1_map, KeyTensorMap(p.k1, k1_entries, p.Hk, scorer.dim));
    scorer.wgmma_kernel<<<grid, scorer.threads, scorer.smem, stream>>>(p, k2_map, k1_map);
  }
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

absl::Status LaunchTopK(const TopKParams& p, cudaStream_t stream) {
  const int64_t warps = p.T * p.Hk;
  const unsigned grid = unsigned((warps + kTopKWarps - 1) / kTopKWarps);
  if (p.ncap <= kTopKMaxCandidates / 2) TopKKernel<1><<<grid, kTopKWarps * 32, 0, stream>>>(p);
  else if (p.ncap <= kTopKMaxCandidates) TopKKernel<2><<<grid, kTopKWarps * 32, 0, stream>>>(p);
  else return absl::ResourceExhaustedError("context too long for sparse block selection (above 2M tokens)");
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

// Blocks per ChosenBlocksKernel launch: a KV group's K/V of that many blocks fills three
// quarters of L2. A launch's thread blocks run through one group's rows, then the other's. Each
// launch also reads and writes the rows' carried state (f16), so ranges should not be small;
// but a range of all of L2 thrashes it (`ncu` at 128K: 66% L2 hits in the full range's launch,
// 95% in the next). One layer's last chunk (H100, same call), three quarters against all of L2:
// 5.57-5.59 against 5.74-5.80 ms at 256K, 7.11-7.27 against 7.14-7.28 at 1M, the same at 128K;
// half of L2: 7.61-7.87 at 1M.
absl::StatusOr<int64_t> ChosenRangeBlocks(int dim) {
  int device = 0, l2_bytes = 0;
  SALA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  SALA_CUDA_RETURN_IF_ERROR(cudaDeviceGetAttribute(&l2_bytes, cudaDevAttrL2CacheSize, device));
  return std::max<int64_t>(1, int64_t(l2_bytes) * 3 / 4 / (2 * kBlock * dim * int64_t(sizeof(Bf16))));
}

template <int D>
absl::Status LaunchAttention(AttnParams p, cudaStream_t stream) {
  // Thread blocks of `rows` aligned positions, from the one holding p.first.
  auto blocks_of = [&](int64_t rows) { return unsigned((p.first + p.T - 1) / rows - p.first / rows + 1); };
  SALA_ASSIGN_OR_RETURN(const bool hopper, HasWgmma());
  if (D == kSharedWgDim && hopper) {
    SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(SharedBlocksWgmmaKernel, cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                   int(kSharedWgBytes)));
    SALA_ASSIGN_OR_RETURN(const CUtensorMap k_map, KvTensorMap(p.cache.k, p.cache, p.Hk, D));
    SALA_ASSIGN_OR_RETURN(const CUtensorMap v_map, KvTensorMap(p.cache.v, p.cache, p.Hk, D));
    SharedBlocksWgmmaKernel<<<dim3(blocks_of(kSharedWgRows), p.Hk), kSharedWgThreads, kSharedWgBytes, stream>>>(
        p, k_map, v_map);
  } else {
    const size_t shared_smem = size_t(kSharedStages) * 2 * kSharedKeys * D * sizeof(Bf16);
    SALA_CUDA_RETURN_IF_ERROR(cudaFuncSetAttribute(SharedBlocksKernel<D>,
                                                   cudaFuncAttributeMaxDynamicSharedMemorySize, int(shared_smem)));
    SharedBlocksKernel<D><<<dim3(blocks_of(kSharedRows), p.Hk), kSharedRows * 32, shared_smem, stream>>>(p);
  }
  SALA_CUDA_CHECK_LAUNCH();
  if (p.blocks == nullptr) return absl::OkStatus();
  // Chosen blocks lie before b_q - window for the chunk's last query block.
  const int64_t end_block = std::max<int64_t>(1, (p.first + p.T - 1) / kBlock - p.cand.window);
  SALA_ASSIGN_OR_RETURN(const int64_t range, ChosenRangeBlocks(D));
  const size_t smem = ChosenStageBytes(D) + size_t(kAttnWarps) * p.cand.keep * sizeof(int64_t);
  SALA_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(ChosenBlocksKernel<D>, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
  for (int64_t lo = 0; lo < end_block; lo += range) {
    p.block_lo = lo;
    p.block_hi = lo + range;
    p.last = lo + range >= end_block;
    ChosenBlocksKernel<D><<<dim3(unsigned((p.T + kAttnWarps - 1) / kAttnWarps), p.Hk), kAttnWarps * 32, smem, stream>>>(p);
    SALA_CUDA_CHECK_LAUNCH();
  }
  return absl::OkStatus();
}

// Rows of stage-1 scores per launch, so that the score buffer stays near 256 MiB.
constexpr size_t kScoreBudgetBytes = size_t(256) << 20;

// Prefill rows that one wave of stage-1 thread blocks covers (every SM full, all KV groups).
absl::StatusOr<int64_t> ScoreRowsPerWave(const PrefillScorer& scorer, int kv_heads) {
  int per_sm = 0;
  SALA_CUDA_RETURN_IF_ERROR(
      cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, scorer.Function(), scorer.threads, scorer.smem));
  SALA_ASSIGN_OR_RETURN(const int sms, MultiprocessorCount());
  return std::max<int64_t>(1, int64_t(sms) * per_sm / kv_heads) * scorer.tokens;
}

}  // namespace

absl::Status SelectSparseBlocks(const Bf16* q, int64_t first, int64_t T, const SparseCacheView& cache,
                                const SparseShape& shape, int* blocks, int* counts, SparseScratch& scratch,
                                cudaStream_t stream) {
  SALA_RETURN_IF_ERROR(CheckShape(shape));
  if (T == 0) return absl::OkStatus();
  const Candidates cand = MakeCandidates(shape);
  const int64_t last_bq = (first + T - 1) / kBlock;
  const int64_t ncap = ScoreRowLength(cand, last_bq);
  // Launches of whole waves where the budget allows: a stage-1 block scans the whole context, so
  // a launch that leaves SMs idle in its last wave (say 1.3 waves of blocks) costs as much as a
  // full one. (Before, 8192 rows at ~750K context went as 3 x 2720 + 32 rows: 7 waves for 4.)
  SALA_ASSIGN_OR_RETURN(const PrefillScorer scorer, shape.dim == 128 ? PrefillScorerFor<128>() : PrefillScorerFor<64>());
  const int64_t budget_rows = std::max<int64_t>(
      scorer.tokens,
      int64_t(kScoreBudgetBytes / (size_t(shape.kv_heads) * ncap * sizeof(__half))) / scorer.tokens * scorer.tokens);
  SALA_ASSIGN_OR_RETURN(const int64_t wave_rows, ScoreRowsPerWave(scorer, shape.kv_heads));
  const int64_t rows_per = budget_rows >= wave_rows ? budget_rows / wave_rows * wave_rows : budget_rows;
  SALA_RETURN_IF_ERROR(scratch.scores.Reserve(size_t(std::min(T, rows_per)) * shape.kv_heads * ncap));
  const int G = shape.heads / shape.kv_heads;
  const float scale_log2 = kLog2e / std::sqrt(float(shape.dim));
  for (int64_t s0 = 0; s0 < T; s0 += rows_per) {
    const int64_t n = std::min(rows_per, T - s0);
    const ScoreParams sp{nullptr, q + s0 * shape.heads * shape.dim, first + s0, n, cache.k1, cache.k2, nullptr, nullptr,
                         shape.heads, shape.kv_heads, G, cand, scale_log2, scratch.scores.get(), ncap, 1};
    SALA_RETURN_IF_ERROR(LaunchPrefillScores(scorer, sp, stream));
    SALA_RETURN_IF_ERROR(SelectTopBlocks(scratch.scores.get(), ncap, first + s0, n, shape,
                                         blocks + s0 * shape.kv_heads * shape.selected_blocks,
                                         counts + s0 * shape.kv_heads, stream));
  }
  return absl::OkStatus();
}

absl::Status SelectTopBlocks(const __half* scores, int64_t ncap, int64_t first, int64_t T, const SparseShape& shape,
                             int* blocks, int* counts, cudaStream_t stream) {
  SALA_RETURN_IF_ERROR(CheckShape(shape));
  if (T == 0) return absl::OkStatus();
  const Candidates cand = MakeCandidates(shape);
  if (first < 0 || ncap % 8 != 0 || ncap < cand.Count((first + T - 1) / kBlock))
    return absl::InvalidArgumentError("block scores need rows of a multiple of 8 holding every candidate");
  return LaunchTopK({scores, first, T, ncap, nullptr, shape.kv_heads, shape.selected_blocks, cand, blocks, counts},
                    stream);
}

absl::Status SelectSparseBlocksRows(const float* q, int rows, const SparseCacheView* views, const int64_t* positions,
                                    int64_t max_position, const SparseShape& shape, int* blocks, int* counts,
                                    SparseScratch& scratch, cudaStream_t stream) {
  SALA_RETURN_IF_ERROR(CheckShape(shape));
  if (rows == 0) return absl::OkStatus();
  const Candidates cand = MakeCandidates(shape);
  const int64_t ncap = ScoreRowLength(cand, max_position / kBlock);
  SALA_RETURN_IF_ERROR(scratch.scores.Reserve(size_t(rows) * shape.kv_heads * ncap));
  // Few rows: split each row's k1 tiles (and, in a launch before, its k2 tiles) over several
  // thread blocks to fill the GPU, at least two k1 tiles each.
  SALA_ASSIGN_OR_RETURN(const int sms, MultiprocessorCount());
  const int64_t max_tiles = 4 * ncap / kKeyTile + 1;
  const int splits = int(std::clamp<int64_t>(std::min<int64_t>(2 * sms / (int64_t(rows) * shape.kv_heads), max_tiles / 2),
                                             1, kMaxScoreSplits));
  SALA_RETURN_IF_ERROR(scratch.lse.Reserve(size_t(rows) * shape.kv_heads * splits * 32));
  ScoreParams sp{q, nullptr, 0, rows, nullptr, nullptr, views, positions, shape.heads, shape.kv_heads,
                 shape.heads / shape.kv_heads, cand, kLog2e / std::sqrt(float(shape.dim)), scratch.scores.get(),
                 ncap, splits, scratch.lse.get(), 0};
  for (sp.phase = 0; sp.phase < 2; ++sp.phase)
    SALA_RETURN_IF_ERROR(shape.dim == 128 ? LaunchDecodeScores<128>(sp, stream) : LaunchDecodeScores<64>(sp, stream));
  return LaunchTopK({scratch.scores.get(), 0, rows, ncap, positions, shape.kv_heads, shape.selected_blocks, cand,
                     blocks, counts},
                    stream);
}

absl::Status BlockSparseAttention(const Bf16* q, int64_t first, int64_t T, const SparseCacheView& cache,
                                  const SparseShape& shape, const int* blocks, const Bf16* gate, Bf16* o,
                                  SparseScratch& scratch, cudaStream_t stream) {
  SALA_RETURN_IF_ERROR(CheckShape(shape));
  if (T == 0) return absl::OkStatus();
  if (blocks) {
    SALA_RETURN_IF_ERROR(scratch.running.Reserve(size_t(T) * shape.heads * 2));
    SALA_RETURN_IF_ERROR(scratch.carry.Reserve(size_t(T) * shape.heads * shape.dim));
  }
  AttnParams p{q, first, T, cache, shape.heads, shape.kv_heads, shape.heads / shape.kv_heads,
               kLog2e / std::sqrt(float(shape.dim)), blocks, shape.selected_blocks, MakeCandidates(shape), o, gate,
               blocks ? scratch.carry.get() : nullptr, blocks ? scratch.running.get() : nullptr, 0, 0, true};
  return shape.dim == 128 ? LaunchAttention<128>(p, stream) : LaunchAttention<64>(p, stream);
}

}  // namespace sala::cuda

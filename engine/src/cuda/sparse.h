// The sparse (InfLLM-V2) layers' attention on the GPU (MODEL_SPEC §4): compressed keys, stage-1
// block scores with the k2 log-sum-exp, forced init/local blocks, top-k, and softmax attention
// over the chosen 64-token blocks; or dense causal attention.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "cuda_common.h"
#include "kv_pool.h"

namespace sala::cuda {

struct SparseShape {
  int heads, kv_heads, dim;
  int block, kernel, stride;  // k1: kernel/stride; k2: 4x both
  int init_blocks, window_blocks, selected_blocks;
};

// One sequence's cache of one sparse layer: K/V rows in pages of the KV pool (kv_pool.h), the
// compressed keys contiguous.
struct SparseCacheView {
  __nv_bfloat16* k;    // the layer's K rows of page 0: page p's start p * page_elems further on
  __nv_bfloat16* v;    // the same for V
  const int* pages;    // the sequence's page table: token t lies in page pages[t / kKvPageTokens]
  int64_t page_elems;  // distance between pages
  __nv_bfloat16* k1;  // [n1, kv_heads, dim]
  __nv_bfloat16* k2;
  int page_end;  // every page id in the table is below this (the extent of TMA maps over k and v)
};

#ifdef __CUDACC__
// Where token t's row (of `row` elements) starts, from view.k or view.v.
__device__ __forceinline__ int64_t KvRowOffset(const SparseCacheView& c, int64_t t, int row) {
  return int64_t(c.pages[t / kKvPageTokens]) * c.page_elems + (t % kKvPageTokens) * row;
}
#endif

// Device buffers the attention launches reuse (grown as needed; one per caller).
struct SparseScratch {
  DeviceBuffer<float> partial;  // split-K partial softmax states
  DeviceBuffer<__half> scores;  // stage-1 block scores of a batch of rows
  DeviceBuffer<float> lse;     // decode stage 1: the k2 splits' partial log-sum-exps
  DeviceBuffer<float> running;  // prefill stage 2: rows' softmax max and sum between launches
  DeviceBuffer<__half> carry;   // prefill stage 2: rows' normalised outputs between launches
  DeviceBuffer<int> blocks, counts;
};

// Prefill: writes rows [first, first + T) of the cache from fp32 k, v [T, kv_heads, dim] as bf16.
absl::Status StoreRows(const float* k, const float* v, int64_t first, int64_t T, const SparseCacheView& cache,
                       int kv_heads, int dim, cudaStream_t stream);

// Writes compressed entries [from, to) of window `kernel` and stride `stride` from the cache's keys
// (means taken in fp32, stored as bf16).
absl::Status CompressKeys(const SparseCacheView& cache, int kv_heads, int dim, int64_t from, int64_t to, int kernel,
                          int stride, __nv_bfloat16* out, cudaStream_t stream);

// Decode: appends row r's key and value (fp32 k, v [rows, kv_heads, dim]) to caches[r] at
// position positions[r] as bf16, and writes the k1 and k2 entries the new token completes (as
// CompressKeys would). `caches` and `positions` are device arrays; every cache has room.
absl::Status AppendRows(const float* k, const float* v, int rows, const SparseCacheView* caches,
                        const int64_t* positions, const SparseShape& shape, cudaStream_t stream);

// Prefill (the rows at absolute positions [first, first + T) of one sequence, already in the
// cache; q [T, heads, dim] bf16, the MMAs' operand type) on tensor cores, in two stages. Needs
// block 64, kernel 32, stride 16, head_dim 64 or 128 and a local window of at least one block.
// Stage 1: the blocks each (row, KV group) attends, ascending:
// blocks [T, kv_heads, selected_blocks] (device), counts [T, kv_heads] (device).
absl::Status SelectSparseBlocks(const __nv_bfloat16* q, int64_t first, int64_t T, const SparseCacheView& cache,
                                const SparseShape& shape, int* blocks, int* counts, SparseScratch& scratch,
                                cudaStream_t stream);

// Stage 1 for a decode step: row r is the one query of sequence r at positions[r] of views[r]
// (device arrays); lists as above, row by row. Dense rows get every block up to theirs.
absl::Status SelectSparseBlocksRows(const float* q, int rows, const SparseCacheView* views, const int64_t* positions,
                                    int64_t max_position, const SparseShape& shape, int* blocks, int* counts,
                                    SparseScratch& scratch, cudaStream_t stream);

// Stage 1's selection alone, from block scores as stage 1 leaves them: scores [T, kv_heads,
// ncap] (device, f16, non-negative, larger better; ncap a multiple of 8 and at least the last
// row's candidate count), candidate c of a row being block init_blocks + c, for rows at
// positions [first, first + T). Lists as SelectSparseBlocks writes them; among equal scores the
// lower block goes first.
absl::Status SelectTopBlocks(const __half* scores, int64_t ncap, int64_t first, int64_t T, const SparseShape& shape,
                             int* blocks, int* counts, cudaStream_t stream);

// Stage 2 of the prefill path: softmax attention over the blocks SelectSparseBlocks listed (the
// lists' layout, not their counts, tells the init and local blocks from the chosen ones), or
// (blocks null) over every block up to each row's (dense causal attention). The output o [T,
// heads, dim] is bf16, times sigmoid(gate) where a gate [T, heads, dim] is given: the output
// projection's input.
absl::Status BlockSparseAttention(const __nv_bfloat16* q, int64_t first, int64_t T, const SparseCacheView& cache,
                                  const SparseShape& shape, const int* blocks, const __nv_bfloat16* gate,
                                  __nv_bfloat16* o, SparseScratch& scratch, cudaStream_t stream);

// Decode: one row for each of `rows` sequences in a single launch, fp32: row r reads caches[r]
// at position positions[r]; sparse rows (sparse_rows[r] != 0) attend the blocks stage 1 chose
// (blocks, counts as SelectSparseBlocksRows writes them), dense rows every block. All arrays
// are on the device.
absl::Status SparseAttentionRows(const float* q, int rows, const SparseCacheView* caches, const int64_t* positions,
                                 const unsigned char* sparse_rows, const int* blocks, const int* counts,
                                 const SparseShape& shape, float* o, SparseScratch& scratch, cudaStream_t stream);

}  // namespace sala::cuda

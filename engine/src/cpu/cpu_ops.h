// fp32 reference operations of the CPU backend. Readable first: these are the oracle that
// every GPU kernel is tested against. Layouts are row-major; weights are [out, in] (y = x Wᵀ).
#pragma once

#include <cstdint>
#include <span>
#include <vector>

#include "sala/config.h"
#include "sala/sequence_state.h"

namespace sala::cpu {

// y[T, out] = x[T, in] · w[out, in]ᵀ
void Gemm(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, float* y);

// Each row of `width` values: y = x * rsqrt(mean(x²) + eps) * weight. In place allowed.
void RmsNorm(const float* x, int64_t rows, int64_t width, const float* weight, double eps, float* y);

// NeoX "rotate half" rotary embedding on [rows, heads, dim], row r at position pos0 + r.
void Rope(float* x, int64_t rows, int heads, int dim, int64_t pos0, double theta);

float Sigmoid(float x);
float Silu(float x);

// Simple-GLA over one sequence (MODEL_SPEC §3). q [T, H, D]; k, v [T, Hkv, D]; state
// [H, D, D] updated in place; o [T, H, D]. `slopes` gives g_h = -slope_h.
struct LinearAttentionShape {
  int heads, kv_heads, dim;
  double scale;
  const std::vector<double>* slopes;
};
// Chunked form (intra-chunk causal part + inter-chunk state), chunk of `chunk` positions.
void LinearAttentionChunked(const LinearAttentionShape& shape, const float* q, const float* k,
                            const float* v, int64_t T, int chunk, float* state, float* o);
// One-token recurrent form.
void LinearAttentionStep(const LinearAttentionShape& shape, const float* q, const float* k,
                         const float* v, float* state, float* o);

// Attention of the sparse (InfLLM-V2) layer for the rows [first, first + T) of `cache`
// (whose K/V/k1/k2 already include them). q [T, H, hd], o [T, H, hd]. `sparse` picks the
// block-sparse path for every row, else ordinary causal attention.
void SparseLayerAttention(const ModelConfig& config, const SparseLayerCache& cache,
                          const float* q, int64_t first, int64_t T, bool sparse, float* o);

// The blocks one query selects (MODEL_SPEC §4 "Block choice"), ascending. `q` holds the
// group's heads [group, hd] for the query at absolute position `pos`; exposed for tests
// and as the oracle of the GPU stage-1 kernel. `scores` (optional) receives the block scores.
std::vector<int64_t> SelectBlocks(const ModelConfig& config, const SparseLayerCache& cache,
                                  const float* q, int kv_head, int64_t pos,
                                  std::vector<float>* scores = nullptr);

// The blocks a query attends given its block scores (forced blocks +inf, blocks that are not
// candidates -inf): the `selected` best, the lower block first among equal scores, ascending.
// The oracle of the GPU's top-k.
std::vector<int64_t> ChooseBlocks(std::span<const float> score, int selected);

// Softmax attention of one query's group heads q [group, hd] at position `pos` over the keys
// of `blocks` up to `pos`; o [group, hd]. The oracle of the GPU stage-2 kernel.
void AttendBlocks(const ModelConfig& config, const SparseLayerCache& cache, const float* q, int kv_head,
                  int64_t pos, std::span<const int64_t> blocks, float* o);

}  // namespace sala::cpu

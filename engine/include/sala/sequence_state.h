// Everything a sequence carries between forward passes: the linear layers' recurrent states,
// the sparse layers' KV cache with its compressed keys, and the token count.
#pragma once

#include <cstdint>
#include <vector>

#include "sala/config.h"

namespace sala {

struct SparseLayerCache {
  // Row-major [tokens, num_kv_heads, sparse_head_dim]; k1/k2 the same with one row per
  // compressed entry (MODEL_SPEC §4).
  std::vector<float> k, v, k1, k2;
};

struct LinearLayerState {
  std::vector<float> s;  // [num_heads, head_dim (key), head_dim (value)]
};

struct SequenceState {
  int64_t tokens = 0;
  std::vector<SparseLayerCache> sparse;  // indexed by ModelConfig::slot_of(layer)
  std::vector<LinearLayerState> linear;

  // Empty state shaped for `config`.
  static SequenceState Empty(const ModelConfig& config);
  // Number of complete k1/k2 entries after `tokens` tokens.
  static int64_t NumK1(const SparseConfig& s, int64_t tokens);
  static int64_t NumK2(const SparseConfig& s, int64_t tokens);
  // Host bytes used, for memory accounting.
  size_t bytes() const;
};

// Appends compressed keys that became complete once `cache.k` holds `tokens` rows.
void UpdateCompressedKeys(const ModelConfig& config, int64_t tokens, SparseLayerCache& cache);

}  // namespace sala

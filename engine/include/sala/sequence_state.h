// Everything a sequence carries between forward passes: the linear layers' recurrent states,
// the sparse layers' KV cache with its compressed keys, and the token count.
#pragma once

#include <cstdint>
#include <memory>
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

// A backend's own copy of a sequence's state in device memory (the CUDA backend's). When
// present it is the state; the host vectors above are then empty.
class DeviceState {
 public:
  virtual ~DeviceState() = default;
  virtual std::unique_ptr<DeviceState> Clone() const = 0;
  virtual size_t bytes() const = 0;
};

struct SequenceState {
  int64_t tokens = 0;
  std::vector<SparseLayerCache> sparse;  // indexed by ModelConfig::slot_of(layer)
  std::vector<LinearLayerState> linear;
  std::unique_ptr<DeviceState> device;

  SequenceState() = default;
  SequenceState(SequenceState&&) = default;
  SequenceState& operator=(SequenceState&&) = default;
  // Copies are deep, device state included.
  SequenceState(const SequenceState& other);
  SequenceState& operator=(const SequenceState& other);

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

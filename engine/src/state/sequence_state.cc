#include "sala/sequence_state.h"

namespace sala {

SequenceState::SequenceState(const SequenceState& other)
    : tokens(other.tokens), sparse(other.sparse), linear(other.linear),
      device(other.device ? other.device->Clone() : nullptr) {}

SequenceState& SequenceState::operator=(const SequenceState& other) {
  if (this != &other) *this = SequenceState(other);
  return *this;
}

SequenceState SequenceState::Empty(const ModelConfig& config) {
  SequenceState st;
  st.sparse.resize(config.num_sparse_layers());
  st.linear.resize(config.num_linear_layers());
  const size_t n = size_t(config.num_heads) * config.head_dim * config.head_dim;
  for (auto& l : st.linear) l.s.assign(n, 0.0f);
  return st;
}

int64_t SequenceState::NumK1(const SparseConfig& s, int64_t tokens) {
  return tokens < s.kernel_size ? 0 : (tokens - s.kernel_size) / s.kernel_stride + 1;
}

int64_t SequenceState::NumK2(const SparseConfig& s, int64_t tokens) {
  return tokens < s.k2_kernel() ? 0 : (tokens - s.k2_kernel()) / s.k2_stride() + 1;
}

size_t SequenceState::bytes() const {
  size_t b = 0;
  for (const auto& c : sparse) b += (c.k.size() + c.v.size() + c.k1.size() + c.k2.size()) * 4;
  for (const auto& l : linear) b += l.s.size() * 4;
  if (device) b += device->bytes();
  return b;
}

void UpdateCompressedKeys(const ModelConfig& config, int64_t tokens, SparseLayerCache& cache) {
  const int64_t row = int64_t(config.num_kv_heads) * config.sparse_head_dim();
  auto extend = [&](std::vector<float>& out, int64_t want, int kernel, int stride) {
    for (int64_t j = int64_t(out.size()) / row; j < want; ++j) {
      const size_t base = out.size();
      out.resize(base + row, 0.0f);
      // Mean of `kernel` raw key rows starting at stride*j, per KV head and channel.
      for (int64_t t = stride * j; t < stride * j + kernel; ++t)
        for (int64_t c = 0; c < row; ++c) out[base + c] += cache.k[t * row + c];
      for (int64_t c = 0; c < row; ++c) out[base + c] /= float(kernel);
    }
  };
  const SparseConfig& s = config.sparse;
  extend(cache.k1, SequenceState::NumK1(s, tokens), s.kernel_size, s.kernel_stride);
  extend(cache.k2, SequenceState::NumK2(s, tokens), s.k2_kernel(), s.k2_stride());
}

}  // namespace sala

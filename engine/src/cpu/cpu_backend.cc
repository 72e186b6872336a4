// The CPU backend: MODEL_SPEC §2–4 in fp32, one pass over a set of row segments (a prefill
// chunk is one segment; a decode step is one single-row segment per sequence).
#include <cmath>

#include "absl/strings/str_cat.h"
#include "cpu_ops.h"
#include "sala/backend.h"
#include "sala/safetensors.h"
#include "sala/status_macros.h"
#include "sala/weights.h"

namespace sala {
namespace {

// Inner chunk of the linear layers' chunked form (independent of the prefill chunk size).
constexpr int kLinearChunk = 64;

struct LayerWeights {
  std::vector<float> input_norm, post_norm;
  std::vector<float> q, k, v, o, gate;  // gate: o_gate (sparse) or z_proj (linear)
  std::vector<float> q_norm, k_norm, o_norm;
  std::vector<float> mlp_gate, mlp_up, mlp_down;
};

struct Segment {
  SequenceState* state;
  int64_t row0;    // first row in the pass
  int64_t rows;
  bool sparse;
};

class CpuBackend final : public Backend {
 public:
  CpuBackend(const ModelConfig& config) : config_(config), slopes_(LinearDecaySlopes(config.num_heads)) {}

  absl::Status LoadWeights(const Checkpoint& ckpt) {
    auto get = [&](const std::string& name, std::vector<float>& out) {
      const TensorView& t = ckpt.tensors().at(name);
      out.resize(t.numel());
      ConvertToF32(t, out.data());
    };
    get("model.embed_tokens.weight", embed_);
    get("model.norm.weight", final_norm_);
    if (config_.tie_word_embeddings) lm_head_ = embed_;
    else get("lm_head.weight", lm_head_);
    layers_.resize(config_.num_layers);
    for (int i = 0; i < config_.num_layers; ++i) {
      LayerWeights& w = layers_[i];
      auto n = [i](const char* s) { return LayerTensorName(i, s); };
      get(n("input_layernorm.weight"), w.input_norm);
      get(n("post_attention_layernorm.weight"), w.post_norm);
      get(n("self_attn.q_proj.weight"), w.q);
      get(n("self_attn.k_proj.weight"), w.k);
      get(n("self_attn.v_proj.weight"), w.v);
      get(n("self_attn.o_proj.weight"), w.o);
      get(n("mlp.gate_proj.weight"), w.mlp_gate);
      get(n("mlp.up_proj.weight"), w.mlp_up);
      get(n("mlp.down_proj.weight"), w.mlp_down);
      if (config_.layers[i] == LayerKind::kSparse) {
        if (config_.attn_use_output_gate) get(n("self_attn.o_gate.weight"), w.gate);
      } else {
        if (config_.use_output_gate) get(n("self_attn.z_proj.weight"), w.gate);
        if (config_.qk_norm) {
          get(n("self_attn.q_norm.weight"), w.q_norm);
          get(n("self_attn.k_norm.weight"), w.k_norm);
        }
        if (config_.use_output_norm) get(n("self_attn.o_norm.weight"), w.o_norm);
      }
    }
    return absl::OkStatus();
  }

  std::string name() const override { return "cpu"; }

  absl::StatusOr<std::vector<float>> Forward(SequenceState& state, std::span<const int> tokens,
                                             bool sparse) override {
    std::vector<Segment> segs{{&state, 0, int64_t(tokens.size()), sparse}};
    auto logits = Run(segs, tokens);
    return std::move(logits[0]);
  }

  absl::StatusOr<std::vector<std::vector<float>>> DecodeStep(std::span<SequenceState* const> states,
                                                             std::span<const int> tokens,
                                                             std::span<const bool> sparse) override {
    if (states.size() != tokens.size() || states.size() != sparse.size())
      return absl::InvalidArgumentError("DecodeStep: batch sizes differ");
    std::vector<Segment> segs;
    for (size_t i = 0; i < states.size(); ++i) segs.push_back({states[i], int64_t(i), 1, sparse[i]});
    return Run(segs, tokens);
  }

 private:
  // One pass over all segments' rows; returns the last row's logits of each segment.
  std::vector<std::vector<float>> Run(std::span<Segment> segs, std::span<const int> tokens) {
    const int64_t R = int64_t(tokens.size()), d = config_.hidden_size;
    const float r = float(config_.residual_scale());
    std::vector<float> h(R * d), x(R * d), a(R * d);
    for (int64_t t = 0; t < R; ++t)
      for (int64_t c = 0; c < d; ++c) h[t * d + c] = embed_[int64_t(tokens[t]) * d + c] * float(config_.scale_emb);
    for (int i = 0; i < config_.num_layers; ++i) {
      const LayerWeights& w = layers_[i];
      cpu::RmsNorm(h.data(), R, d, w.input_norm.data(), config_.rms_norm_eps, x.data());
      if (config_.layers[i] == LayerKind::kSparse) SparseMixer(i, segs, x, a);
      else LinearMixer(i, segs, x, a);
      for (int64_t e = 0; e < R * d; ++e) h[e] += r * a[e];
      cpu::RmsNorm(h.data(), R, d, w.post_norm.data(), config_.rms_norm_eps, x.data());
      Mlp(w, x, R, a);
      for (int64_t e = 0; e < R * d; ++e) h[e] += r * a[e];
    }
    for (Segment& s : segs) s.state->tokens += s.rows;
    std::vector<std::vector<float>> logits;
    std::vector<float> last(d);
    const float inv_div = float(1.0 / config_.logit_divisor());
    for (const Segment& s : segs) {
      cpu::RmsNorm(h.data() + (s.row0 + s.rows - 1) * d, 1, d, final_norm_.data(), config_.rms_norm_eps, last.data());
      for (float& v : last) v *= inv_div;
      std::vector<float> out(config_.vocab_size);
      cpu::Gemm(last.data(), 1, d, lm_head_.data(), config_.vocab_size, out.data());
      logits.push_back(std::move(out));
    }
    return logits;
  }

  void Mlp(const LayerWeights& w, const std::vector<float>& x, int64_t R, std::vector<float>& y) {
    const int64_t d = config_.hidden_size, ff = config_.intermediate_size;
    std::vector<float> g(R * ff), u(R * ff);
    cpu::Gemm(x.data(), R, d, w.mlp_gate.data(), ff, g.data());
    cpu::Gemm(x.data(), R, d, w.mlp_up.data(), ff, u.data());
    for (int64_t e = 0; e < R * ff; ++e) g[e] = cpu::Silu(g[e]) * u[e];
    cpu::Gemm(g.data(), R, ff, w.mlp_down.data(), d, y.data());
  }

  void LinearMixer(int layer, std::span<Segment> segs, const std::vector<float>& x, std::vector<float>& y) {
    const LayerWeights& w = layers_[layer];
    const int64_t R = int64_t(x.size()) / config_.hidden_size, d = config_.hidden_size;
    const int H = config_.num_heads, Hk = config_.lightning_nkv, D = config_.head_dim;
    std::vector<float> q(R * H * D), k(R * Hk * D), v(R * Hk * D), o(R * H * D);
    cpu::Gemm(x.data(), R, d, w.q.data(), H * D, q.data());
    cpu::Gemm(x.data(), R, d, w.k.data(), Hk * D, k.data());
    cpu::Gemm(x.data(), R, d, w.v.data(), Hk * D, v.data());
    if (config_.qk_norm) {
      cpu::RmsNorm(q.data(), R * H, D, w.q_norm.data(), config_.rms_norm_eps, q.data());
      cpu::RmsNorm(k.data(), R * Hk, D, w.k_norm.data(), config_.rms_norm_eps, k.data());
    }
    const cpu::LinearAttentionShape shape{H, Hk, D, config_.linear_query_scale(), &slopes_};
    for (const Segment& s : segs) {
      float* qs = q.data() + s.row0 * H * D;
      float* ks = k.data() + s.row0 * Hk * D;
      const float* vs = v.data() + s.row0 * Hk * D;
      if (config_.lightning_use_rope) {
        cpu::Rope(qs, s.rows, H, D, s.state->tokens, config_.rope_theta);
        cpu::Rope(ks, s.rows, Hk, D, s.state->tokens, config_.rope_theta);
      }
      float* S = s.state->linear[config_.slot_of(layer)].s.data();
      float* os = o.data() + s.row0 * H * D;
      if (s.rows == 1) cpu::LinearAttentionStep(shape, qs, ks, vs, S, os);
      else cpu::LinearAttentionChunked(shape, qs, ks, vs, s.rows, kLinearChunk, S, os);
    }
    if (config_.use_output_norm)
      cpu::RmsNorm(o.data(), R, H * D, w.o_norm.data(), config_.rms_norm_eps, o.data());
    if (config_.use_output_gate) Gate(x, w.gate, R, H * D, o);
    cpu::Gemm(o.data(), R, H * D, w.o.data(), d, y.data());
  }

  void SparseMixer(int layer, std::span<Segment> segs, const std::vector<float>& x, std::vector<float>& y) {
    const LayerWeights& w = layers_[layer];
    const int64_t R = int64_t(x.size()) / config_.hidden_size, d = config_.hidden_size;
    const int H = config_.num_heads, Hk = config_.num_kv_heads, D = config_.sparse_head_dim();
    std::vector<float> q(R * H * D), k(R * Hk * D), v(R * Hk * D), o(R * H * D);
    cpu::Gemm(x.data(), R, d, w.q.data(), H * D, q.data());
    cpu::Gemm(x.data(), R, d, w.k.data(), Hk * D, k.data());
    cpu::Gemm(x.data(), R, d, w.v.data(), Hk * D, v.data());
    for (const Segment& s : segs) {
      SparseLayerCache& cache = s.state->sparse[config_.slot_of(layer)];
      const int64_t row = int64_t(Hk) * D;
      cache.k.insert(cache.k.end(), k.begin() + s.row0 * row, k.begin() + (s.row0 + s.rows) * row);
      cache.v.insert(cache.v.end(), v.begin() + s.row0 * row, v.begin() + (s.row0 + s.rows) * row);
      UpdateCompressedKeys(config_, s.state->tokens + s.rows, cache);
      cpu::SparseLayerAttention(config_, cache, q.data() + s.row0 * H * D, s.state->tokens, s.rows,
                                s.sparse, o.data() + s.row0 * H * D);
    }
    if (config_.attn_use_output_gate) Gate(x, w.gate, R, H * D, o);
    cpu::Gemm(o.data(), R, H * D, w.o.data(), d, y.data());
  }

  // o *= sigmoid(x · gateᵀ)
  void Gate(const std::vector<float>& x, const std::vector<float>& gate, int64_t R, int64_t width,
            std::vector<float>& o) {
    std::vector<float> z(R * width);
    cpu::Gemm(x.data(), R, config_.hidden_size, gate.data(), width, z.data());
    for (int64_t e = 0; e < R * width; ++e) o[e] *= cpu::Sigmoid(z[e]);
  }

  ModelConfig config_;
  std::vector<double> slopes_;
  std::vector<float> embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCpuBackend(const ModelConfig& config,
                                                        const Checkpoint& checkpoint) {
  SALA_RETURN_IF_ERROR(ValidateCheckpoint(config, checkpoint));
  auto backend = std::make_unique<CpuBackend>(config);
  SALA_RETURN_IF_ERROR(backend->LoadWeights(checkpoint));
  return backend;
}

}  // namespace sala

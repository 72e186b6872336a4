#include "sala/weights.h"

#include <set>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"

namespace sala {

std::string LayerTensorName(int layer, const std::string& suffix) {
  return absl::StrCat("model.layers.", layer, ".", suffix);
}

std::vector<TensorSpec> ExpectedTensors(const ModelConfig& c) {
  const int64_t d = c.hidden_size, ff = c.intermediate_size;
  std::vector<TensorSpec> t;
  t.push_back({"model.embed_tokens.weight", {c.vocab_size, d}});
  t.push_back({"model.norm.weight", {d}});
  if (!c.tie_word_embeddings) t.push_back({"lm_head.weight", {c.vocab_size, d}});
  for (int i = 0; i < c.num_layers; ++i) {
    auto n = [i](const char* s) { return LayerTensorName(i, s); };
    t.push_back({n("input_layernorm.weight"), {d}});
    t.push_back({n("post_attention_layernorm.weight"), {d}});
    t.push_back({n("mlp.gate_proj.weight"), {ff, d}});
    t.push_back({n("mlp.up_proj.weight"), {ff, d}});
    t.push_back({n("mlp.down_proj.weight"), {d, ff}});
    if (c.layers[i] == LayerKind::kSparse) {
      const int64_t hd = c.sparse_head_dim(), qd = c.num_heads * hd, kvd = c.num_kv_heads * hd;
      t.push_back({n("self_attn.q_proj.weight"), {qd, d}});
      t.push_back({n("self_attn.k_proj.weight"), {kvd, d}});
      t.push_back({n("self_attn.v_proj.weight"), {kvd, d}});
      t.push_back({n("self_attn.o_proj.weight"), {d, qd}});
      if (c.attn_use_output_gate) t.push_back({n("self_attn.o_gate.weight"), {qd, d}});
    } else {
      const int64_t hd = c.head_dim, qd = c.num_heads * hd, kvd = c.lightning_nkv * hd;
      t.push_back({n("self_attn.q_proj.weight"), {qd, d}});
      t.push_back({n("self_attn.k_proj.weight"), {kvd, d}});
      t.push_back({n("self_attn.v_proj.weight"), {kvd, d}});
      t.push_back({n("self_attn.o_proj.weight"), {d, qd}});
      if (c.use_output_gate) t.push_back({n("self_attn.z_proj.weight"), {qd, d}});
      if (c.qk_norm) {
        t.push_back({n("self_attn.q_norm.weight"), {hd}});
        t.push_back({n("self_attn.k_norm.weight"), {hd}});
      }
      if (c.use_output_norm) t.push_back({n("self_attn.o_norm.weight"), {qd}});
    }
  }
  return t;
}

absl::Status ValidateCheckpoint(const ModelConfig& config, const Checkpoint& checkpoint) {
  std::set<std::string> expected_names;
  int64_t total = 0;
  for (const TensorSpec& spec : ExpectedTensors(config)) {
    expected_names.insert(spec.name);
    auto it = checkpoint.tensors().find(spec.name);
    if (it == checkpoint.tensors().end())
      return absl::InvalidArgumentError(absl::StrCat("checkpoint is missing tensor '", spec.name, "'"));
    if (it->second.shape != spec.shape)
      return absl::InvalidArgumentError(absl::StrCat(
          "tensor '", spec.name, "' has shape [", absl::StrJoin(it->second.shape, ", "),
          "] but the config needs [", absl::StrJoin(spec.shape, ", "), "]"));
    total += it->second.numel();
  }
  for (const auto& [name, view] : checkpoint.tensors()) {
    // Rotary caches are derived buffers some exporters save; they carry no parameters.
    if (name.find("rotary_emb.inv_freq") != std::string::npos) continue;
    if (!expected_names.count(name))
      return absl::InvalidArgumentError(absl::StrCat("checkpoint has unexpected tensor '", name,
                                                     "' (config/checkpoint mismatch?)"));
  }
  if (total != config.parameter_count())
    return absl::InternalError(absl::StrCat("parameter count ", total, " differs from the config's ",
                                            config.parameter_count()));
  return absl::OkStatus();
}

}  // namespace sala

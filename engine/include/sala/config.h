// Model configuration: every config.json key of MODEL_SPEC §1 that the forward pass reads.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sala {

enum class LayerKind { kSparse, kLinear };  // "minicpm4" / "lightning-attn"

struct SparseConfig {
  int block_size = 64;
  int dense_len = 8192;
  int init_blocks = 1;
  int kernel_size = 32;    // k1 window; k2 uses 4x this
  int kernel_stride = 16;  // k1 stride; k2 uses 4x this
  int topk = 64;
  int window_size = 2048;
  bool use_nope = false;

  int k2_kernel() const { return 4 * kernel_size; }
  int k2_stride() const { return 4 * kernel_stride; }
  int window_blocks() const { return window_size / block_size; }
  // Blocks one query attends to: topk chosen + the local window (MODEL_SPEC §4).
  int selected_blocks() const { return topk + window_blocks(); }
};

struct ModelConfig {
  std::string model_type;
  int hidden_size = 0;
  int num_layers = 0;
  int num_heads = 0;     // query heads, all layers
  int num_kv_heads = 0;  // KV heads of the sparse layers
  int head_dim = 0;      // linear layers
  int intermediate_size = 0;
  int vocab_size = 0;
  double rms_norm_eps = 1e-6;
  double rope_theta = 10000.0;
  int64_t max_position_embeddings = 0;
  double scale_emb = 1.0;
  double scale_depth = 1.0;
  int dim_model_base = 0;
  bool tie_word_embeddings = false;
  std::vector<LayerKind> layers;
  int lightning_nkv = 0;
  std::string lightning_scale = "1/sqrt(d)";
  bool qk_norm = true;
  bool use_output_gate = true;
  bool use_output_norm = true;
  bool attn_use_rope = false;
  bool attn_use_output_gate = true;
  bool lightning_use_rope = true;
  SparseConfig sparse;
  int bos_token_id = 1;
  std::vector<int> eos_token_ids;
  int pad_token_id = 2;

  // Derived quantities.
  int sparse_head_dim() const { return hidden_size / num_heads; }
  int sparse_group() const { return num_heads / num_kv_heads; }
  int linear_group() const { return num_heads / lightning_nkv; }
  double residual_scale() const;       // scale_depth / sqrt(num_layers)
  double logit_divisor() const;        // hidden_size / dim_model_base
  double linear_query_scale() const;   // from lightning_scale
  int num_sparse_layers() const;
  int num_linear_layers() const;
  // Index of layer `layer` among the layers of its kind (its slot in a SequenceState).
  int slot_of(int layer) const;
  // A hash of everything that fixes the shape of a sequence state; transfers between
  // engines with different hashes are refused.
  uint64_t layout_hash() const;
  // The same, as 16 hex digits: how workers and the router exchange it.
  std::string layout_hash_hex() const;
  // Total parameter count implied by the config.
  int64_t parameter_count() const;
};

// Parses and validates a config.json text. Errors name the offending key.
absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text);
// Reads `<model_dir>/config.json`; also reads eos ids from generation_config.json when present.
absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir);
// The inverse of ParseModelConfig (used by sala-mkmodel).
std::string ModelConfigToJson(const ModelConfig& config);

// ALiBi-style slopes of MODEL_SPEC §3 for `num_heads` heads; the linear decay is g_h = -slope_h.
std::vector<double> LinearDecaySlopes(int num_heads);

}  // namespace sala

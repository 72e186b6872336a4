#include "sala/config.h"

#include <algorithm>
#include <cmath>
#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "sala/status_macros.h"

namespace sala {
namespace {

using nlohmann::json;

absl::Status KeyError(const std::string& key, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat("config.json: key '", key, "' ", what));
}

// Typed getters that never throw: a missing or mistyped key is an error naming it.
absl::StatusOr<int64_t> GetInt(const json& j, const std::string& key) {
  auto it = j.find(key);
  if (it == j.end()) return KeyError(key, "is missing");
  if (!it->is_number_integer()) return KeyError(key, "must be an integer");
  return it->get<int64_t>();
}

absl::StatusOr<int64_t> GetIntOr(const json& j, const std::string& key, int64_t fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  return GetInt(j, key);
}

absl::StatusOr<double> GetNumber(const json& j, const std::string& key) {
  auto it = j.find(key);
  if (it == j.end()) return KeyError(key, "is missing");
  if (!it->is_number()) return KeyError(key, "must be a number");
  return it->get<double>();
}

absl::StatusOr<double> GetNumberOr(const json& j, const std::string& key, double fallback) {
  if (!j.contains(key) || j[key].is_null()) return fallback;
  return GetNumber(j, key);
}

absl::StatusOr<bool> GetBoolOr(const json& j, const std::string& key, bool fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_boolean()) return KeyError(key, "must be true or false");
  return it->get<bool>();
}

absl::StatusOr<std::string> GetStringOr(const json& j, const std::string& key,
                                        const std::string& fallback) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return fallback;
  if (!it->is_string()) return KeyError(key, "must be a string");
  return it->get<std::string>();
}

// eos_token_id may be an integer or a list of integers.
absl::StatusOr<std::vector<int>> GetIdList(const json& j, const std::string& key) {
  auto it = j.find(key);
  if (it == j.end() || it->is_null()) return std::vector<int>{};
  if (it->is_number_integer()) return std::vector<int>{it->get<int>()};
  if (!it->is_array()) return KeyError(key, "must be an integer or a list of integers");
  std::vector<int> ids;
  for (const auto& e : *it) {
    if (!e.is_number_integer()) return KeyError(key, "must hold integers only");
    ids.push_back(e.get<int>());
  }
  return ids;
}

absl::Status RequirePositive(int64_t v, const std::string& key) {
  if (v <= 0) return KeyError(key, absl::StrCat("must be positive, got ", v));
  return absl::OkStatus();
}

absl::Status ParseSparseConfig(const json& root, SparseConfig* s) {
  auto it = root.find("sparse_config");
  if (it == root.end() || it->is_null()) return KeyError("sparse_config", "is missing");
  if (!it->is_object()) return KeyError("sparse_config", "must be an object");
  const json& j = *it;
  auto sub = [](const absl::Status& st) {
    return absl::InvalidArgumentError(absl::StrCat("sparse_config: ", st.message()));
  };
  struct IntField { const char* key; int* out; };
  for (IntField f : {IntField{"block_size", &s->block_size}, IntField{"dense_len", &s->dense_len},
                     IntField{"init_blocks", &s->init_blocks},
                     IntField{"kernel_size", &s->kernel_size},
                     IntField{"kernel_stride", &s->kernel_stride}, IntField{"topk", &s->topk},
                     IntField{"window_size", &s->window_size}}) {
    auto v = GetInt(j, f.key);
    if (!v.ok()) return sub(v.status());
    *f.out = static_cast<int>(*v);
  }
  auto nope = GetBoolOr(j, "use_nope", false);
  if (!nope.ok()) return sub(nope.status());
  s->use_nope = *nope;
  for (auto [v, key] : {std::pair{s->block_size, "block_size"}, {s->kernel_size, "kernel_size"},
                        {s->kernel_stride, "kernel_stride"}, {s->topk, "topk"}}) {
    if (v <= 0) return sub(KeyError(key, "must be positive"));
  }
  if (s->dense_len < 0 || s->init_blocks < 0 || s->window_size < 0)
    return sub(KeyError("dense_len/init_blocks/window_size", "must not be negative"));
  if (s->kernel_size % s->kernel_stride != 0)
    return sub(KeyError("kernel_size", "must be a multiple of kernel_stride"));
  if (s->block_size % s->kernel_stride != 0)
    return sub(KeyError("block_size", "must be a multiple of kernel_stride"));
  if (s->window_size % s->block_size != 0)
    return sub(KeyError("window_size", "must be a multiple of block_size"));
  return absl::OkStatus();
}

}  // namespace

double ModelConfig::residual_scale() const { return scale_depth / std::sqrt(double(num_layers)); }
double ModelConfig::logit_divisor() const {
  return dim_model_base > 0 ? double(hidden_size) / dim_model_base : 1.0;
}
double ModelConfig::linear_query_scale() const {
  if (lightning_scale == "1/sqrt(d)") return 1.0 / std::sqrt(double(head_dim));
  if (lightning_scale == "1/d") return 1.0 / head_dim;
  return 1.0;
}
int ModelConfig::num_sparse_layers() const {
  int n = 0;
  for (LayerKind k : layers) n += k == LayerKind::kSparse;
  return n;
}
int ModelConfig::num_linear_layers() const { return num_layers - num_sparse_layers(); }
int ModelConfig::slot_of(int layer) const {
  int n = 0;
  for (int i = 0; i < layer; ++i) n += layers[i] == layers[layer];
  return n;
}

std::string ModelConfig::layout_hash_hex() const { return absl::StrFormat("%016x", layout_hash()); }

uint64_t ModelConfig::layout_hash() const {
  std::string kinds;
  for (LayerKind k : layers) kinds += k == LayerKind::kSparse ? 'S' : 'L';
  const std::string canon = absl::StrCat(
      "sala-layout-v1;", kinds, ";h=", num_heads, ";kv=", num_kv_heads, ";hd=", head_dim,
      ";shd=", sparse_head_dim(), ";lkv=", lightning_nkv, ";bs=", sparse.block_size,
      ";ks=", sparse.kernel_size, ";st=", sparse.kernel_stride, ";d=", hidden_size);
  uint64_t h = 1469598103934665603ull;  // FNV-1a: short, fixed input
  for (unsigned char c : canon) h = (h ^ c) * 1099511628211ull;
  return h;
}

int64_t ModelConfig::parameter_count() const {
  const int64_t d = hidden_size, hd = head_dim, shd = sparse_head_dim();
  // Embedding, lm_head unless tied, final norm.
  int64_t n = int64_t(vocab_size) * d * (tie_word_embeddings ? 1 : 2) + d;
  for (LayerKind k : layers) {
    n += 2 * d + 3 * int64_t(intermediate_size) * d;  // norms + MLP
    if (k == LayerKind::kSparse) {
      n += 2 * int64_t(num_heads) * shd * d + 2 * int64_t(num_kv_heads) * shd * d;  // q, o, k, v
      if (attn_use_output_gate) n += int64_t(num_heads) * shd * d;
    } else {
      n += 2 * int64_t(num_heads) * hd * d + 2 * int64_t(lightning_nkv) * hd * d;
      if (use_output_gate) n += int64_t(num_heads) * hd * d;
      if (qk_norm) n += 2 * hd;
      if (use_output_norm) n += int64_t(num_heads) * hd;
    }
  }
  return n;
}

std::vector<double> LinearDecaySlopes(int num_heads) {
  auto power_of_two = [](int n) {
    const double start = std::pow(2.0, -std::pow(2.0, -(std::log2(double(n)) - 3)));
    std::vector<double> s(n);
    for (int i = 0; i < n; ++i) s[i] = std::pow(start, i + 1);
    return s;
  };
  if ((num_heads & (num_heads - 1)) == 0) return power_of_two(num_heads);
  int p = 1;
  while (p * 2 < num_heads) p *= 2;
  std::vector<double> s = power_of_two(p);
  std::vector<double> extra = power_of_two(2 * p);
  for (int i = 0; int(s.size()) < num_heads; i += 2) s.push_back(extra[i]);
  return s;
}

absl::StatusOr<ModelConfig> ParseModelConfig(const std::string& json_text) {
  json j = json::parse(json_text, nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return absl::InvalidArgumentError("config.json: not valid JSON");
  if (!j.is_object()) return absl::InvalidArgumentError("config.json: top level must be an object");
  ModelConfig c;
  SALA_ASSIGN_OR_RETURN(c.model_type, GetStringOr(j, "model_type", ""));
  if (c.model_type != "minicpm_sala")
    return KeyError("model_type", absl::StrCat("must be \"minicpm_sala\", got \"", c.model_type, "\""));
  struct IntField { const char* key; int* out; };
  for (IntField f : {IntField{"hidden_size", &c.hidden_size},
                     IntField{"num_hidden_layers", &c.num_layers},
                     IntField{"num_attention_heads", &c.num_heads},
                     IntField{"num_key_value_heads", &c.num_kv_heads},
                     IntField{"intermediate_size", &c.intermediate_size},
                     IntField{"vocab_size", &c.vocab_size}}) {
    SALA_ASSIGN_OR_RETURN(int64_t v, GetInt(j, f.key));
    SALA_RETURN_IF_ERROR(RequirePositive(v, f.key));
    if (v > (1 << 24)) return KeyError(f.key, absl::StrCat("is implausibly large: ", v));
    *f.out = int(v);
  }
  SALA_ASSIGN_OR_RETURN(int64_t head_dim, GetIntOr(j, "head_dim", c.hidden_size / c.num_heads));
  SALA_RETURN_IF_ERROR(RequirePositive(head_dim, "head_dim"));
  c.head_dim = int(head_dim);
  SALA_ASSIGN_OR_RETURN(c.rms_norm_eps, GetNumber(j, "rms_norm_eps"));
  SALA_ASSIGN_OR_RETURN(c.rope_theta, GetNumberOr(j, "rope_theta", 10000.0));
  SALA_ASSIGN_OR_RETURN(c.max_position_embeddings, GetInt(j, "max_position_embeddings"));
  SALA_RETURN_IF_ERROR(RequirePositive(c.max_position_embeddings, "max_position_embeddings"));
  SALA_ASSIGN_OR_RETURN(c.scale_emb, GetNumberOr(j, "scale_emb", 1.0));
  SALA_ASSIGN_OR_RETURN(c.scale_depth, GetNumberOr(j, "scale_depth", 1.0));
  SALA_ASSIGN_OR_RETURN(int64_t base, GetIntOr(j, "dim_model_base", c.hidden_size));
  SALA_RETURN_IF_ERROR(RequirePositive(base, "dim_model_base"));
  c.dim_model_base = int(base);
  SALA_ASSIGN_OR_RETURN(c.tie_word_embeddings, GetBoolOr(j, "tie_word_embeddings", false));
  SALA_ASSIGN_OR_RETURN(int64_t nkv, GetIntOr(j, "lightning_nkv", c.num_heads));
  SALA_RETURN_IF_ERROR(RequirePositive(nkv, "lightning_nkv"));
  c.lightning_nkv = int(nkv);
  SALA_ASSIGN_OR_RETURN(c.lightning_scale, GetStringOr(j, "lightning_scale", "1/sqrt(d)"));
  SALA_ASSIGN_OR_RETURN(c.qk_norm, GetBoolOr(j, "qk_norm", true));
  SALA_ASSIGN_OR_RETURN(c.use_output_gate, GetBoolOr(j, "use_output_gate", true));
  SALA_ASSIGN_OR_RETURN(c.use_output_norm, GetBoolOr(j, "use_output_norm", true));
  SALA_ASSIGN_OR_RETURN(c.attn_use_rope, GetBoolOr(j, "attn_use_rope", false));
  SALA_ASSIGN_OR_RETURN(c.attn_use_output_gate, GetBoolOr(j, "attn_use_output_gate", true));
  SALA_ASSIGN_OR_RETURN(c.lightning_use_rope, GetBoolOr(j, "lightning_use_rope", true));
  SALA_ASSIGN_OR_RETURN(int64_t bos, GetIntOr(j, "bos_token_id", 1));
  c.bos_token_id = int(bos);
  SALA_ASSIGN_OR_RETURN(c.eos_token_ids, GetIdList(j, "eos_token_id"));
  SALA_ASSIGN_OR_RETURN(int64_t pad, GetIntOr(j, "pad_token_id", 2));
  c.pad_token_id = int(pad);

  auto mt = j.find("mixer_types");
  if (mt == j.end()) return KeyError("mixer_types", "is missing");
  if (!mt->is_array()) return KeyError("mixer_types", "must be a list of strings");
  for (const auto& e : *mt) {
    if (!e.is_string()) return KeyError("mixer_types", "must be a list of strings");
    const std::string s = e.get<std::string>();
    if (s == "minicpm4") c.layers.push_back(LayerKind::kSparse);
    else if (s == "lightning-attn" || s == "lightning_attn" || s == "lightning")
      c.layers.push_back(LayerKind::kLinear);
    else return KeyError("mixer_types", absl::StrCat("has unknown mixer \"", s, "\""));
  }
  if (int(c.layers.size()) != c.num_layers)
    return KeyError("mixer_types", absl::StrCat("has ", c.layers.size(),
                                                " entries but num_hidden_layers is ", c.num_layers));
  SALA_RETURN_IF_ERROR(ParseSparseConfig(j, &c.sparse));

  // Consistency of the head layout.
  if (c.hidden_size % c.num_heads != 0)
    return KeyError("hidden_size", "must be a multiple of num_attention_heads");
  if (c.num_heads % c.num_kv_heads != 0)
    return KeyError("num_key_value_heads", "must divide num_attention_heads");
  if (c.num_heads % c.lightning_nkv != 0)
    return KeyError("lightning_nkv", "must divide num_attention_heads");
  if (c.head_dim % 2 != 0) return KeyError("head_dim", "must be even (RoPE rotates halves)");
  if (c.rms_norm_eps <= 0) return KeyError("rms_norm_eps", "must be positive");
  if (c.attn_use_rope)
    return KeyError("attn_use_rope", "true is not supported: sparse layers of this model use no RoPE");
  if (c.sparse.block_size % c.sparse.k2_stride() != 0 && c.num_sparse_layers() > 0)
    return KeyError("sparse_config.block_size", "must be a multiple of 4 * kernel_stride");
  if (c.eos_token_ids.empty()) c.eos_token_ids = {2};
  for (int id : c.eos_token_ids)
    if (id < 0 || id >= c.vocab_size) return KeyError("eos_token_id", "is outside the vocabulary");
  if (c.bos_token_id < 0 || c.bos_token_id >= c.vocab_size)
    return KeyError("bos_token_id", "is outside the vocabulary");
  return c;
}

absl::StatusOr<ModelConfig> LoadModelConfig(const std::string& model_dir) {
  auto read = [](const std::string& path) -> absl::StatusOr<std::string> {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat("cannot open ", path));
    std::stringstream ss;
    ss << in.rdbuf();
    return ss.str();
  };
  SALA_ASSIGN_OR_RETURN(std::string text, read(model_dir + "/config.json"));
  auto config = ParseModelConfig(text);
  if (!config.ok())
    return absl::Status(config.status().code(),
                        absl::StrCat(model_dir, "/", config.status().message()));
  // generation_config.json may carry the full stop list when config.json names only one id.
  auto gen = read(model_dir + "/generation_config.json");
  if (gen.ok()) {
    json g = json::parse(*gen, nullptr, false);
    if (!g.is_discarded() && g.is_object()) {
      auto ids = GetIdList(g, "eos_token_id");
      if (ids.ok()) {
        for (int id : *ids)
          if (id >= 0 && id < config->vocab_size &&
              std::find(config->eos_token_ids.begin(), config->eos_token_ids.end(), id) ==
                  config->eos_token_ids.end())
            config->eos_token_ids.push_back(id);
      }
    }
  }
  return config;
}

std::string ModelConfigToJson(const ModelConfig& c) {
  json mixers = json::array();
  for (LayerKind k : c.layers) mixers.push_back(k == LayerKind::kSparse ? "minicpm4" : "lightning-attn");
  json j = {
      {"architectures", {"MiniCPMSALAForCausalLM"}},
      {"model_type", "minicpm_sala"},
      {"hidden_size", c.hidden_size},
      {"num_hidden_layers", c.num_layers},
      {"num_attention_heads", c.num_heads},
      {"num_key_value_heads", c.num_kv_heads},
      {"head_dim", c.head_dim},
      {"intermediate_size", c.intermediate_size},
      {"vocab_size", c.vocab_size},
      {"rms_norm_eps", c.rms_norm_eps},
      {"rope_theta", c.rope_theta},
      {"max_position_embeddings", c.max_position_embeddings},
      {"scale_emb", c.scale_emb},
      {"scale_depth", c.scale_depth},
      {"dim_model_base", c.dim_model_base},
      {"tie_word_embeddings", c.tie_word_embeddings},
      {"mixer_types", mixers},
      {"lightning_nkv", c.lightning_nkv},
      {"lightning_nh", c.num_heads},
      {"lightning_head_dim", c.head_dim},
      {"lightning_scale", c.lightning_scale},
      {"qk_norm", c.qk_norm},
      {"use_output_gate", c.use_output_gate},
      {"use_output_norm", c.use_output_norm},
      {"attn_use_rope", c.attn_use_rope},
      {"attn_use_output_gate", c.attn_use_output_gate},
      {"lightning_use_rope", c.lightning_use_rope},
      {"sparse_config",
       {{"block_size", c.sparse.block_size},
        {"dense_len", c.sparse.dense_len},
        {"init_blocks", c.sparse.init_blocks},
        {"kernel_size", c.sparse.kernel_size},
        {"kernel_stride", c.sparse.kernel_stride},
        {"topk", c.sparse.topk},
        {"window_size", c.sparse.window_size},
        {"use_nope", c.sparse.use_nope}}},
      {"bos_token_id", c.bos_token_id},
      {"eos_token_id", c.eos_token_ids},
      {"pad_token_id", c.pad_token_id},
      {"torch_dtype", "bfloat16"},
  };
  return j.dump(2) + "\n";
}

}  // namespace sala

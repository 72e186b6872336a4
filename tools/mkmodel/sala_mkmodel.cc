// sala-mkmodel: writes a MiniCPM-SALA-layout model directory with random weights,
// deterministic from a seed: config.json, generation_config.json, safetensors (one file or
// shards with an index), a SentencePiece BPE tokenizer trained on a built-in text, and the
// special-token files. The default is the small built-in model used by tests and demos.
#include <cmath>
#include <cstdint>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "sala/config.h"
#include "sala/safetensors.h"
#include "sala/status_macros.h"
#include "sala/weights.h"
#include "cli.h"
#include "mkmodel_corpus.h"
#include "sentencepiece_bpe.h"

ABSL_FLAG(std::string, out, "", "output directory (created)");
ABSL_FLAG(std::string, preset, "small", "small: the built-in test model; 9b: the MiniCPM-SALA 9B shape");
ABSL_FLAG(uint64_t, seed, 1, "seed of the random weights");
ABSL_FLAG(bool, config_only, false, "write config files only (the 9B shape's weights are generated on the GPU)");
ABSL_FLAG(int, shards, 1, "number of safetensors shards (more than 1 writes model.safetensors.index.json)");
ABSL_FLAG(std::string, layers, "", "layer pattern, S = sparse, L = linear, e.g. SLLSLS (default: the preset's)");
ABSL_FLAG(int, hidden_size, 0, "override the preset's hidden size");
ABSL_FLAG(int, heads, 0, "override the number of query heads");
ABSL_FLAG(int, kv_heads, 0, "override the sparse layers' KV heads");
ABSL_FLAG(int, lightning_nkv, 0, "override the linear layers' KV heads");
ABSL_FLAG(int, intermediate_size, 0, "override the MLP width");
ABSL_FLAG(int, dense_len, -1, "override sparse_config.dense_len");
ABSL_FLAG(int, tokenizer_vocab, 1024, "SentencePiece vocabulary size to train (small preset)");

namespace {

using sala::LayerKind;
using sala::ModelConfig;

ModelConfig Preset(const std::string& name) {
  ModelConfig c;
  c.model_type = "minicpm_sala";
  c.rms_norm_eps = 1e-6;
  c.rope_theta = 10000;
  c.scale_emb = 12;
  c.scale_depth = 1.4;
  c.bos_token_id = 1;
  c.pad_token_id = 2;
  if (name == "9b") {
    c.hidden_size = 4096;
    c.num_layers = 32;
    c.num_heads = 32;
    c.num_kv_heads = 2;
    c.head_dim = 128;
    c.intermediate_size = 16384;
    c.vocab_size = 73448;
    c.max_position_embeddings = 524288;
    c.dim_model_base = 256;
    c.lightning_nkv = 32;
    for (int i = 0; i < 32; ++i) {
      const bool sparse = i == 0 || i == 9 || i == 16 || i == 17 || i == 22 || i >= 29;
      c.layers.push_back(sparse ? LayerKind::kSparse : LayerKind::kLinear);
    }
    c.eos_token_ids = {2, 73440};
    return c;  // sparse_config defaults are the 9B values
  }
  // Small: 6 layers (3 sparse), head_dim 64, and a sparse_config scaled so that the
  // block-sparse path is exercised at a few thousand tokens: 10 blocks of 64 are read per query.
  c.hidden_size = 256;
  c.num_layers = 6;
  c.num_heads = 4;
  c.num_kv_heads = 2;
  c.head_dim = 64;
  c.intermediate_size = 512;
  c.max_position_embeddings = 16384;
  c.dim_model_base = 16;
  c.lightning_nkv = 4;
  c.layers = {LayerKind::kSparse, LayerKind::kLinear, LayerKind::kLinear,
              LayerKind::kSparse, LayerKind::kLinear, LayerKind::kSparse};
  c.sparse.dense_len = 1024;
  c.sparse.topk = 8;
  c.sparse.window_size = 128;
  return c;
}

// splitmix64: a tiny, portable generator, seeded per tensor from (seed, name) so that a
// tensor's values do not depend on the order tensors are written in.
struct Rng {
  uint64_t s;
  uint64_t Next() {
    uint64_t z = (s += 0x9e3779b97f4a7c15ull);
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
  }
  double Uniform() { return (double(Next() >> 11) + 0.5) * 0x1.0p-53; }
  double Normal() { return std::sqrt(-2.0 * std::log(Uniform())) * std::cos(6.283185307179586 * Uniform()); }
};

uint64_t TensorSeed(uint64_t seed, const std::string& name) {
  uint64_t h = 1469598103934665603ull ^ seed;
  for (unsigned char c : name) h = (h ^ c) * 1099511628211ull;
  return h;
}

// Scales chosen so activations stay O(1) and the logits are spread enough that greedy
// decoding is not decided by rounding.
double TensorStd(const ModelConfig& c, const std::string& name, int64_t fan_in) {
  if (name == "model.embed_tokens.weight") return 0.1;
  if (name == "lm_head.weight") return 16.0 / std::sqrt(double(c.hidden_size));
  return 1.0 / std::sqrt(double(fan_in));
}

sala::TensorToWrite MakeTensor(const ModelConfig& c, uint64_t seed, const sala::TensorSpec& spec) {
  sala::TensorToWrite t{spec.name, sala::DType::kBF16, spec.shape, {}};
  int64_t n = 1;
  for (int64_t d : spec.shape) n *= d;
  t.bytes.resize(n * 2);
  auto* out = reinterpret_cast<uint16_t*>(t.bytes.data());
  Rng rng{TensorSeed(seed, spec.name)};
  const bool is_norm = spec.shape.size() == 1;
  const double std = TensorStd(c, spec.name, spec.shape.back());
  for (int64_t i = 0; i < n; ++i) {
    const double v = is_norm ? 1.0 + 0.1 * rng.Normal() : std * rng.Normal();
    out[i] = sala::F32ToBf16(float(v));
  }
  return t;
}

absl::Status WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary | std::ios::trunc);
  out << text;
  if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  return absl::OkStatus();
}

absl::Status WriteTokenizer(const std::string& dir, int vocab, ModelConfig& c) {
  const std::string corpus = dir + "/.tokenizer_corpus.txt";
  SALA_RETURN_IF_ERROR(WriteText(corpus, std::string(sala::kMkmodelCorpus)));
  const std::string error = sala::spm::TrainBpe(corpus, dir + "/tokenizer", vocab);
  std::filesystem::remove(corpus);
  std::filesystem::remove(dir + "/tokenizer.vocab");
  if (!error.empty()) return absl::InternalError(absl::StrCat("tokenizer training failed: ", error));
  std::string load_error;
  auto sp = sala::spm::Processor::Load(dir + "/tokenizer.model", &load_error);
  if (!sp) return absl::InternalError(load_error);
  // The added tokens follow the SentencePiece pieces, as in the 9B release (73440, 73441).
  const int im_end = sp->piece_count(), im_start = im_end + 1;
  c.vocab_size = im_end + 8;
  c.eos_token_ids = {2, im_end};
  nlohmann::json added = {{"<|im_end|>", im_end}, {"<|im_start|>", im_start}};
  SALA_RETURN_IF_ERROR(WriteText(dir + "/added_tokens.json", added.dump(2) + "\n"));
  const std::string chat_template =
      "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n' + message['content'] + "
      "'<|im_end|>' + '\\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}";
  SALA_RETURN_IF_ERROR(WriteText(dir + "/chat_template.jinja", chat_template + "\n"));
  nlohmann::json special = {{"bos_token", "<s>"}, {"eos_token", "<|im_end|>"}, {"unk_token", "<unk>"},
                            {"additional_special_tokens", {"<|im_end|>", "<|im_start|>"}}};
  SALA_RETURN_IF_ERROR(WriteText(dir + "/special_tokens_map.json", special.dump(2) + "\n"));
  nlohmann::json tok_config = {{"tokenizer_class", "LlamaTokenizer"}, {"add_bos_token", true},
                               {"add_eos_token", false}, {"bos_token", "<s>"}, {"eos_token", "<|im_end|>"},
                               {"unk_token", "<unk>"}, {"legacy", true}, {"chat_template", chat_template}};
  return WriteText(dir + "/tokenizer_config.json", tok_config.dump(2) + "\n");
}

absl::Status WriteWeights(const std::string& dir, const ModelConfig& c, uint64_t seed, int shards) {
  const std::vector<sala::TensorSpec> specs = sala::ExpectedTensors(c);
  if (shards <= 1) {
    std::vector<sala::TensorToWrite> all;
    for (const auto& s : specs) all.push_back(MakeTensor(c, seed, s));
    return sala::WriteSafetensors(dir + "/model.safetensors", all);
  }
  nlohmann::json weight_map = nlohmann::json::object();
  const size_t per = (specs.size() + shards - 1) / shards;
  int64_t total_bytes = 0;
  for (int s = 0; s < shards; ++s) {
    const std::string file = absl::StrFormat("model-%05d-of-%05d.safetensors", s + 1, shards);
    std::vector<sala::TensorToWrite> part;
    for (size_t i = s * per; i < std::min(specs.size(), (s + 1) * per); ++i) {
      part.push_back(MakeTensor(c, seed, specs[i]));
      weight_map[specs[i].name] = file;
      total_bytes += part.back().bytes.size();
    }
    SALA_RETURN_IF_ERROR(sala::WriteSafetensors(dir + "/" + file, part));
  }
  nlohmann::json index = {{"metadata", {{"total_size", total_bytes}}}, {"weight_map", weight_map}};
  return WriteText(dir + "/model.safetensors.index.json", index.dump(2) + "\n");
}

absl::Status Run() {
  const std::string dir = absl::GetFlag(FLAGS_out);
  if (dir.empty()) return absl::InvalidArgumentError("--out is required");
  const std::string preset = absl::GetFlag(FLAGS_preset);
  if (preset != "small" && preset != "9b")
    return absl::InvalidArgumentError(absl::StrCat("unknown --preset '", preset, "' (small, 9b)"));
  ModelConfig c = Preset(preset);
  if (const std::string p = absl::GetFlag(FLAGS_layers); !p.empty()) {
    c.layers.clear();
    for (char ch : p) {
      if (ch != 'S' && ch != 'L') return absl::InvalidArgumentError("--layers takes S and L only");
      c.layers.push_back(ch == 'S' ? LayerKind::kSparse : LayerKind::kLinear);
    }
    c.num_layers = int(c.layers.size());
  }
  if (int v = absl::GetFlag(FLAGS_hidden_size)) c.hidden_size = v;
  if (int v = absl::GetFlag(FLAGS_heads)) c.num_heads = v;
  if (int v = absl::GetFlag(FLAGS_kv_heads)) c.num_kv_heads = v;
  if (int v = absl::GetFlag(FLAGS_lightning_nkv)) c.lightning_nkv = v;
  if (int v = absl::GetFlag(FLAGS_intermediate_size)) c.intermediate_size = v;
  if (int v = absl::GetFlag(FLAGS_dense_len); v >= 0) c.sparse.dense_len = v;
  std::error_code ec;
  std::filesystem::create_directories(dir, ec);
  if (ec) return absl::PermissionDeniedError(absl::StrCat("cannot create ", dir, ": ", ec.message()));
  if (preset == "small") SALA_RETURN_IF_ERROR(WriteTokenizer(dir, absl::GetFlag(FLAGS_tokenizer_vocab), c));
  const std::string config_json = sala::ModelConfigToJson(c);
  // Round-trip through the parser so that an inconsistent override is caught here.
  SALA_RETURN_IF_ERROR(sala::ParseModelConfig(config_json).status());
  SALA_RETURN_IF_ERROR(WriteText(dir + "/config.json", config_json));
  nlohmann::json gen = {{"bos_token_id", c.bos_token_id}, {"eos_token_id", c.eos_token_ids},
                        {"pad_token_id", c.pad_token_id}, {"do_sample", true}, {"temperature", 0.9}};
  SALA_RETURN_IF_ERROR(WriteText(dir + "/generation_config.json", gen.dump(2) + "\n"));
  if (!absl::GetFlag(FLAGS_config_only))
    SALA_RETURN_IF_ERROR(WriteWeights(dir, c, absl::GetFlag(FLAGS_seed), absl::GetFlag(FLAGS_shards)));
  std::cerr << "wrote " << dir << " (" << preset << ", " << c.num_layers << " layers, "
            << c.parameter_count() << " parameters" << (absl::GetFlag(FLAGS_config_only) ? ", config only" : "")
            << ")\n";
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage("Writes a MiniCPM-SALA model directory with random weights.\n"
                               "  sala-mkmodel --out=models/small            the built-in small model\n"
                               "  sala-mkmodel --out=models/9b --preset=9b --config_only");
  sala::tools::AcceptDashedFlags(argc, argv);
  sala::tools::ListOwnFlagsInHelp();
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = Run(); !s.ok()) {
    std::cerr << "sala-mkmodel: " << s.message() << "\n";
    return 1;
  }
  return 0;
}

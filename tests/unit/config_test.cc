#include "sala/config.h"

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace sala {
namespace {

nlohmann::json NineB() {
  nlohmann::json mixers = nlohmann::json::array();
  for (int i = 0; i < 32; ++i) {
    const bool sparse = i == 0 || i == 9 || i == 16 || i == 17 || i == 22 || i >= 29;
    mixers.push_back(sparse ? "minicpm4" : "lightning-attn");
  }
  return {{"model_type", "minicpm_sala"}, {"hidden_size", 4096}, {"num_hidden_layers", 32},
          {"num_attention_heads", 32}, {"num_key_value_heads", 2}, {"head_dim", 128},
          {"intermediate_size", 16384}, {"vocab_size", 73448}, {"rms_norm_eps", 1e-6},
          {"rope_theta", 10000}, {"max_position_embeddings", 524288}, {"scale_emb", 12},
          {"scale_depth", 1.4}, {"dim_model_base", 256}, {"tie_word_embeddings", false},
          {"mixer_types", mixers}, {"lightning_nkv", 32}, {"lightning_nh", 32},
          {"lightning_head_dim", 128}, {"lightning_scale", "1/sqrt(d)"}, {"qk_norm", true},
          {"use_output_gate", true}, {"use_output_norm", true}, {"attn_use_rope", false},
          {"attn_use_output_gate", true}, {"lightning_use_rope", true},
          {"sparse_config", {{"block_size", 64}, {"dense_len", 8192}, {"init_blocks", 1}, {"kernel_size", 32},
                             {"kernel_stride", 16}, {"topk", 64}, {"window_size", 2048}, {"use_nope", false}}},
          {"bos_token_id", 1}, {"eos_token_id", {2, 73440}}, {"pad_token_id", 2}};
}

TEST(ConfigTest, Parses9BConfig) {
  auto c = ParseModelConfig(NineB().dump());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_sparse_layers(), 8);
  EXPECT_EQ(c->num_linear_layers(), 24);
  EXPECT_EQ(c->sparse.selected_blocks(), 96);
  EXPECT_EQ(c->sparse_head_dim(), 128);
  EXPECT_NEAR(c->residual_scale(), 0.2474874, 1e-6);
  EXPECT_DOUBLE_EQ(c->logit_divisor(), 16.0);
  EXPECT_EQ(c->eos_token_ids, (std::vector<int>{2, 73440}));
  // MODEL_SPEC §1: 9.477e9 parameters.
  EXPECT_EQ(c->parameter_count() / 1000000, 9477);
  EXPECT_EQ(c->slot_of(9), 1);
  EXPECT_EQ(c->slot_of(10), 8);
}

TEST(ConfigTest, AlibiSlopes) {
  auto s = LinearDecaySlopes(32);
  ASSERT_EQ(s.size(), 32u);
  EXPECT_NEAR(s[0], std::pow(2.0, -0.25), 1e-12);
  EXPECT_NEAR(s[31], std::pow(2.0, -8.0), 1e-12);
  // Not a power of two: slopes(8) then every other slope of slopes(16).
  auto s12 = LinearDecaySlopes(12);
  auto s8 = LinearDecaySlopes(8), s16 = LinearDecaySlopes(16);
  ASSERT_EQ(s12.size(), 12u);
  for (int i = 0; i < 8; ++i) EXPECT_DOUBLE_EQ(s12[i], s8[i]);
  for (int i = 0; i < 4; ++i) EXPECT_DOUBLE_EQ(s12[8 + i], s16[2 * i]);
}

TEST(ConfigTest, RoundTripsThroughJson) {
  auto c = ParseModelConfig(NineB().dump());
  ASSERT_TRUE(c.ok());
  auto again = ParseModelConfig(ModelConfigToJson(*c));
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->layout_hash(), c->layout_hash());
  EXPECT_EQ(again->parameter_count(), c->parameter_count());
}

struct BadCase {
  std::string name;
  std::function<void(nlohmann::json&)> edit;
  std::string expect_in_message;
};

TEST(ConfigTest, RefusesBadConfigsNamingTheKey) {
  const std::vector<BadCase> cases = {
      {"missing hidden_size", [](auto& j) { j.erase("hidden_size"); }, "hidden_size"},
      {"string hidden_size", [](auto& j) { j["hidden_size"] = "4096"; }, "hidden_size"},
      {"negative heads", [](auto& j) { j["num_attention_heads"] = -1; }, "num_attention_heads"},
      {"mixer count", [](auto& j) { j["mixer_types"].erase(0); }, "mixer_types"},
      {"unknown mixer", [](auto& j) { j["mixer_types"][3] = "mamba"; }, "mamba"},
      {"kv heads", [](auto& j) { j["num_key_value_heads"] = 3; }, "num_key_value_heads"},
      {"lightning nkv", [](auto& j) { j["lightning_nkv"] = 5; }, "lightning_nkv"},
      {"no sparse_config", [](auto& j) { j.erase("sparse_config"); }, "sparse_config"},
      {"sparse block", [](auto& j) { j["sparse_config"]["block_size"] = 0; }, "block_size"},
      {"sparse stride", [](auto& j) { j["sparse_config"]["kernel_stride"] = 5; }, "kernel_size"},
      {"model type", [](auto& j) { j["model_type"] = "llama"; }, "model_type"},
      {"eos", [](auto& j) { j["eos_token_id"] = {2, 999999}; }, "eos_token_id"},
      {"rope in sparse", [](auto& j) { j["attn_use_rope"] = true; }, "attn_use_rope"},
      {"bool type", [](auto& j) { j["qk_norm"] = 1; }, "qk_norm"},
  };
  for (const BadCase& bc : cases) {
    nlohmann::json j = NineB();
    bc.edit(j);
    auto c = ParseModelConfig(j.dump());
    ASSERT_FALSE(c.ok()) << bc.name;
    EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument) << bc.name;
    EXPECT_NE(c.status().message().find(bc.expect_in_message), std::string::npos)
        << bc.name << ": " << c.status().message();
  }
  EXPECT_FALSE(ParseModelConfig("{not json").ok());
  EXPECT_FALSE(ParseModelConfig("[1, 2]").ok());
  EXPECT_FALSE(ParseModelConfig("").ok());
}

TEST(ConfigTest, MissingDirectoryIsNotFound) {
  auto c = LoadModelConfig("/nonexistent/model");
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), absl::StatusCode::kNotFound);
}

}  // namespace
}  // namespace sala

#include "sala/safetensors.h"

#include <cstring>
#include <filesystem>
#include <random>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "sala/config.h"
#include "sala/weights.h"
#include "test_util.h"

namespace sala {
namespace {

using testing::ReadAll;
using testing::ScratchDir;
using testing::WriteAll;

// A safetensors file from a raw header object and data section.
std::string RawFile(const nlohmann::json& header, const std::string& data) {
  const std::string h = header.dump();
  std::string out(8, '\0');
  const uint64_t len = h.size();
  std::memcpy(out.data(), &len, 8);
  return out + h + data;
}

std::string Bf16Bytes(std::vector<float> v) {
  std::string s(v.size() * 2, '\0');
  for (size_t i = 0; i < v.size(); ++i) {
    const uint16_t h = F32ToBf16(v[i]);
    std::memcpy(s.data() + 2 * i, &h, 2);
  }
  return s;
}

TEST(SafetensorsTest, WritesAndReadsBack) {
  const std::string dir = ScratchDir("rw");
  ASSERT_TRUE(WriteSafetensors(dir + "/model.safetensors",
                               {{"a", DType::kBF16, {2, 3}, Bf16Bytes({1, 2, 3, 4, 5, -6.5})},
                                {"b", DType::kF32, {2}, std::string("\0\0\x80\x3f\0\0\0\x40", 8)}})
                  .ok());
  auto f = SafetensorsFile::Open(dir + "/model.safetensors");
  ASSERT_TRUE(f.ok()) << f.status();
  const TensorView& a = (*f)->tensors().at("a");
  EXPECT_EQ(a.shape, (std::vector<int64_t>{2, 3}));
  std::vector<float> va(6), vb(2);
  ConvertToF32(a, va.data());
  ConvertToF32((*f)->tensors().at("b"), vb.data());
  EXPECT_EQ(va, (std::vector<float>{1, 2, 3, 4, 5, -6.5}));
  EXPECT_EQ(vb, (std::vector<float>{1, 2}));
}

TEST(SafetensorsTest, HalfPrecisionConversions) {
  EXPECT_EQ(F16ToF32(0x3c00), 1.0f);
  EXPECT_EQ(F16ToF32(0xc000), -2.0f);
  EXPECT_EQ(F16ToF32(0x0001), std::ldexp(1.0f, -24));  // smallest subnormal
  EXPECT_TRUE(std::isinf(F16ToF32(0x7c00)));
  EXPECT_EQ(Bf16ToF32(F32ToBf16(3.140625f)), 3.140625f);
  EXPECT_EQ(F32ToBf16(1.00390625f), 0x3f80);  // ties round to even
  EXPECT_TRUE(std::isnan(Bf16ToF32(F32ToBf16(std::nanf("")))));
}

struct Corruption {
  std::string name;
  std::string bytes;
  std::string expect;  // part of the message
};

TEST(SafetensorsTest, RefusesCorruptFilesWithAMessage) {
  const std::string ok_data = Bf16Bytes({1, 2, 3, 4});
  const nlohmann::json good = {{"w", {{"dtype", "BF16"}, {"shape", {2, 2}}, {"data_offsets", {0, 8}}}}};
  const std::string good_file = RawFile(good, ok_data);
  std::string huge_len = good_file;
  const uint64_t big = 1ull << 40;
  std::memcpy(huge_len.data(), &big, 8);
  const std::vector<Corruption> cases = {
      {"empty", "", "truncated"},
      {"short", "abc", "truncated"},
      {"header length past end", huge_len, "header length"},
      {"truncated data", good_file.substr(0, good_file.size() - 3), "'w'"},
      {"not json", RawFile(nlohmann::json::array(), ok_data).replace(8, 2, "{x"), "JSON"},
      {"overlap",
       RawFile({{"a", {{"dtype", "BF16"}, {"shape", {2}}, {"data_offsets", {0, 4}}}},
                {"b", {{"dtype", "BF16"}, {"shape", {2}}, {"data_offsets", {2, 6}}}}},
               ok_data),
       "overlap"},
      {"size mismatch",
       RawFile({{"w", {{"dtype", "BF16"}, {"shape", {3, 2}}, {"data_offsets", {0, 8}}}}}, ok_data), "'w'"},
      {"bad dtype", RawFile({{"w", {{"dtype", "I64"}, {"shape", {1}}, {"data_offsets", {0, 8}}}}}, ok_data),
       "I64"},
      {"negative shape",
       RawFile({{"w", {{"dtype", "BF16"}, {"shape", {-2, 2}}, {"data_offsets", {0, 8}}}}}, ok_data), "shape"},
      {"offsets reversed",
       RawFile({{"w", {{"dtype", "BF16"}, {"shape", {0}}, {"data_offsets", {8, 0}}}}}, ok_data), "data_offsets"},
      {"missing offsets", RawFile({{"w", {{"dtype", "BF16"}, {"shape", {2, 2}}}}}, ok_data), "data_offsets"},
  };
  const std::string dir = ScratchDir("corrupt");
  for (const Corruption& c : cases) {
    WriteAll(dir + "/x.safetensors", c.bytes);
    auto f = SafetensorsFile::Open(dir + "/x.safetensors");
    ASSERT_FALSE(f.ok()) << c.name;
    EXPECT_NE(f.status().message().find(c.expect), std::string::npos) << c.name << ": " << f.status().message();
  }
  WriteAll(dir + "/x.safetensors", good_file);
  EXPECT_TRUE(SafetensorsFile::Open(dir + "/x.safetensors").ok());
}

// Random damage to the header must give an error or a consistent file, never a crash.
TEST(SafetensorsTest, SurvivesRandomHeaderDamage) {
  const nlohmann::json header = {{"a", {{"dtype", "F32"}, {"shape", {2, 2}}, {"data_offsets", {0, 16}}}},
                                 {"b", {{"dtype", "BF16"}, {"shape", {4}}, {"data_offsets", {16, 24}}}}};
  const std::string file = RawFile(header, std::string(24, '\x11'));
  const std::string dir = ScratchDir("fuzz");
  std::mt19937 rng(7);
  for (int iter = 0; iter < 300; ++iter) {
    std::string bytes = file;
    const int flips = 1 + int(rng() % 4);
    for (int i = 0; i < flips; ++i) bytes[rng() % bytes.size()] = char(rng() % 256);
    if (rng() % 5 == 0) bytes.resize(rng() % bytes.size());
    WriteAll(dir + "/f.safetensors", bytes);
    auto f = SafetensorsFile::Open(dir + "/f.safetensors");
    if (!f.ok()) continue;
    for (const auto& [name, view] : (*f)->tensors()) {
      std::vector<float> out(view.numel());
      ConvertToF32(view, out.data());  // must stay inside the mapping (ASan checks)
    }
  }
}

TEST(CheckpointTest, ShardedIndexIsCheckedBothWays) {
  const std::string dir = ScratchDir("shards");
  ASSERT_TRUE(WriteSafetensors(dir + "/s1.safetensors", {{"a", DType::kF32, {1}, std::string(4, '\0')}}).ok());
  ASSERT_TRUE(WriteSafetensors(dir + "/s2.safetensors", {{"b", DType::kF32, {1}, std::string(4, '\0')}}).ok());
  auto write_index = [&](const nlohmann::json& map) {
    WriteAll(dir + "/model.safetensors.index.json", nlohmann::json{{"weight_map", map}}.dump());
  };
  write_index({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}});
  auto ok = Checkpoint::Open(dir);
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ((*ok)->tensors().size(), 2u);

  write_index({{"a", "s1.safetensors"}, {"b", "s2.safetensors"}, {"c", "s2.safetensors"}});
  auto missing = Checkpoint::Open(dir);
  ASSERT_FALSE(missing.ok());
  EXPECT_NE(missing.status().message().find("'c'"), std::string::npos) << missing.status();

  write_index({{"a", "s1.safetensors"}, {"b", "s1.safetensors"}});
  EXPECT_FALSE(Checkpoint::Open(dir).ok());

  write_index({{"a", "../s1.safetensors"}});
  EXPECT_FALSE(Checkpoint::Open(dir).ok());

  WriteAll(dir + "/model.safetensors.index.json", "{\"weight_map\": 3}");
  EXPECT_FALSE(Checkpoint::Open(dir).ok());
  EXPECT_EQ(Checkpoint::Open(ScratchDir("empty")).status().code(), absl::StatusCode::kNotFound);
}

class ModelCheckpointTest : public testing::TestModelConfigTest {
 protected:
  // Rewrites the test model's weights with `edit` applied to the tensor list.
  absl::Status CheckEdited(const std::function<void(std::vector<TensorToWrite>&)>& edit) {
    auto ckpt = Checkpoint::Open(testing::TestModelDir());
    EXPECT_TRUE(ckpt.ok());
    std::vector<TensorToWrite> tensors;
    for (const auto& [name, v] : (*ckpt)->tensors())
      tensors.push_back({name, v.dtype, v.shape, std::string(reinterpret_cast<const char*>(v.data), v.bytes)});
    edit(tensors);
    const std::string dir = ScratchDir("edited");
    EXPECT_TRUE(WriteSafetensors(dir + "/model.safetensors", tensors).ok());
    auto edited = Checkpoint::Open(dir);
    if (!edited.ok()) return edited.status();
    return ValidateCheckpoint(config_, **edited);
  }
};

TEST_F(ModelCheckpointTest, AcceptsTheBuiltInModel) {
  EXPECT_TRUE(CheckEdited([](auto&) {}).ok());
}

TEST_F(ModelCheckpointTest, NamesMissingTensor) {
  auto s = CheckEdited([](auto& t) {
    t.erase(std::find_if(t.begin(), t.end(), [](auto& x) { return x.name == "model.layers.1.self_attn.z_proj.weight"; }));
  });
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("missing tensor 'model.layers.1.self_attn.z_proj.weight'"), std::string::npos) << s;
}

TEST_F(ModelCheckpointTest, NamesWrongShape) {
  auto s = CheckEdited([](auto& t) {
    for (auto& x : t)
      if (x.name == "model.layers.0.self_attn.k_proj.weight") {
        std::swap(x.shape[0], x.shape[1]);
      }
  });
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("model.layers.0.self_attn.k_proj.weight"), std::string::npos) << s;
  EXPECT_NE(s.message().find("shape"), std::string::npos) << s;
}

TEST_F(ModelCheckpointTest, NamesUnexpectedTensor) {
  auto s = CheckEdited([](auto& t) { t.push_back({"model.layers.0.self_attn.q_norm.weight", DType::kBF16, {64}, std::string(128, '\0')}); });
  ASSERT_FALSE(s.ok());
  EXPECT_NE(s.message().find("unexpected tensor 'model.layers.0.self_attn.q_norm.weight'"), std::string::npos) << s;
}

}  // namespace
}  // namespace sala

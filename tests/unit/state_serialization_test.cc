#include "sala/state_serialization.h"

#include <random>

#include "gtest/gtest.h"
#include "test_util.h"

namespace sala {
namespace {

class StateSerializationTest : public testing::TestModelConfigTest {
 protected:

  // A state of `tokens` tokens filled with random values, grown the way prefill grows it.
  SequenceState RandomState(int64_t tokens, uint32_t seed) {
    SequenceState s = SequenceState::Empty(config_);
    Grow(s, tokens, seed);
    return s;
  }
  void Grow(SequenceState& s, int64_t to, uint32_t seed) {
    std::mt19937 rng(seed);
    std::normal_distribution<float> n;
    const int64_t row = int64_t(config_.num_kv_heads) * config_.sparse_head_dim();
    for (auto& c : s.sparse) {
      for (int64_t i = s.tokens * row; i < to * row; ++i) {
        c.k.push_back(n(rng));
        c.v.push_back(n(rng));
      }
      UpdateCompressedKeys(config_, to, c);
    }
    for (auto& l : s.linear)
      for (float& x : l.s) x = n(rng);
    s.tokens = to;
  }
  static void ExpectSame(const SequenceState& a, const SequenceState& b) {
    ASSERT_EQ(a.tokens, b.tokens);
    ASSERT_EQ(a.sparse.size(), b.sparse.size());
    for (size_t i = 0; i < a.sparse.size(); ++i) {
      EXPECT_EQ(a.sparse[i].k, b.sparse[i].k);
      EXPECT_EQ(a.sparse[i].v, b.sparse[i].v);
      EXPECT_EQ(a.sparse[i].k1, b.sparse[i].k1);
      EXPECT_EQ(a.sparse[i].k2, b.sparse[i].k2);
    }
    for (size_t i = 0; i < a.linear.size(); ++i) EXPECT_EQ(a.linear[i].s, b.linear[i].s);
  }
};

TEST_F(StateSerializationTest, RoundTripsWholeState) {
  for (int64_t tokens : {0, 1, 63, 64, 200, 1000}) {
    const SequenceState s = RandomState(tokens, 1);
    auto back = StateReader::DeserializeAll(config_, StateWriter::SerializeAll(config_, s));
    ASSERT_TRUE(back.ok()) << back.status();
    ExpectSame(*back, s);
  }
}

TEST_F(StateSerializationTest, IncrementalStreamInRandomPiecesEqualsWholeState) {
  // Prefill-like: chunks of 100 tokens; whole blocks ship after each chunk, the rest at the end.
  SequenceState s = SequenceState::Empty(config_);
  StateWriter w(config_, 950);
  std::string stream = w.Header();
  for (int64_t to = 100; to <= 950; to = std::min<int64_t>(to + 100, 950)) {
    Grow(s, to, uint32_t(to));
    stream += w.SparseDelta(s, /*final=*/false);
    if (to == 950) break;
  }
  stream += w.SparseDelta(s, /*final=*/true);
  stream += w.LinearStates(s);
  stream += w.Commit(s);

  std::mt19937 rng(3);
  StateReader r(config_);
  for (size_t pos = 0; pos < stream.size();) {
    const size_t n = std::min<size_t>(stream.size() - pos, 1 + rng() % 5000);
    ASSERT_TRUE(r.Feed(std::string_view(stream).substr(pos, n)).ok());
    pos += n;
    EXPECT_EQ(r.committed(), pos == stream.size());
  }
  auto back = r.Take();
  ASSERT_TRUE(back.ok()) << back.status();
  ExpectSame(*back, s);
}

TEST_F(StateSerializationTest, Bf16WireHalvesTheKvBytes) {
  const SequenceState s = RandomState(512, 2);
  const std::string f32 = StateWriter::SerializeAll(config_, s, DType::kF32);
  const std::string bf16 = StateWriter::SerializeAll(config_, s, DType::kBF16);
  EXPECT_LT(bf16.size(), f32.size());
  auto back = StateReader::DeserializeAll(config_, bf16);
  ASSERT_TRUE(back.ok()) << back.status();
  for (size_t i = 0; i < s.sparse[0].k.size(); ++i)
    ASSERT_NEAR(back->sparse[0].k[i], s.sparse[0].k[i], std::abs(s.sparse[0].k[i]) * 0.008 + 1e-30);
  EXPECT_EQ(back->linear[0].s, s.linear[0].s);  // linear states always travel in fp32
}

TEST_F(StateSerializationTest, RefusesDamagedStreams) {
  const SequenceState s = RandomState(300, 4);
  const std::string good = StateWriter::SerializeAll(config_, s);
  auto refuse = [&](std::string bytes, const std::string& expect) {
    auto r = StateReader::DeserializeAll(config_, bytes);
    ASSERT_FALSE(r.ok()) << expect;
    EXPECT_NE(r.status().message().find(expect), std::string::npos) << r.status();
  };
  refuse(good.substr(0, good.size() - 1), "before its commit");
  refuse(good.substr(0, good.size() / 2), "before its commit");
  std::string flipped = good;
  flipped[good.size() / 2] ^= 0x01;
  refuse(flipped, "checksum");
  std::string magic = good;
  magic[0] = 'X';
  refuse(magic, "magic");
  refuse(good + "x", "after commit");
  // A state from a model of another layout is refused by its header.
  ModelConfig other = config_;
  other.num_kv_heads = 1;
  refuse(StateWriter::SerializeAll(other, SequenceState::Empty(other)), "layout");
  // Random damage never crashes.
  std::mt19937 rng(5);
  for (int i = 0; i < 200; ++i) {
    std::string bytes = good;
    for (int k = 0; k < 3; ++k) bytes[rng() % std::min<size_t>(bytes.size(), 600)] = char(rng());
    if (bytes != good) EXPECT_FALSE(StateReader::DeserializeAll(config_, bytes).ok());
  }
}

}  // namespace
}  // namespace sala

// Consistency of the CPU engine with itself: chunking, token-by-token decode, batching and
// state transfer must not change the numbers.
#include "sala/engine.h"

#include <filesystem>

#include "gtest/gtest.h"
#include "sala/state_serialization.h"
#include "test_util.h"

namespace sala {
namespace {

using testing::RandomTokens;
using testing::RelativeError;

std::unique_ptr<Engine> LoadEngine(EngineOptions options = {}) {
  auto e = Engine::Load(testing::TestModelDir(), options);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

class EngineTest : public ::testing::Test {
 protected:
  void SetUp() override {
    SALA_REQUIRE_TEST_MODEL();
    engine_ = LoadEngine();
    ASSERT_NE(engine_, nullptr);
    vocab_ = engine_->config().vocab_size;
  }
  std::vector<float> PrefillLogits(Engine& e, const std::vector<int>& ids, SequenceState* out = nullptr) {
    SequenceState s = e.NewSequence();
    auto logits = e.Prefill(s, ids);
    EXPECT_TRUE(logits.ok()) << logits.status();
    if (out) *out = std::move(s);
    return logits.ok() ? *logits : std::vector<float>{};
  }
  // Prefill of the first token, then the rest one decode step at a time.
  std::vector<float> DecodeLogits(Engine& e, const std::vector<int>& ids) {
    SequenceState s = e.NewSequence();
    auto logits = e.Prefill(s, std::span<const int>(ids).first(1));
    EXPECT_TRUE(logits.ok());
    std::vector<float> last = *logits;
    for (size_t i = 1; i < ids.size(); ++i) {
      SequenceState* p = &s;
      auto step = e.Decode(std::span<SequenceState* const>(&p, 1), std::span<const int>(&ids[i], 1));
      EXPECT_TRUE(step.ok()) << step.status();
      last = (*step)[0];
    }
    return last;
  }
  std::unique_ptr<Engine> engine_;
  int vocab_ = 0;
};

TEST_F(EngineTest, ChunkedPrefillMatchesOneShot) {
  // 1500 tokens: the sparse path (dense_len 1024); 600: the dense path.
  for (int n : {1500, 600}) {
    const auto ids = RandomTokens(n, vocab_, n);
    const std::vector<float> one_shot = PrefillLogits(*engine_, ids);
    for (int chunk : {64, 100, 333, 1024}) {
      EngineOptions o;
      o.chunk_size = chunk;
      auto chunked = LoadEngine(o);
      EXPECT_LT(RelativeError(PrefillLogits(*chunked, ids), one_shot), 1e-5) << n << " tokens, chunk " << chunk;
    }
  }
}

TEST_F(EngineTest, SparsePathReallyDiffersFromDense) {
  // 900 tokens (below dense_len: dense) against the same tokens forced down the sparse path.
  const auto ids = RandomTokens(900, vocab_, 11);
  EngineOptions o;
  o.dense_as_sparse = true;
  auto sparse_engine = LoadEngine(o);
  const double diff = RelativeError(PrefillLogits(*sparse_engine, ids), PrefillLogits(*engine_, ids));
  EXPECT_GT(diff, 1e-3) << "900 tokens read 10 of 15 blocks: the outputs must differ";
  // Below selected_blocks * block_size (640) the two paths agree exactly.
  const auto short_ids = RandomTokens(640, vocab_, 12);
  EXPECT_LT(RelativeError(PrefillLogits(*sparse_engine, short_ids), PrefillLogits(*engine_, short_ids)), 1e-5);
}

TEST_F(EngineTest, TokenByTokenDecodeMatchesPrefill) {
  const auto dense_ids = RandomTokens(300, vocab_, 21);
  EXPECT_LT(RelativeError(DecodeLogits(*engine_, dense_ids), PrefillLogits(*engine_, dense_ids)), 1e-4);
  // With dense_as_sparse, decode and prefill both take the sparse path at every length.
  EngineOptions o;
  o.dense_as_sparse = true;
  auto sparse_engine = LoadEngine(o);
  const auto ids = RandomTokens(800, vocab_, 22);
  EXPECT_LT(RelativeError(DecodeLogits(*sparse_engine, ids), PrefillLogits(*sparse_engine, ids)), 1e-4);
}

TEST_F(EngineTest, DecodeAfterSparsePrefillMatchesLongerPrefill) {
  const auto ids = RandomTokens(1130, vocab_, 31);
  SequenceState s = engine_->NewSequence();
  ASSERT_TRUE(engine_->Prefill(s, std::span<const int>(ids).first(1100)).ok());
  std::vector<float> last;
  for (size_t i = 1100; i < ids.size(); ++i) {
    SequenceState* p = &s;
    auto step = engine_->Decode(std::span<SequenceState* const>(&p, 1), std::span<const int>(&ids[i], 1));
    ASSERT_TRUE(step.ok());
    last = (*step)[0];
  }
  EXPECT_LT(RelativeError(last, PrefillLogits(*engine_, ids)), 1e-4);
}

TEST_F(EngineTest, BatchedDecodeMatchesSingleSequences) {
  std::vector<SequenceState> states;
  std::vector<int> next;
  for (int n : {50, 700, 1100}) {
    SequenceState s = engine_->NewSequence();
    ASSERT_TRUE(engine_->Prefill(s, RandomTokens(n, vocab_, n)).ok());
    states.push_back(std::move(s));
    next.push_back(100 + n % 97);
  }
  std::vector<SequenceState> copies = states;
  std::vector<SequenceState*> ptrs;
  for (auto& s : states) ptrs.push_back(&s);
  auto batched = engine_->Decode(ptrs, next);
  ASSERT_TRUE(batched.ok()) << batched.status();
  for (size_t i = 0; i < copies.size(); ++i) {
    SequenceState* p = &copies[i];
    auto single = engine_->Decode(std::span<SequenceState* const>(&p, 1), std::span<const int>(&next[i], 1));
    ASSERT_TRUE(single.ok());
    EXPECT_LT(RelativeError((*batched)[i], (*single)[0]), 1e-6) << "sequence " << i;
    EXPECT_EQ(states[i].tokens, copies[i].tokens);
  }
}

TEST_F(EngineTest, TransferredStateContinuesWithIdenticalTokens) {
  // Ship the state the way a prefill worker does: blocks after every chunk, the rest at the end.
  EngineOptions o;
  o.chunk_size = 256;
  auto prefill = LoadEngine(o);
  const auto ids = RandomTokens(1200, vocab_, 41);
  SequenceState s = prefill->NewSequence();
  StateWriter writer(prefill->config(), int64_t(ids.size()));
  std::string wire = writer.Header();
  int chunks = 0;
  auto logits = prefill->Prefill(s, ids, [&](const SequenceState& st) {
    wire += writer.SparseDelta(st, /*final=*/false);
    ++chunks;
    return absl::OkStatus();
  });
  ASSERT_TRUE(logits.ok());
  EXPECT_EQ(chunks, 5);
  wire += writer.SparseDelta(s, /*final=*/true);
  wire += writer.LinearStates(s);
  wire += writer.Commit(s);

  auto decode = LoadEngine();
  auto received = StateReader::DeserializeAll(decode->config(), wire);
  ASSERT_TRUE(received.ok()) << received.status();
  SamplingParams greedy;
  greedy.temperature = 0;
  greedy.max_new_tokens = 16;
  greedy.ignore_eos = true;
  auto here = prefill->GenerateFrom(s, *logits, greedy);
  auto there = decode->GenerateFrom(*received, *logits, greedy);
  ASSERT_TRUE(here.ok() && there.ok());
  EXPECT_EQ(here->tokens.size(), 16u);
  EXPECT_EQ(here->tokens, there->tokens);
}

TEST_F(EngineTest, HostStatesHaveNoDeviceSpans) {
  // GPU-to-GPU transfer needs device memory; the CPU backend says so instead of pretending.
  SequenceState s = engine_->NewSequence();
  ASSERT_TRUE(engine_->Prefill(s, RandomTokens(40, vocab_, 5)).ok());
  EXPECT_TRUE(engine_->backend().Reserve(s, 100).ok());
  auto spans = engine_->backend().StateSpans(s, 0, s.tokens, true, false);
  EXPECT_EQ(spans.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(s.tokens, 40);
}

TEST_F(EngineTest, GenerateIsDeterministicAndHonoursLimits) {
  const std::vector<int> prompt = engine_->tokenizer().EncodePrompt("The decode worker joins the new sequence");
  SamplingParams p;
  p.seed = 5;
  p.max_new_tokens = 12;
  p.ignore_eos = true;
  auto a = engine_->Generate(prompt, p);
  auto b = engine_->Generate(prompt, p);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ(a->tokens, b->tokens);
  EXPECT_EQ(a->tokens.size(), 12u);
  EXPECT_EQ(a->finish_reason, FinishReason::kLength);
  EXPECT_EQ(a->prompt_tokens, int64_t(prompt.size()));
  // Making the first sampled token a stop token ends generation at once.
  p.stop_token_ids = {a->tokens[0]};
  p.ignore_eos = false;
  auto c = engine_->Generate(prompt, p);
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->tokens.empty());
  EXPECT_EQ(c->finish_reason, FinishReason::kStop);
}

TEST_F(EngineTest, RefusesBadRequests) {
  SequenceState s = engine_->NewSequence();
  auto empty = engine_->Prefill(s, std::vector<int>{});
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  auto bad_id = engine_->Prefill(s, std::vector<int>{1, vocab_});
  EXPECT_EQ(bad_id.status().code(), absl::StatusCode::kInvalidArgument);
  auto negative = engine_->Prefill(s, std::vector<int>{1, -3});
  EXPECT_EQ(negative.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(s.tokens, 0) << "a refused prompt must leave the state alone";
  EngineOptions o;
  o.max_context_tokens = 100;
  auto small = LoadEngine(o);
  auto too_long = small->Prefill(s, RandomTokens(101, vocab_, 1));
  EXPECT_EQ(too_long.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(too_long.status().message().find("maximum context of 100"), std::string::npos);
  SamplingParams p;
  p.top_p = 2;
  EXPECT_EQ(engine_->Generate(std::vector<int>{1, 5}, p).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(EngineLoadTest, RefusesBrokenModelDirectories) {
  SALA_REQUIRE_TEST_MODEL();
  EXPECT_EQ(Engine::Load("/nonexistent", {}).status().code(), absl::StatusCode::kNotFound);
  {
    // Control: an untouched copy loads, so the failures below come from the damage.
    auto e = Engine::Load(testing::CopyOfTestModel("control"), {});
    EXPECT_TRUE(e.ok()) << e.status();
  }
  {
    const std::string dir = testing::CopyOfTestModel("noconfig");
    std::filesystem::remove(dir + "/config.json");
    EXPECT_EQ(Engine::Load(dir, {}).status().code(), absl::StatusCode::kNotFound);
  }
  {
    const std::string dir = testing::CopyOfTestModel("badconfig");
    testing::WriteAll(dir + "/config.json", "{\"model_type\": \"minicpm_sala\", \"hidden_size\": 256");
    auto e = Engine::Load(dir, {});
    EXPECT_EQ(e.status().code(), absl::StatusCode::kInvalidArgument);
  }
  {
    const std::string dir = testing::CopyOfTestModel("truncated");
    const std::string w = testing::ReadAll(dir + "/model.safetensors");
    testing::WriteAll(dir + "/model.safetensors", w.substr(0, w.size() - 1000));
    auto e = Engine::Load(dir, {});
    ASSERT_FALSE(e.ok());
    EXPECT_NE(e.status().message().find("truncated"), std::string::npos) << e.status();
  }
  {
    const std::string dir = testing::CopyOfTestModel("notokenizer");
    testing::WriteAll(dir + "/tokenizer.model", "garbage");
    EXPECT_FALSE(Engine::Load(dir, {}).ok());
  }
  EngineOptions o;
  {
    // chunk_size 0 (the default) stands for the backend's chunk, which options() then shows.
    auto e = Engine::Load(testing::TestModelDir(), o);
    ASSERT_TRUE(e.ok()) << e.status();
    EXPECT_EQ((*e)->options().chunk_size, 8192);
  }
  o.chunk_size = -1;
  EXPECT_EQ(Engine::Load(testing::TestModelDir(), o).status().code(), absl::StatusCode::kInvalidArgument);
  o = {};
  o.backend = "tpu";
  EXPECT_EQ(Engine::Load(testing::TestModelDir(), o).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sala

// The CUDA engine end to end against the CPU engine on the built-in model.
#include <cuda_runtime.h>

#include <random>

#include "cuda/cuda_common.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "sala/engine.h"
#include "sala/state_serialization.h"

namespace sala {
namespace {

std::unique_ptr<Engine> Load(const std::string& backend, int chunk = 512, bool cuda_graphs = true) {
  const char* dir = std::getenv("SALA_TEST_MODEL");
  EngineOptions o;
  o.backend = backend;
  o.chunk_size = chunk;
  o.cuda_graphs = cuda_graphs;
  auto e = Engine::Load(dir ? dir : "", o);
  EXPECT_TRUE(e.ok()) << e.status();
  return e.ok() ? std::move(*e) : nullptr;
}

std::vector<int> Tokens(int n, uint32_t seed) {
  std::mt19937 rng(seed);
  std::vector<int> ids(n);
  for (int& t : ids) t = 3 + int(rng() % 1000);
  return ids;
}

class EngineGpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
    cpu_ = Load("cpu");
    gpu_ = Load("cuda");
    ASSERT_TRUE(cpu_ && gpu_);
  }
  // Three GPU sequences of different lengths (dense and sparse), prefilled from `seed` prompts;
  // the second needs a fresh KV page after 8 decode steps, which lands after the others' pages.
  std::vector<SequenceState> PrefilledBatch(uint32_t seed) { return PrefilledBatch(*gpu_, seed); }
  static std::vector<SequenceState> PrefilledBatch(Engine& e, uint32_t seed) {
    std::vector<SequenceState> states;
    for (int n : {50, 760, 1100}) {
      states.push_back(e.NewSequence());
      EXPECT_TRUE(e.Prefill(states.back(), Tokens(n, seed * n)).ok());
    }
    return states;
  }
  static std::vector<SequenceState*> Pointers(std::vector<SequenceState>& states) {
    std::vector<SequenceState*> ptrs;
    for (auto& s : states) ptrs.push_back(&s);
    return ptrs;
  }
  std::unique_ptr<Engine> cpu_, gpu_;
};

TEST_F(EngineGpuTest, PrefillLogitsMatchCpu) {
  for (int n : {1, 700, 1024, 2500}) {  // dense, at dense_len, sparse
    const auto ids = Tokens(n, n);
    SequenceState a = cpu_->NewSequence(), b = gpu_->NewSequence();
    auto lc = cpu_->Prefill(a, ids);
    auto lg = gpu_->Prefill(b, ids);
    ASSERT_TRUE(lc.ok() && lg.ok()) << lg.status();
    const double err = testing::RelativeError(*lg, *lc);
    std::printf("%d tokens: GPU vs CPU logits max relative error %.3e\n", n, err);
    EXPECT_LT(err, 2e-2) << n << " tokens";
  }
}

TEST_F(EngineGpuTest, GreedyDecodingGivesTheSameFirst32Tokens) {
  SamplingParams greedy;
  greedy.temperature = 0;
  greedy.max_new_tokens = 32;
  greedy.ignore_eos = true;
  for (int n : {300, 1500}) {
    const auto prompt = Tokens(n, 100 + n);
    auto c = cpu_->Generate(prompt, greedy);
    auto g = gpu_->Generate(prompt, greedy);
    ASSERT_TRUE(c.ok() && g.ok()) << g.status();
    EXPECT_EQ(g->tokens, c->tokens) << n << "-token prompt";
  }
}

TEST_F(EngineGpuTest, BatchedDecodeMatchesSingleSequences) {
  std::vector<SequenceState> states = PrefilledBatch(7);
  ASSERT_FALSE(HasFailure());
  std::vector<SequenceState> copies = states;
  const std::vector<int> next{11, 22, 33};
  auto batched = gpu_->Decode(Pointers(states), next);
  ASSERT_TRUE(batched.ok()) << batched.status();
  for (size_t i = 0; i < copies.size(); ++i) {
    SequenceState* p = &copies[i];
    auto single = gpu_->Decode(std::span<SequenceState* const>(&p, 1), std::span<const int>(&next[i], 1));
    ASSERT_TRUE(single.ok());
    EXPECT_LT(testing::RelativeError((*batched)[i], (*single)[0]), 1e-5) << i;
  }
}

// Decode steps replayed from captured graphs (two batch sizes, each captured once and replayed
// while the page tables and compressed keys grow and move) give the very logits of kernels
// launched one by one.
TEST_F(EngineGpuTest, DecodeGraphsGiveTheLogitsOfEagerLaunches) {
  std::unique_ptr<Engine> eager = Load("cuda", 512, /*cuda_graphs=*/false);
  ASSERT_TRUE(eager);
  std::vector<SequenceState> a = PrefilledBatch(*gpu_, 5), b = PrefilledBatch(*eager, 5);
  ASSERT_FALSE(HasFailure());
  for (int step = 0; step < 48; ++step) {
    const size_t B = step < 40 ? 3 : 2;
    std::vector<SequenceState*> pa, pb;
    for (size_t i = 0; i < B; ++i) pa.push_back(&a[i]), pb.push_back(&b[i]);
    const std::vector<int> next(B, 7 + step);
    auto graphed = gpu_->Decode(pa, next);
    auto launched = eager->Decode(pb, next);
    ASSERT_TRUE(graphed.ok() && launched.ok()) << graphed.status() << launched.status();
    for (size_t i = 0; i < B; ++i) ASSERT_EQ((*graphed)[i], (*launched)[i]) << "step " << step << " row " << i;
  }
  EXPECT_EQ(a[0].tokens, b[0].tokens);
}

TEST_F(EngineGpuTest, TokensDrawnOnTheDeviceMatchTheCpuDrawFromTheSameLogits) {
  std::vector<SequenceState> states = PrefilledBatch(3);
  ASSERT_FALSE(HasFailure());
  std::vector<SequenceState> copies = states;
  const std::vector<int> next{11, 22, 33};
  const std::vector<TokenDraw> draws{{0.0f, 0, 1.0f, 0.5}, {0.8f, 0, 1.0f, 0.3}, {1.0f, 20, 0.9f, 0.7}};
  auto drawn = gpu_->DecodeAndDraw(Pointers(states), next, draws);
  auto logits = gpu_->Decode(Pointers(copies), next);
  ASSERT_TRUE(drawn.ok() && logits.ok()) << drawn.status();
  for (size_t i = 0; i < draws.size(); ++i) EXPECT_EQ((*drawn)[i], DrawToken((*logits)[i], draws[i])) << i;
  EXPECT_EQ(states[0].tokens, copies[0].tokens);
}

TEST_F(EngineGpuTest, TransferredStateContinuesIdentically) {
  // Prefill on the GPU, ship the state chunk by chunk as the prefill worker does, and continue
  // it on another GPU engine (identical tokens) and on the CPU engine (same first-step logits).
  auto prefill = Load("cuda", 256);
  const auto ids = Tokens(1200, 41);
  SequenceState s = prefill->NewSequence();
  StateWriter writer(prefill->config(), int64_t(ids.size()), DType::kBF16);
  std::string wire = writer.Header();
  auto logits = prefill->Prefill(s, ids, [&](const SequenceState&) {
    EXPECT_TRUE(prefill->SyncToHost(s, false).ok());
    wire += writer.SparseDelta(s, false);
    return absl::OkStatus();
  });
  ASSERT_TRUE(logits.ok()) << logits.status();
  ASSERT_TRUE(prefill->SyncToHost(s, true).ok());
  // Separate statements: the commit's checksum covers what was written before it.
  wire += writer.SparseDelta(s, true);
  wire += writer.LinearStates(s);
  wire += writer.Commit(s);
  SamplingParams greedy;
  greedy.temperature = 0;
  greedy.max_new_tokens = 16;
  greedy.ignore_eos = true;
  auto on_gpu = StateReader::DeserializeAll(gpu_->config(), wire);
  ASSERT_TRUE(on_gpu.ok()) << on_gpu.status();
  SequenceState on_cpu = *on_gpu;
  auto here = prefill->GenerateFrom(s, *logits, greedy);
  auto there = gpu_->GenerateFrom(*on_gpu, *logits, greedy);
  ASSERT_TRUE(here.ok() && there.ok()) << there.status();
  EXPECT_EQ(here->tokens, there->tokens);
  SequenceState* p = &on_cpu;
  const int next = here->tokens[0];
  auto cpu_step = cpu_->Decode(std::span<SequenceState* const>(&p, 1), std::span<const int>(&next, 1));
  SequenceState again = *StateReader::DeserializeAll(gpu_->config(), wire);
  SequenceState* q = &again;
  auto gpu_step = gpu_->Decode(std::span<SequenceState* const>(&q, 1), std::span<const int>(&next, 1));
  ASSERT_TRUE(cpu_step.ok() && gpu_step.ok());
  EXPECT_LT(testing::RelativeError((*gpu_step)[0], (*cpu_step)[0]), 2e-2);
}

TEST_F(EngineGpuTest, StateMovedSpanBySpanContinuesIdentically) {
  // What the NCCL transport does, with a device copy for the wire: the prefill side lists the
  // spans each chunk added, the receiving engine lists the same spans of a fresh state, and
  // the bytes go one to one. The received state must decode exactly like the original.
  auto prefill = Load("cuda", 256);
  const auto ids = Tokens(1300, 43);  // partial last chunk and block
  SequenceState s = prefill->NewSequence();
  SequenceState received = gpu_->NewSequence();
  ASSERT_TRUE(gpu_->backend().Reserve(received, int64_t(ids.size()) + 16).ok());
  int64_t sent = 0;
  auto move = [&](bool linear) {
    auto from = prefill->backend().StateSpans(s, sent, s.tokens, linear, /*receive=*/false);
    auto to = gpu_->backend().StateSpans(received, sent, s.tokens, linear, /*receive=*/true);
    ASSERT_TRUE(from.ok() && to.ok()) << from.status() << to.status();
    ASSERT_EQ(from->size(), to->size());
    for (size_t i = 0; i < from->size(); ++i) {
      ASSERT_EQ((*from)[i].bytes, (*to)[i].bytes);
      ASSERT_EQ(cudaMemset((*to)[i].data, 0xff, (*to)[i].bytes), cudaSuccess);  // poisoned
      ASSERT_EQ(cudaMemcpy((*to)[i].data, (*from)[i].data, (*from)[i].bytes, cudaMemcpyDeviceToDevice), cudaSuccess);
    }
    sent = s.tokens;
  };
  auto logits = prefill->Prefill(s, ids, [&](const SequenceState&) {
    move(false);
    return absl::OkStatus();
  });
  ASSERT_TRUE(logits.ok()) << logits.status();
  move(true);
  EXPECT_EQ(received.tokens, s.tokens);
  // A sender cannot list rows it has not computed; a receiver must continue where it stands.
  EXPECT_FALSE(prefill->backend().StateSpans(s, 0, s.tokens + 1, false, false).ok());
  EXPECT_FALSE(gpu_->backend().StateSpans(received, 5, s.tokens + 1, false, true).ok());
  SamplingParams greedy;
  greedy.temperature = 0;
  greedy.max_new_tokens = 24;
  greedy.ignore_eos = true;
  auto here = prefill->GenerateFrom(s, *logits, greedy);
  auto there = gpu_->GenerateFrom(received, *logits, greedy);
  ASSERT_TRUE(here.ok() && there.ok()) << there.status();
  EXPECT_EQ(here->tokens, there->tokens);
}

TEST_F(EngineGpuTest, ChunkedPrefillMatchesOneShot) {
  const auto ids = Tokens(1800, 5);
  auto chunked = Load("cuda", 333);
  SequenceState a = gpu_->NewSequence(), b = chunked->NewSequence();
  auto one = Load("cuda", 8192)->Prefill(a, ids);
  auto many = chunked->Prefill(b, ids);
  ASSERT_TRUE(one.ok() && many.ok());
  // bf16 level: cuBLASLt picks its algorithm by row count, which may flip an activation's rounding.
  EXPECT_LT(testing::RelativeError(*many, *one), 1e-2);
}

TEST_F(EngineGpuTest, DefaultChunkIsWholeWavesNear8192) {
  auto e = Load("cuda", 0);
  ASSERT_TRUE(e);
  const int chunk = e->options().chunk_size;
  auto sms = cuda::MultiprocessorCount();
  ASSERT_TRUE(sms.ok());
  EXPECT_EQ(chunk % (64 * *sms), 0) << chunk << " tokens on " << *sms << " SMs";
  EXPECT_LE(std::abs(chunk - 8192), 32 * *sms) << chunk;
}

}  // namespace
}  // namespace sala

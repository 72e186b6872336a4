// The engine facade: a model, its tokenizer and a backend; chunked prefill, batched decode
// and a generation loop. Knows nothing of RPC.
#pragma once

#include <functional>
#include <memory>
#include <optional>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sala/backend.h"
#include "sala/config.h"
#include "sala/sampling.h"
#include "sala/sequence_state.h"
#include "sala/tokenizer.h"

namespace sala {

struct EngineOptions {
  std::string backend = "cpu";
  int chunk_size = 0;            // prefill chunk, tokens (0: the backend's PreferredChunkTokens())
  bool dense_as_sparse = false;  // every length takes the sparse path (dense_len = 0)
  int64_t max_context_tokens = 0;  // 0: the config's max_position_embeddings
  // Random weights generated on the device from this seed instead of the checkpoint (CUDA only):
  // the 9B shape can then run from its config.json alone. The tokenizer is optional then.
  std::optional<uint64_t> random_weights_seed;
  bool cuda_graphs = true;  // CUDA: decode steps replayed from captured graphs (false: launched one by one)
};

enum class FinishReason { kStop, kLength };
const char* FinishReasonName(FinishReason r);

struct GenerationResult {
  std::vector<int> tokens;  // generated, stop token excluded
  FinishReason finish_reason = FinishReason::kLength;
  int64_t prompt_tokens = 0;
  double ttft_seconds = 0;    // prompt in, first token sampled
  double decode_seconds = 0;  // the rest
  std::vector<float> prompt_logits;  // last prompt position
};

class Engine {
 public:
  static absl::StatusOr<std::unique_ptr<Engine>> Load(const std::string& model_dir,
                                                      const EngineOptions& options);

  const ModelConfig& config() const { return config_; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }
  bool has_tokenizer() const { return tokenizer_ != nullptr; }
  Backend& backend() { return *backend_; }
  const EngineOptions& options() const { return options_; }
  int64_t max_context_tokens() const;

  SequenceState NewSequence() const { return SequenceState::Empty(config_); }
  // Dense or sparse attention for a pass that brings a sequence to `final_tokens`.
  bool UseSparse(int64_t final_tokens) const;

  // Appends `tokens` to `state` in chunks of options().chunk_size and returns the logits of
  // the last one. `after_chunk` runs after each chunk (the prefill worker ships blocks there).
  using ChunkCallback = std::function<absl::Status(const SequenceState&)>;
  absl::StatusOr<std::vector<float>> Prefill(SequenceState& state, std::span<const int> tokens,
                                             const ChunkCallback& after_chunk = {});

  // One token for each sequence; returns their logits.
  absl::StatusOr<std::vector<std::vector<float>>> Decode(std::span<SequenceState* const> states,
                                                         std::span<const int> tokens);
  // One token for each sequence; returns the next tokens, drawn where the logits are
  // (draws[i] for sequence i, from its Sampler).
  absl::StatusOr<std::vector<int>> DecodeAndDraw(std::span<SequenceState* const> states, std::span<const int> tokens,
                                                 std::span<const TokenDraw> draws);

  // Prefill + sampling loop. `on_token` sees every generated token; returning false stops.
  using TokenCallback = std::function<bool(int token)>;
  absl::StatusOr<GenerationResult> Generate(std::span<const int> prompt, const SamplingParams& params,
                                            const TokenCallback& on_token = {});
  // Continues `state` (already holding the prompt) from `first_logits`.
  absl::StatusOr<GenerationResult> GenerateFrom(SequenceState& state, std::vector<float> first_logits,
                                                const SamplingParams& params,
                                                const TokenCallback& on_token = {});

  bool IsStopToken(int token, const SamplingParams& params) const;

  // Makes the host fields of `state` current (see Backend::SyncToHost) before serialising it.
  absl::Status SyncToHost(SequenceState& state, bool linear) { return backend_->SyncToHost(state, linear); }

 private:
  Engine() = default;
  absl::Status CheckTokens(std::span<const int> tokens) const;
  // Replaces chunk_size 0 by the backend's choice, so that options() shows the chunk in use.
  void ResolveChunkSize();
  // A decode step's checks; the dense/sparse choice per sequence.
  absl::StatusOr<std::unique_ptr<bool[]>> DecodeChoices(std::span<SequenceState* const> states,
                                                        std::span<const int> tokens) const;
  ModelConfig config_;
  EngineOptions options_;
  std::unique_ptr<Tokenizer> tokenizer_;
  std::unique_ptr<Backend> backend_;
};

}  // namespace sala

#include "sala/engine.h"

#include <algorithm>
#include <chrono>
#include <filesystem>

#include "absl/strings/str_cat.h"
#include "sala/safetensors.h"
#include "sala/status_macros.h"

namespace sala {
namespace {

double Seconds(std::chrono::steady_clock::time_point since) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - since).count();
}

}  // namespace

const char* FinishReasonName(FinishReason r) { return r == FinishReason::kStop ? "stop" : "length"; }

absl::StatusOr<std::unique_ptr<Engine>> Engine::Load(const std::string& model_dir,
                                                     const EngineOptions& options) {
  if (options.chunk_size < 0)
    return absl::InvalidArgumentError(
        absl::StrCat("chunk size must be positive (or 0 for the backend's choice), got ", options.chunk_size));
  if (options.max_context_tokens < 0)
    return absl::InvalidArgumentError("max context tokens must not be negative");
  std::unique_ptr<Engine> e(new Engine());
  e->options_ = options;
  SALA_ASSIGN_OR_RETURN(e->config_, LoadModelConfig(model_dir));
  if (options.random_weights_seed && !std::filesystem::exists(model_dir + "/tokenizer.model")) {
    // Random-weight runs (benchmarks of the 9B shape) work on token ids alone.
  } else {
    SALA_ASSIGN_OR_RETURN(e->tokenizer_, Tokenizer::Load(model_dir));
  }
  if (e->tokenizer_ && e->tokenizer_->vocab_size() > e->config_.vocab_size)
    return absl::InvalidArgumentError(absl::StrCat(
        model_dir, ": tokenizer has ", e->tokenizer_->vocab_size(), " ids but vocab_size is ",
        e->config_.vocab_size));
  if (options.random_weights_seed) {
    if (options.backend != "cuda")
      return absl::InvalidArgumentError("random weights are generated on the GPU: use the cuda backend");
#ifdef SALA_HAVE_CUDA
    SALA_ASSIGN_OR_RETURN(e->backend_, MakeCudaBackendWithRandomWeights(e->config_, *options.random_weights_seed, options.cuda_graphs));
    e->ResolveChunkSize();
    return e;
#else
    return absl::FailedPreconditionError("this build has no CUDA backend (configure with nvcc present)");
#endif
  }
  SALA_ASSIGN_OR_RETURN(auto checkpoint, Checkpoint::Open(model_dir));
  if (options.backend == "cpu") {
    SALA_ASSIGN_OR_RETURN(e->backend_, MakeCpuBackend(e->config_, *checkpoint));
  } else if (options.backend == "cuda") {
#ifdef SALA_HAVE_CUDA
    SALA_ASSIGN_OR_RETURN(e->backend_, MakeCudaBackend(e->config_, *checkpoint, options.cuda_graphs));
#else
    return absl::FailedPreconditionError("this build has no CUDA backend (configure with nvcc present)");
#endif
  } else {
    return absl::InvalidArgumentError(absl::StrCat("unknown backend '", options.backend, "' (have: cpu, cuda)"));
  }
  e->ResolveChunkSize();
  return e;
}

void Engine::ResolveChunkSize() {
  if (options_.chunk_size == 0) options_.chunk_size = backend_->PreferredChunkTokens();
}

int64_t Engine::max_context_tokens() const {
  return options_.max_context_tokens > 0 ? options_.max_context_tokens : config_.max_position_embeddings;
}

bool Engine::UseSparse(int64_t final_tokens) const {
  return options_.dense_as_sparse || final_tokens >= config_.sparse.dense_len;
}

absl::Status Engine::CheckTokens(std::span<const int> tokens) const {
  for (size_t i = 0; i < tokens.size(); ++i)
    if (tokens[i] < 0 || tokens[i] >= config_.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("token id ", tokens[i], " at position ", i,
                                                     " is outside the vocabulary [0, ", config_.vocab_size, ")"));
  return absl::OkStatus();
}

absl::StatusOr<std::vector<float>> Engine::Prefill(SequenceState& state, std::span<const int> tokens,
                                                   const ChunkCallback& after_chunk) {
  if (tokens.empty()) return absl::InvalidArgumentError("prompt is empty");
  SALA_RETURN_IF_ERROR(CheckTokens(tokens));
  const int64_t final_tokens = state.tokens + int64_t(tokens.size());
  if (final_tokens > max_context_tokens())
    return absl::InvalidArgumentError(absl::StrCat(
        "prompt of ", tokens.size(), " tokens (", final_tokens, " with the session's history) exceeds the maximum context of ",
        max_context_tokens(), " tokens"));
  // One dense/sparse decision for the whole prompt, so chunking cannot change the result.
  const bool sparse = UseSparse(final_tokens);
  // Room for the whole prompt at once: no reallocation under blocks being shipped.
  SALA_RETURN_IF_ERROR(backend_->Reserve(state, final_tokens));
  std::vector<float> logits;
  for (size_t begin = 0; begin < tokens.size(); begin += options_.chunk_size) {
    const size_t n = std::min<size_t>(options_.chunk_size, tokens.size() - begin);
    const auto chunk = tokens.subspan(begin, n);
    if (begin + n < tokens.size()) {
      SALA_RETURN_IF_ERROR(backend_->Append(state, chunk, sparse));
    } else {
      SALA_ASSIGN_OR_RETURN(logits, backend_->Forward(state, chunk, sparse));
    }
    if (after_chunk) SALA_RETURN_IF_ERROR(after_chunk(state));
  }
  return logits;
}

absl::StatusOr<std::unique_ptr<bool[]>> Engine::DecodeChoices(std::span<SequenceState* const> states,
                                                              std::span<const int> tokens) const {
  if (states.size() != tokens.size())
    return absl::InvalidArgumentError("decode: one token per sequence is needed");
  SALA_RETURN_IF_ERROR(CheckTokens(tokens));
  std::unique_ptr<bool[]> sparse(new bool[states.size()]);  // std::vector<bool> has no span
  for (size_t i = 0; i < states.size(); ++i) {
    if (states[i]->tokens + 1 > max_context_tokens())
      return absl::OutOfRangeError(absl::StrCat("sequence reached the maximum context of ",
                                                max_context_tokens(), " tokens"));
    sparse[i] = UseSparse(states[i]->tokens + 1);
  }
  return sparse;
}

absl::StatusOr<std::vector<std::vector<float>>> Engine::Decode(std::span<SequenceState* const> states,
                                                               std::span<const int> tokens) {
  SALA_ASSIGN_OR_RETURN(std::unique_ptr<bool[]> sparse, DecodeChoices(states, tokens));
  return backend_->DecodeStep(states, tokens, std::span<const bool>(sparse.get(), states.size()));
}

absl::StatusOr<std::vector<int>> Engine::DecodeAndDraw(std::span<SequenceState* const> states,
                                                       std::span<const int> tokens, std::span<const TokenDraw> draws) {
  if (draws.size() != states.size()) return absl::InvalidArgumentError("decode: one draw per sequence is needed");
  SALA_ASSIGN_OR_RETURN(std::unique_ptr<bool[]> sparse, DecodeChoices(states, tokens));
  return backend_->DecodeStepAndDraw(states, tokens, std::span<const bool>(sparse.get(), states.size()), draws);
}

bool Engine::IsStopToken(int token, const SamplingParams& params) const {
  if (!params.ignore_eos &&
      std::find(config_.eos_token_ids.begin(), config_.eos_token_ids.end(), token) != config_.eos_token_ids.end())
    return true;
  return std::find(params.stop_token_ids.begin(), params.stop_token_ids.end(), token) != params.stop_token_ids.end();
}

absl::StatusOr<GenerationResult> Engine::Generate(std::span<const int> prompt, const SamplingParams& params,
                                                  const TokenCallback& on_token) {
  SALA_RETURN_IF_ERROR(ValidateSamplingParams(params, config_.vocab_size));
  const auto start = std::chrono::steady_clock::now();
  SequenceState state = NewSequence();
  SALA_ASSIGN_OR_RETURN(std::vector<float> logits, Prefill(state, prompt));
  SALA_ASSIGN_OR_RETURN(GenerationResult result, GenerateFrom(state, std::move(logits), params, on_token));
  result.ttft_seconds = Seconds(start) - result.decode_seconds;  // prefill + first sample
  return result;
}

absl::StatusOr<GenerationResult> Engine::GenerateFrom(SequenceState& state, std::vector<float> logits,
                                                      const SamplingParams& params,
                                                      const TokenCallback& on_token) {
  SALA_RETURN_IF_ERROR(ValidateSamplingParams(params, config_.vocab_size));
  GenerationResult result;
  result.prompt_tokens = state.tokens;
  result.prompt_logits = logits;
  Sampler sampler(params);
  const auto start = std::chrono::steady_clock::now();
  int token = sampler.Sample(logits);
  for (int step = 0; step < params.max_new_tokens; ++step) {
    if (step == 0) result.ttft_seconds = Seconds(start);
    if (IsStopToken(token, params)) {
      result.finish_reason = FinishReason::kStop;
      break;
    }
    result.tokens.push_back(token);
    if (on_token && !on_token(token)) {
      result.finish_reason = FinishReason::kStop;
      break;
    }
    if (step + 1 == params.max_new_tokens) break;
    SequenceState* s = &state;
    const TokenDraw draw = sampler.Next();
    SALA_ASSIGN_OR_RETURN(std::vector<int> next, DecodeAndDraw(std::span<SequenceState* const>(&s, 1),
                                                               std::span<const int>(&token, 1),
                                                               std::span<const TokenDraw>(&draw, 1)));
    token = next[0];
  }
  result.decode_seconds = Seconds(start) - result.ttft_seconds;
  return result;
}

}  // namespace sala

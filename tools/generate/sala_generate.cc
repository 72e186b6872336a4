// sala-generate: runs one prompt through the engine and streams the answer.
#include <fstream>
#include <iostream>
#include <sstream>
#include <string>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_split.h"
#include "cli.h"
#include "nlohmann/json.hpp"
#include "sala/engine.h"
#include "sala/status_macros.h"

ABSL_FLAG(std::string, model, "", "model directory (config.json, safetensors, tokenizer.model)");
ABSL_FLAG(std::string, prompt, "", "prompt text (a plain completion prompt, BOS added)");
ABSL_FLAG(std::string, prompt_file, "", "read the prompt text from this file ('-' = stdin)");
ABSL_FLAG(std::string, chat, "", "one user message, wrapped in the ChatML template");
ABSL_FLAG(std::string, system, "", "system message for --chat");
ABSL_FLAG(std::string, messages_file, "",
          "chat messages as JSON: [{\"role\": \"user\", \"content\": \"...\"}, ...]");
ABSL_FLAG(std::string, token_ids, "", "raw prompt token ids, comma-separated (no BOS added)");
ABSL_FLAG(std::string, token_ids_file, "", "raw prompt token ids, whitespace- or comma-separated");
ABSL_FLAG(int, max_new_tokens, 128, "tokens to generate at most (0: prefill only)");
ABSL_FLAG(double, temperature, 0.9, "sampling temperature (0 = greedy)");
ABSL_FLAG(bool, greedy, false, "same as --temperature=0");
ABSL_FLAG(int, top_k, 0, "sample among the k most likely tokens (0 = all)");
ABSL_FLAG(double, top_p, 1.0, "sample within this probability mass");
ABSL_FLAG(int64_t, seed, -1, "random seed (-1: random)");
ABSL_FLAG(bool, ignore_eos, false, "do not stop at the model's end-of-sequence tokens");
ABSL_FLAG(int, chunk_size, 0, "prefill chunk, tokens (0: the backend's choice: 8192 on the CPU, on a GPU 8192 rounded to 64 rows an SM, 8448 on an H100/H200)");
ABSL_FLAG(bool, dense_as_sparse, false, "send every length down the sparse attention path");
ABSL_FLAG(int64_t, max_context, 0, "maximum context in tokens (0: the model's max_position_embeddings)");
ABSL_FLAG(std::string, backend, "cpu", "compute backend");
ABSL_FLAG(bool, cuda_graphs, true,
          "CUDA backend: replay decode steps from captured CUDA graphs (false: launch their kernels one by one)");
ABSL_FLAG(int64_t, random_weights_seed, -1,
          "draw the weights on the GPU from this seed instead of reading the checkpoint (cuda backend); "
          "-1: read the checkpoint");
ABSL_FLAG(std::string, logits_out, "", "write the last prompt position's logits here (float32 .npy)");
ABSL_FLAG(std::string, json_out, "", "write the result (token ids, text, timings) here as JSON");
ABSL_FLAG(bool, quiet, false, "do not stream the generated text");

namespace {

absl::StatusOr<std::vector<int>> PromptTokens(const sala::Tokenizer& tok) {
  int sources = 0;
  for (const std::string& f : {absl::GetFlag(FLAGS_prompt), absl::GetFlag(FLAGS_prompt_file), absl::GetFlag(FLAGS_chat),
                               absl::GetFlag(FLAGS_messages_file), absl::GetFlag(FLAGS_token_ids),
                               absl::GetFlag(FLAGS_token_ids_file)})
    sources += !f.empty();
  if (sources != 1)
    return absl::InvalidArgumentError(
        "give exactly one of --prompt, --prompt_file, --chat, --messages_file, --token_ids, --token_ids_file");
  if (!absl::GetFlag(FLAGS_prompt).empty()) return tok.EncodePrompt(absl::GetFlag(FLAGS_prompt));
  if (!absl::GetFlag(FLAGS_prompt_file).empty()) {
    SALA_ASSIGN_OR_RETURN(std::string text, sala::tools::ReadFile(absl::GetFlag(FLAGS_prompt_file)));
    return tok.EncodePrompt(text);
  }
  if (!absl::GetFlag(FLAGS_chat).empty()) {
    std::vector<sala::ChatMessage> msgs;
    if (!absl::GetFlag(FLAGS_system).empty()) msgs.push_back({"system", absl::GetFlag(FLAGS_system)});
    msgs.push_back({"user", absl::GetFlag(FLAGS_chat)});
    return tok.EncodeChat(msgs);
  }
  if (!absl::GetFlag(FLAGS_messages_file).empty()) {
    SALA_ASSIGN_OR_RETURN(std::string text, sala::tools::ReadFile(absl::GetFlag(FLAGS_messages_file)));
    auto j = nlohmann::json::parse(text, nullptr, false);
    if (j.is_discarded() || !j.is_array()) return absl::InvalidArgumentError("--messages_file must hold a JSON list");
    std::vector<sala::ChatMessage> msgs;
    for (const auto& m : j) {
      if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
          !m["content"].is_string())
        return absl::InvalidArgumentError("each message needs string \"role\" and \"content\"");
      msgs.push_back({m["role"].get<std::string>(), m["content"].get<std::string>()});
    }
    return tok.EncodeChat(msgs);
  }
  if (!absl::GetFlag(FLAGS_token_ids).empty()) return sala::tools::ParseIds(absl::GetFlag(FLAGS_token_ids));
  SALA_ASSIGN_OR_RETURN(std::string text, sala::tools::ReadFile(absl::GetFlag(FLAGS_token_ids_file)));
  return sala::tools::ParseIds(text);
}

absl::Status Run() {
  if (absl::GetFlag(FLAGS_model).empty()) return absl::InvalidArgumentError("--model is required");
  sala::EngineOptions options;
  options.backend = absl::GetFlag(FLAGS_backend);
  options.chunk_size = absl::GetFlag(FLAGS_chunk_size);
  options.dense_as_sparse = absl::GetFlag(FLAGS_dense_as_sparse);
  options.max_context_tokens = absl::GetFlag(FLAGS_max_context);
  options.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  if (absl::GetFlag(FLAGS_random_weights_seed) >= 0)
    options.random_weights_seed = uint64_t(absl::GetFlag(FLAGS_random_weights_seed));
  SALA_ASSIGN_OR_RETURN(auto engine, sala::Engine::Load(absl::GetFlag(FLAGS_model), options));
  SALA_ASSIGN_OR_RETURN(std::vector<int> prompt, PromptTokens(engine->tokenizer()));

  sala::SamplingParams params;
  params.temperature = absl::GetFlag(FLAGS_greedy) ? 0.0 : absl::GetFlag(FLAGS_temperature);
  params.top_k = absl::GetFlag(FLAGS_top_k);
  params.top_p = absl::GetFlag(FLAGS_top_p);
  if (absl::GetFlag(FLAGS_seed) >= 0) params.seed = uint64_t(absl::GetFlag(FLAGS_seed));
  params.max_new_tokens = absl::GetFlag(FLAGS_max_new_tokens);
  params.ignore_eos = absl::GetFlag(FLAGS_ignore_eos);

  const bool quiet = absl::GetFlag(FLAGS_quiet);
  sala::StreamDecoder decoder(engine->tokenizer());
  std::string text;
  auto on_token = [&](int token) {
    const std::string piece = decoder.Push(token);
    text += piece;
    if (!quiet) std::cout << piece << std::flush;
    return true;
  };
  SALA_ASSIGN_OR_RETURN(sala::GenerationResult result, engine->Generate(prompt, params, on_token));
  const std::string tail = decoder.Flush();
  text += tail;
  if (!quiet) std::cout << tail << "\n" << std::flush;

  if (const std::string path = absl::GetFlag(FLAGS_logits_out); !path.empty())
    if (!sala::tools::WriteNpy(path, result.prompt_logits))
      return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  const double tps = result.decode_seconds > 0 && result.tokens.size() > 1
                         ? (result.tokens.size() - 1) / result.decode_seconds : 0.0;
  if (const std::string path = absl::GetFlag(FLAGS_json_out); !path.empty()) {
    nlohmann::json j = {{"prompt_tokens", result.prompt_tokens}, {"tokens", result.tokens},
                        {"text", text}, {"finish_reason", sala::FinishReasonName(result.finish_reason)},
                        {"ttft_seconds", result.ttft_seconds}, {"decode_tokens_per_second", tps}};
    std::ofstream out(path);
    out << j.dump(2) << "\n";
    if (!out) return absl::PermissionDeniedError(absl::StrCat("cannot write ", path));
  }
  std::cerr << absl::StrFormat(
      "prompt tokens: %d | generated: %d (%s) | TTFT: %.3f s | prefill: %.0f tok/s | decode: %.1f tok/s | backend: %s\n",
      result.prompt_tokens, result.tokens.size(), sala::FinishReasonName(result.finish_reason),
      result.ttft_seconds, result.prompt_tokens / std::max(result.ttft_seconds, 1e-9), tps, options.backend);
  return absl::OkStatus();
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Runs a prompt through a MiniCPM-SALA model and streams the answer.\n"
      "  sala-generate --model=models/small --prompt='Once upon a time' --max-new-tokens=64\n"
      "  sala-generate --model=models/small --chat='Summarise this.' --greedy\n"
      "  sala-generate --model=models/small --token-ids-file=ids.txt --max-new-tokens=0 --logits-out=l.npy\n"
      "Flags may be written with dashes or underscores.");
  sala::tools::AcceptDashedFlags(argc, argv);
  sala::tools::ListOwnFlagsInHelp();
  absl::ParseCommandLine(argc, argv);
  if (absl::Status s = Run(); !s.ok()) {
    std::cerr << "sala-generate: " << s.message() << "\n";
    return s.code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  return 0;
}

// SentencePiece tokenizer with the model's added special tokens and ChatML (MODEL_SPEC §5).
#pragma once

#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace sala {

namespace spm { class Processor; }

struct ChatMessage {
  std::string role;  // system, user, assistant
  std::string content;
};

class Tokenizer {
 public:
  // Reads `tokenizer.model` and `added_tokens.json` from `model_dir`.
  static absl::StatusOr<std::unique_ptr<Tokenizer>> Load(const std::string& model_dir);
  ~Tokenizer();

  // Encodes text without BOS; occurrences of special token strings become their ids.
  std::vector<int> Encode(const std::string& text) const;
  // BOS + Encode(text): what a plain prompt becomes.
  std::vector<int> EncodePrompt(const std::string& text) const;
  // BOS + ChatML turns + the assistant header.
  absl::StatusOr<std::vector<int>> EncodeChat(const std::vector<ChatMessage>& messages) const;
  // The ChatML text of `messages` (without BOS), as chat_template.jinja renders it.
  static std::string RenderChat(const std::vector<ChatMessage>& messages);

  std::string Decode(std::span<const int> ids, bool skip_special = true) const;

  // The bytes a token stands for ("" for control tokens and, when skipping, specials).
  std::string TokenBytes(int id, bool skip_special = true) const;
  bool IsSpecial(int id) const;
  // Size of the id space the tokenizer can produce (SentencePiece pieces and added tokens).
  int vocab_size() const { return vocab_size_; }
  int bos_id() const { return 1; }
  int TokenId(const std::string& special) const;  // -1 if unknown
  // True when SentencePiece prefixes every text with a space that decoding removes.
  bool adds_dummy_prefix() const { return adds_dummy_prefix_; }

 private:
  Tokenizer() = default;
  std::unique_ptr<spm::Processor> sp_;
  std::map<std::string, int> special_;  // text -> id, added tokens and <s>, </s>
  std::map<int, std::string> special_text_;
  int vocab_size_ = 0;
  bool adds_dummy_prefix_ = false;
};

// Turns a token stream into text, emitting only complete UTF-8 characters; bytes that can
// never complete a character come out as U+FFFD.
class StreamDecoder {
 public:
  explicit StreamDecoder(const Tokenizer& tokenizer, bool skip_special = true);
  std::string Push(int id);
  std::string Flush();

 private:
  const Tokenizer& tokenizer_;
  bool skip_special_;
  bool at_start_ = true;
  std::string pending_;
};

}  // namespace sala

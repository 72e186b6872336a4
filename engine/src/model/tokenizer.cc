#include "sala/tokenizer.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "sentencepiece_bpe.h"

namespace sala {
namespace {

constexpr char kSpaceMarker[] = "\xE2\x96\x81";  // U+2581, SentencePiece's space
constexpr char kReplacement[] = "\xEF\xBF\xBD";  // U+FFFD

// Length of the UTF-8 sequence that starts with byte `c`, 0 if `c` cannot start one.
int Utf8Length(unsigned char c) {
  if (c < 0x80) return 1;
  if (c >= 0xC2 && c <= 0xDF) return 2;
  if (c >= 0xE0 && c <= 0xEF) return 3;
  if (c >= 0xF0 && c <= 0xF4) return 4;
  return 0;
}

bool IsContinuation(unsigned char c) { return (c & 0xC0) == 0x80; }

// Moves the complete, valid characters at the front of `pending` to the result; invalid
// bytes become U+FFFD; a valid but unfinished tail stays (unless `flush`).
std::string TakeComplete(std::string& pending, bool flush) {
  std::string out;
  size_t i = 0;
  while (i < pending.size()) {
    const auto c = static_cast<unsigned char>(pending[i]);
    const int len = Utf8Length(c);
    if (len == 0) { out += kReplacement; ++i; continue; }
    size_t have = 1;
    while (have < size_t(len) && i + have < pending.size() &&
           IsContinuation(static_cast<unsigned char>(pending[i + have])))
      ++have;
    if (have == size_t(len)) {
      // Reject overlong / surrogate forms the lead byte alone does not exclude.
      const auto c1 = static_cast<unsigned char>(len > 1 ? pending[i + 1] : 0);
      const bool bad = (c == 0xE0 && c1 < 0xA0) || (c == 0xED && c1 > 0x9F) ||
                       (c == 0xF0 && c1 < 0x90) || (c == 0xF4 && c1 > 0x8F);
      if (bad) { out += kReplacement; ++i; continue; }
      out.append(pending, i, len);
      i += len;
    } else if (i + have == pending.size() && !flush) {
      break;  // may still complete
    } else {
      out += kReplacement;
      i += 1;
    }
  }
  pending.erase(0, i);
  return out;
}

}  // namespace

Tokenizer::~Tokenizer() = default;

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::Load(const std::string& model_dir) {
  std::unique_ptr<Tokenizer> t(new Tokenizer());
  std::string error;
  t->sp_ = spm::Processor::Load(model_dir + "/tokenizer.model", &error);
  if (!t->sp_)
    return absl::InvalidArgumentError(absl::StrCat(model_dir, "/tokenizer.model: ", error));
  t->vocab_size_ = t->sp_->piece_count();
  if (t->vocab_size_ < 3)
    return absl::InvalidArgumentError(absl::StrCat(model_dir, "/tokenizer.model: too few pieces"));
  t->special_["<s>"] = 1;
  t->special_["</s>"] = 2;
  std::ifstream in(model_dir + "/added_tokens.json");
  if (in) {
    std::stringstream ss;
    ss << in.rdbuf();
    auto j = nlohmann::json::parse(ss.str(), nullptr, false);
    if (j.is_discarded() || !j.is_object())
      return absl::InvalidArgumentError(absl::StrCat(model_dir, "/added_tokens.json: not a JSON object"));
    for (auto it = j.begin(); it != j.end(); ++it) {
      if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
          it.value().get<int64_t>() > (1 << 24))
        return absl::InvalidArgumentError(
            absl::StrCat(model_dir, "/added_tokens.json: id of '", it.key(), "' is not a valid id"));
      if (it.key().empty())
        return absl::InvalidArgumentError(absl::StrCat(model_dir, "/added_tokens.json: empty token"));
      const int id = it.value().get<int>();
      t->special_[it.key()] = id;
      t->vocab_size_ = std::max(t->vocab_size_, id + 1);
    }
  }
  for (const auto& [text, id] : t->special_) t->special_text_[id] = text;
  const std::vector<int> probe = t->sp_->Encode("a");
  t->adds_dummy_prefix_ = !probe.empty() && t->sp_->piece(probe[0]).rfind(kSpaceMarker, 0) == 0;
  return t;
}

std::vector<int> Tokenizer::Encode(const std::string& text) const {
  std::vector<int> ids;
  size_t pos = 0;
  while (pos < text.size()) {
    // Earliest (then longest) special token occurrence from `pos`.
    size_t best = std::string::npos, best_len = 0;
    int best_id = -1;
    for (const auto& [s, id] : special_) {
      const size_t at = text.find(s, pos);
      if (at != std::string::npos && (at < best || (at == best && s.size() > best_len))) {
        best = at;
        best_len = s.size();
        best_id = id;
      }
    }
    const size_t end = best == std::string::npos ? text.size() : best;
    if (end > pos) {
      const std::vector<int> seg = sp_->Encode(text.substr(pos, end - pos));
      ids.insert(ids.end(), seg.begin(), seg.end());
    }
    if (best == std::string::npos) break;
    ids.push_back(best_id);
    pos = best + best_len;
  }
  return ids;
}

std::vector<int> Tokenizer::EncodePrompt(const std::string& text) const {
  std::vector<int> ids{bos_id()};
  const std::vector<int> rest = Encode(text);
  ids.insert(ids.end(), rest.begin(), rest.end());
  return ids;
}

std::string Tokenizer::RenderChat(const std::vector<ChatMessage>& messages) {
  std::string s;
  for (const ChatMessage& m : messages) s += "<|im_start|>" + m.role + "\n" + m.content + "<|im_end|>\n";
  s += "<|im_start|>assistant\n";
  return s;
}

absl::StatusOr<std::vector<int>> Tokenizer::EncodeChat(const std::vector<ChatMessage>& messages) const {
  if (messages.empty()) return absl::InvalidArgumentError("chat needs at least one message");
  for (const ChatMessage& m : messages) {
    if (m.role != "system" && m.role != "user" && m.role != "assistant")
      return absl::InvalidArgumentError(absl::StrCat("unknown chat role '", m.role, "'"));
  }
  if (TokenId("<|im_start|>") < 0 || TokenId("<|im_end|>") < 0)
    return absl::FailedPreconditionError("tokenizer has no <|im_start|>/<|im_end|> tokens");
  return EncodePrompt(RenderChat(messages));
}

int Tokenizer::TokenId(const std::string& special) const {
  auto it = special_.find(special);
  return it == special_.end() ? -1 : it->second;
}

bool Tokenizer::IsSpecial(int id) const {
  return special_text_.count(id) || (id >= 0 && id < sp_->piece_count() && sp_->is_control(id));
}

std::string Tokenizer::TokenBytes(int id, bool skip_special) const {
  if (id < 0 || id >= vocab_size_) return "";
  if (IsSpecial(id)) {
    if (skip_special) return "";
    auto it = special_text_.find(id);
    return it == special_text_.end() ? "" : it->second;
  }
  if (id >= sp_->piece_count()) return "";  // padding ids past the tokenizer
  if (sp_->is_unknown(id)) return " \xE2\x81\x87 ";  // SentencePiece's surface form of <unk>
  if (sp_->is_byte(id)) return std::string(1, static_cast<char>(sp_->byte_value(id)));
  const std::string piece = sp_->piece(id);
  std::string out;
  for (size_t i = 0; i < piece.size();) {
    if (piece.compare(i, 3, kSpaceMarker) == 0) { out += ' '; i += 3; }
    else out += piece[i++];
  }
  return out;
}

std::string Tokenizer::Decode(std::span<const int> ids, bool skip_special) const {
  StreamDecoder d(*this, skip_special);
  std::string out;
  for (int id : ids) out += d.Push(id);
  return out + d.Flush();
}

StreamDecoder::StreamDecoder(const Tokenizer& tokenizer, bool skip_special)
    : tokenizer_(tokenizer), skip_special_(skip_special) {}

std::string StreamDecoder::Push(int id) {
  std::string bytes = tokenizer_.TokenBytes(id, skip_special_);
  if (tokenizer_.IsSpecial(id)) {
    // After a special token SentencePiece starts a fresh segment with its own dummy prefix.
    at_start_ = true;
  } else if (at_start_ && !bytes.empty()) {
    if (tokenizer_.adds_dummy_prefix() && bytes[0] == ' ') bytes.erase(0, 1);
    at_start_ = false;
  }
  pending_ += bytes;
  return TakeComplete(pending_, /*flush=*/false);
}

std::string StreamDecoder::Flush() { return TakeComplete(pending_, /*flush=*/true); }

}  // namespace sala

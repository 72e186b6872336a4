// A SentencePiece BPE model read from `tokenizer.model` and applied without the sentencepiece
// library: Debian's libsentencepiece carries a private protobuf that breaks any process that
// also loads libprotobuf (every service here). The model file is a protobuf (ModelProto); the
// few fields the BPE segmentation needs are read from its wire format directly.
#pragma once

#include <memory>
#include <string>
#include <unordered_map>
#include <vector>

namespace sala::spm {

class Processor {
 public:
  // Returns nullptr and sets *error on failure.
  static std::unique_ptr<Processor> Load(const std::string& path, std::string* error);

  // SentencePiece BPE segmentation: whitespace escaped to U+2581 (with the dummy prefix when
  // the model asks for it), characters merged pairwise by piece score, unknown characters as
  // byte pieces (byte fallback) or <unk>.
  std::vector<int> Encode(const std::string& text) const;
  int piece_count() const { return int(pieces_.size()); }
  const std::string& piece(int id) const { return pieces_[id].text; }
  bool is_byte(int id) const { return pieces_[id].type == kByte; }
  // The byte that byte piece `id` ("<0xAB>") stands for.
  unsigned char byte_value(int id) const { return static_cast<unsigned char>(pieces_[id].byte); }
  bool is_control(int id) const { return pieces_[id].type == kControl; }
  bool is_unknown(int id) const { return pieces_[id].type == kUnknown; }

 private:
  enum Type { kNormal = 1, kUnknown = 2, kControl = 3, kUserDefined = 4, kUnused = 5, kByte = 6 };
  struct Piece {
    std::string text;
    float score = 0;
    int type = kNormal;
    int byte = -1;  // byte pieces: the byte of "<0xAB>"
  };
  Processor() = default;
  std::vector<Piece> pieces_;
  std::unordered_map<std::string, int> ids_;  // normal and user-defined pieces
  int byte_ids_[256] = {};
  int unk_id_ = 0;
  bool byte_fallback_ = false;
  bool add_dummy_prefix_ = true;
  bool remove_extra_whitespaces_ = false;
  bool escape_whitespaces_ = true;
};

// Trains a BPE model with byte fallback on `corpus_path` with Debian's `spm_train`, writing
// `<prefix>.model`. Returns an empty string on success, else the error.
std::string TrainBpe(const std::string& corpus_path, const std::string& model_prefix, int vocab_size);

}  // namespace sala::spm

// Debian's sentencepiece header declares `absl::string_view` itself, which clashes with
// Abseil's own; so sentencepiece is reached only through this std-only adapter.
#pragma once

#include <memory>
#include <string>
#include <vector>

namespace sala::spm {

class Processor {
 public:
  // Returns nullptr and sets *error on failure.
  static std::unique_ptr<Processor> Load(const std::string& path, std::string* error);
  ~Processor();

  std::vector<int> Encode(const std::string& text) const;
  int piece_count() const;
  std::string piece(int id) const;
  bool is_byte(int id) const;
  bool is_control(int id) const;
  bool is_unknown(int id) const;

 private:
  struct Impl;
  explicit Processor(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

// Trains a BPE model with byte fallback on `corpus_path`, writing `<prefix>.model`.
// Returns an empty string on success, else the error.
std::string TrainBpe(const std::string& corpus_path, const std::string& model_prefix,
                     int vocab_size);

}  // namespace sala::spm

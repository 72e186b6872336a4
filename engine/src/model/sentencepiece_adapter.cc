#include "sentencepiece_adapter.h"

#include <sentencepiece_processor.h>
#include <sentencepiece_trainer.h>

namespace sala::spm {

struct Processor::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

Processor::Processor(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Processor::~Processor() = default;

std::unique_ptr<Processor> Processor::Load(const std::string& path, std::string* error) {
  auto impl = std::make_unique<Impl>();
  const auto status = impl->sp.Load(path);
  if (!status.ok()) {
    *error = status.ToString();
    return nullptr;
  }
  return std::unique_ptr<Processor>(new Processor(std::move(impl)));
}

std::vector<int> Processor::Encode(const std::string& text) const {
  std::vector<int> ids;
  impl_->sp.Encode(text, &ids).IgnoreError();  // only fails when no model is loaded
  return ids;
}
int Processor::piece_count() const { return impl_->sp.GetPieceSize(); }
std::string Processor::piece(int id) const { return impl_->sp.IdToPiece(id); }
bool Processor::is_byte(int id) const { return impl_->sp.IsByte(id); }
bool Processor::is_control(int id) const { return impl_->sp.IsControl(id); }
bool Processor::is_unknown(int id) const { return impl_->sp.IsUnknown(id); }

std::string TrainBpe(const std::string& corpus_path, const std::string& model_prefix,
                     int vocab_size) {
  // LLaMA-style settings: BPE, byte fallback, digits split, no normalisation, so that any
  // UTF-8 text round-trips exactly.
  const std::string args =
      "--input=" + corpus_path + " --model_prefix=" + model_prefix +
      " --model_type=bpe --vocab_size=" + std::to_string(vocab_size) +
      " --byte_fallback=true --split_digits=true --normalization_rule_name=identity"
      " --remove_extra_whitespaces=false --add_dummy_prefix=true --character_coverage=1.0"
      " --unk_id=0 --bos_id=1 --eos_id=2 --pad_id=-1 --hard_vocab_limit=false"
      " --num_threads=1 --minloglevel=2 --max_sentence_length=100000";
  const auto status = sentencepiece::SentencePieceTrainer::Train(args);
  return status.ok() ? std::string() : status.ToString();
}

}  // namespace sala::spm

#include <fcntl.h>
#include <sys/wait.h>
#include <unistd.h>

#include <cstring>
#include <fstream>
#include <queue>
#include <sstream>

#include "sentencepiece_bpe.h"

namespace sala::spm {
namespace {

// The byte that a byte piece's text "<0xAB>" names (two hex digits), or -1 for any other text.
int BytePieceValue(const std::string& text) {
  if (text.size() != 6 || text.compare(0, 3, "<0x") != 0 || text[5] != '>') return -1;
  int value = 0;
  for (char c : text.substr(3, 2)) {
    int digit;
    if (c >= '0' && c <= '9') digit = c - '0';
    else if (c >= 'A' && c <= 'F') digit = c - 'A' + 10;
    else if (c >= 'a' && c <= 'f') digit = c - 'a' + 10;
    else return -1;
    value = 16 * value + digit;
  }
  return value;
}

// Protobuf wire-format reader over a byte range; every read is bounds-checked.
class Wire {
 public:
  Wire(const char* p, size_t n) : p_(p), end_(p + n) {}
  bool done() const { return p_ >= end_; }
  bool ok() const { return ok_; }
  bool Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (p_ >= end_) return ok_ = false;
      const auto b = static_cast<unsigned char>(*p_++);
      *v |= uint64_t(b & 0x7f) << shift;
      if (!(b & 0x80)) return true;
    }
    return ok_ = false;
  }
  // Next field: number, wire type, and for length-delimited fields the bytes.
  bool Next(int* field, int* type, std::string_view* bytes, uint64_t* value) {
    uint64_t key;
    if (!Varint(&key)) return false;
    *field = int(key >> 3);
    *type = int(key & 7);
    switch (*type) {
      case 0: return Varint(value);
      case 1: return Skip(8, value);
      case 5: return Skip(4, value);
      case 2: {
        uint64_t len;
        if (!Varint(&len) || len > uint64_t(end_ - p_)) return ok_ = false;
        *bytes = std::string_view(p_, len);
        p_ += len;
        return true;
      }
      default: return ok_ = false;
    }
  }

 private:
  bool Skip(size_t n, uint64_t* value) {
    if (size_t(end_ - p_) < n) return ok_ = false;
    *value = 0;
    std::memcpy(value, p_, n);
    p_ += n;
    return true;
  }
  const char* p_;
  const char* end_;
  bool ok_ = true;
};

size_t Utf8Len(unsigned char c) {
  return c < 0x80 ? 1 : (c >> 5) == 6 ? 2 : (c >> 4) == 14 ? 3 : (c >> 3) == 30 ? 4 : 1;
}

constexpr char kSpace[] = "\xE2\x96\x81";

}  // namespace

std::unique_ptr<Processor> Processor::Load(const std::string& path, std::string* error) {
  std::ifstream in(path, std::ios::binary);
  if (!in) {
    *error = "cannot open";
    return nullptr;
  }
  std::stringstream ss;
  ss << in.rdbuf();
  const std::string data = ss.str();
  std::unique_ptr<Processor> p(new Processor());
  int model_type = 1;
  Wire w(data.data(), data.size());
  int field, type;
  std::string_view bytes;
  uint64_t value;
  while (!w.done() && w.Next(&field, &type, &bytes, &value)) {
    if (field == 1 && type == 2) {  // SentencePiece pieces
      Piece piece;
      Wire pw(bytes.data(), bytes.size());
      std::string_view pb;
      uint64_t pv;
      int pf, pt;
      while (!pw.done() && pw.Next(&pf, &pt, &pb, &pv)) {
        if (pf == 1 && pt == 2) piece.text = std::string(pb);
        else if (pf == 2 && pt == 5) std::memcpy(&piece.score, &pv, 4);
        else if (pf == 3 && pt == 0) piece.type = int(pv);
      }
      if (!pw.ok()) break;
      p->pieces_.push_back(std::move(piece));
    } else if ((field == 2 || field == 3) && type == 2) {  // TrainerSpec, NormalizerSpec
      Wire sw(bytes.data(), bytes.size());
      std::string_view sb;
      uint64_t sv;
      int sf, st;
      while (!sw.done() && sw.Next(&sf, &st, &sb, &sv)) {
        if (field == 2 && sf == 3 && st == 0) model_type = int(sv);
        if (field == 2 && sf == 35 && st == 0) p->byte_fallback_ = sv != 0;
        if (field == 3 && sf == 2 && st == 2 && !sb.empty()) {
          *error = "normalisation rules other than identity are not supported";
          return nullptr;
        }
        if (field == 3 && sf == 3 && st == 0) p->add_dummy_prefix_ = sv != 0;
        if (field == 3 && sf == 4 && st == 0) p->remove_extra_whitespaces_ = sv != 0;
        if (field == 3 && sf == 5 && st == 0) p->escape_whitespaces_ = sv != 0;
      }
      if (!sw.ok()) break;
    }
  }
  if (!w.ok() || !w.done()) {
    *error = "not a SentencePiece model (corrupt protobuf)";
    return nullptr;
  }
  if (model_type != 2) {
    *error = "only BPE SentencePiece models are supported";
    return nullptr;
  }
  if (p->pieces_.empty()) {
    *error = "model has no pieces";
    return nullptr;
  }
  std::fill(std::begin(p->byte_ids_), std::end(p->byte_ids_), -1);
  for (int id = 0; id < int(p->pieces_.size()); ++id) {
    Piece& piece = p->pieces_[id];
    if (piece.type == kNormal || piece.type == kUserDefined) p->ids_.emplace(piece.text, id);
    if (piece.type == kUnknown) p->unk_id_ = id;
    if (piece.type == kByte) {
      piece.byte = BytePieceValue(piece.text);
      if (piece.byte < 0) {
        *error = "byte piece " + std::to_string(id) + " is not of the form <0xAB> (corrupt model)";
        return nullptr;
      }
      p->byte_ids_[piece.byte] = id;
    }
  }
  return p;
}

std::vector<int> Processor::Encode(const std::string& raw) const {
  // Normalise.
  std::string text = raw;
  if (remove_extra_whitespaces_) {
    std::string t;
    for (char c : text)
      if (c != ' ' || (!t.empty() && t.back() != ' ')) t += c;
    while (!t.empty() && t.back() == ' ') t.pop_back();
    text = t;
  }
  if (text.empty()) return {};
  if (add_dummy_prefix_) text.insert(text.begin(), ' ');
  std::string norm;
  for (char c : text) {
    if (c == ' ' && escape_whitespaces_) norm += kSpace;
    else norm += c;
  }
  // Symbols: one per character, in a doubly linked list.
  struct Symbol {
    int prev, next;
    size_t begin, len;
  };
  std::vector<Symbol> sym;
  for (size_t i = 0; i < norm.size();) {
    const size_t n = std::min(Utf8Len(static_cast<unsigned char>(norm[i])), norm.size() - i);
    sym.push_back({int(sym.size()) - 1, int(sym.size()) + 1, i, n});
    i += n;
  }
  sym.back().next = -1;
  // Agenda of mergeable neighbours: highest score first, leftmost on ties.
  struct Pair {
    float score;
    int left, right;
    size_t len;  // length of the merged text, to notice stale entries
  };
  auto worse = [](const Pair& a, const Pair& b) { return a.score != b.score ? a.score < b.score : a.left > b.left; };
  std::priority_queue<Pair, std::vector<Pair>, decltype(worse)> agenda(worse);
  auto consider = [&](int l, int r) {
    if (l < 0 || r < 0) return;
    auto it = ids_.find(norm.substr(sym[l].begin, sym[l].len + sym[r].len));
    if (it != ids_.end()) agenda.push({pieces_[it->second].score, l, r, sym[l].len + sym[r].len});
  };
  for (int i = 0; i + 1 < int(sym.size()); ++i) consider(i, i + 1);
  while (!agenda.empty()) {
    const Pair top = agenda.top();
    agenda.pop();
    Symbol& l = sym[top.left];
    if (l.len == 0 || l.next != top.right || sym[top.right].len == 0 || l.len + sym[top.right].len != top.len)
      continue;  // one side was merged since
    Symbol& r = sym[top.right];
    l.len += r.len;
    l.next = r.next;
    if (r.next >= 0) sym[r.next].prev = top.left;
    r.len = 0;
    consider(l.prev, top.left);
    consider(top.left, l.next);
  }
  std::vector<int> ids;
  for (int i = 0; i >= 0; i = sym[i].next) {
    const std::string s = norm.substr(sym[i].begin, sym[i].len);
    auto it = ids_.find(s);
    if (it != ids_.end()) {
      ids.push_back(it->second);
    } else if (byte_fallback_) {
      for (unsigned char c : s) ids.push_back(byte_ids_[c] >= 0 ? byte_ids_[c] : unk_id_);
    } else {
      ids.push_back(unk_id_);
    }
  }
  return ids;
}

std::string TrainBpe(const std::string& corpus_path, const std::string& model_prefix, int vocab_size) {
  // LLaMA-style settings: BPE, byte fallback, digits split, no normalisation, so that any
  // UTF-8 text round-trips exactly.
  std::vector<std::string> args = {
      "spm_train", "--input=" + corpus_path, "--model_prefix=" + model_prefix, "--model_type=bpe",
      "--vocab_size=" + std::to_string(vocab_size), "--byte_fallback=true", "--split_digits=true",
      "--normalization_rule_name=identity", "--remove_extra_whitespaces=false", "--add_dummy_prefix=true",
      "--character_coverage=1.0", "--unk_id=0", "--bos_id=1", "--eos_id=2", "--pad_id=-1",
      "--hard_vocab_limit=false", "--num_threads=1", "--minloglevel=2", "--max_sentence_length=100000"};
  std::vector<char*> argv;
  for (auto& a : args) argv.push_back(a.data());
  argv.push_back(nullptr);
  const pid_t pid = fork();
  if (pid < 0) return "fork failed";
  if (pid == 0) {
    const int devnull = ::open("/dev/null", O_WRONLY);
    if (devnull >= 0) {
      dup2(devnull, 1);
      dup2(devnull, 2);
    }
    execvp("spm_train", argv.data());
    _exit(127);
  }
  int status = 0;
  waitpid(pid, &status, 0);
  if (WIFEXITED(status) && WEXITSTATUS(status) == 127)
    return "spm_train not found (install Debian's sentencepiece package)";
  if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) return "spm_train failed";
  return "";
}

}  // namespace sala::spm

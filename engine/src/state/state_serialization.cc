#include "sala/state_serialization.h"

#include <xxhash.h>

#include <cstring>

#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "sala/status_macros.h"

namespace sala {
namespace {

constexpr size_t kMagicLen = 8;
constexpr size_t kRecordHeaderLen = 16;  // u32 type, u32 layer, u64 payload_len
constexpr size_t kSparsePrefixLen = 6 * 8 + 8;
constexpr size_t kLinearPrefixLen = 8;
// A stream that announces more tokens than this is refused before anything is allocated.
constexpr int64_t kMaxTokens = int64_t(1) << 32;

template <typename T>
void Put(std::string& out, T v) {
  out.append(reinterpret_cast<const char*>(&v), sizeof(T));
}

template <typename T>
T Get(std::string_view& in) {
  T v;
  std::memcpy(&v, in.data(), sizeof(T));
  in.remove_prefix(sizeof(T));
  return v;
}

void PutRows(std::string& out, const float* p, size_t n, DType dtype) {
  if (dtype == DType::kF32) {
    out.append(reinterpret_cast<const char*>(p), n * 4);
    return;
  }
  const size_t base = out.size();
  out.resize(base + n * 2);
  auto* q = reinterpret_cast<uint16_t*>(out.data() + base);
  for (size_t i = 0; i < n; ++i) q[i] = F32ToBf16(p[i]);
}

void GetRows(std::string_view& in, std::vector<float>& dst, size_t n, DType dtype) {
  const size_t base = dst.size();
  dst.resize(base + n);
  if (dtype == DType::kF32) {
    std::memcpy(dst.data() + base, in.data(), n * 4);
  } else {
    for (size_t i = 0; i < n; ++i) {
      uint16_t h;
      std::memcpy(&h, in.data() + 2 * i, 2);
      dst[base + i] = Bf16ToF32(h);
    }
  }
  in.remove_prefix(n * DTypeSize(dtype));
}

std::string RecordHeader(StateRecord type, uint32_t layer, uint64_t payload_len) {
  std::string h;
  Put(h, static_cast<uint32_t>(type));
  Put(h, layer);
  Put(h, payload_len);
  return h;
}

nlohmann::json LayoutJson(const ModelConfig& c) {
  std::string kinds;
  for (LayerKind k : c.layers) kinds += k == LayerKind::kSparse ? 'S' : 'L';
  return {{"layout_hash", absl::StrCat(c.layout_hash())},
          {"layers", kinds},
          {"num_heads", c.num_heads},
          {"num_kv_heads", c.num_kv_heads},
          {"head_dim", c.head_dim},
          {"sparse_head_dim", c.sparse_head_dim()},
          {"block_size", c.sparse.block_size},
          {"kernel_size", c.sparse.kernel_size},
          {"kernel_stride", c.sparse.kernel_stride}};
}

absl::Status Corrupt(const std::string& what) {
  return absl::DataLossError(absl::StrCat("state stream: ", what));
}

}  // namespace

struct StateWriter::Hash {
  XXH3_state_t* s = XXH3_createState();
  Hash() { XXH3_64bits_reset(s); }
  ~Hash() { XXH3_freeState(s); }
};
struct StateReader::Hash {
  XXH3_state_t* s = XXH3_createState();
  Hash() { XXH3_64bits_reset(s); }
  ~Hash() { XXH3_freeState(s); }
};

StateWriter::StateWriter(const ModelConfig& config, int64_t expected_tokens, DType kv_dtype)
    : config_(config),
      expected_tokens_(expected_tokens),
      kv_dtype_(kv_dtype == DType::kBF16 ? DType::kBF16 : DType::kF32),
      sent_tokens_(config.num_sparse_layers(), 0),
      sent_k1_(config.num_sparse_layers(), 0),
      sent_k2_(config.num_sparse_layers(), 0),
      hash_(std::make_unique<Hash>()) {}
StateWriter::~StateWriter() = default;

std::string StateWriter::Emit(std::string bytes) {
  XXH3_64bits_update(hash_->s, bytes.data(), bytes.size());
  return bytes;
}

std::string StateWriter::Header() {
  nlohmann::json h = LayoutJson(config_);
  h["format_version"] = kStateFormatVersion;
  h["expected_tokens"] = expected_tokens_;
  h["kv_dtype"] = DTypeName(kv_dtype_);
  const std::string text = h.dump();
  std::string out(kStateMagic, kMagicLen);
  Put(out, uint32_t(text.size()));
  out += text;
  return Emit(std::move(out));
}

std::string StateWriter::SparseDelta(const SequenceState& state, bool final) {
  const int64_t row = int64_t(config_.num_kv_heads) * config_.sparse_head_dim();
  const int64_t block = config_.sparse.block_size;
  std::string out;
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    if (config_.layers[layer] != LayerKind::kSparse) continue;
    const int slot = config_.slot_of(layer);
    const SparseLayerCache& c = state.sparse[slot];
    const int64_t have = int64_t(c.k.size()) / row;
    const int64_t upto = final ? have : have / block * block;
    const int64_t n_tok = upto - sent_tokens_[slot];
    const int64_t n_k1 = int64_t(c.k1.size()) / row - sent_k1_[slot];
    const int64_t n_k2 = int64_t(c.k2.size()) / row - sent_k2_[slot];
    if (n_tok <= 0 && n_k1 <= 0 && n_k2 <= 0) continue;
    std::string payload;
    for (int64_t v : {sent_tokens_[slot], std::max<int64_t>(n_tok, 0), sent_k1_[slot], n_k1,
                      sent_k2_[slot], n_k2})
      Put(payload, uint64_t(v));
    Put(payload, uint32_t(kv_dtype_));
    Put(payload, uint32_t(0));
    if (n_tok > 0) {
      PutRows(payload, c.k.data() + sent_tokens_[slot] * row, n_tok * row, kv_dtype_);
      PutRows(payload, c.v.data() + sent_tokens_[slot] * row, n_tok * row, kv_dtype_);
    }
    PutRows(payload, c.k1.data() + sent_k1_[slot] * row, n_k1 * row, kv_dtype_);
    PutRows(payload, c.k2.data() + sent_k2_[slot] * row, n_k2 * row, kv_dtype_);
    sent_tokens_[slot] += std::max<int64_t>(n_tok, 0);
    sent_k1_[slot] += n_k1;
    sent_k2_[slot] += n_k2;
    out += RecordHeader(StateRecord::kSparseKv, layer, payload.size());
    out += payload;
  }
  return Emit(std::move(out));
}

std::string StateWriter::LinearStates(const SequenceState& state) {
  std::string out;
  for (int layer = 0; layer < config_.num_layers; ++layer) {
    if (config_.layers[layer] != LayerKind::kLinear) continue;
    const auto& s = state.linear[config_.slot_of(layer)].s;
    out += RecordHeader(StateRecord::kLinearState, layer, kLinearPrefixLen + s.size() * 4);
    Put(out, uint32_t(DType::kF32));
    Put(out, uint32_t(0));
    PutRows(out, s.data(), s.size(), DType::kF32);
  }
  return Emit(std::move(out));
}

std::string StateWriter::Commit(const SequenceState& state) {
  std::string out = RecordHeader(StateRecord::kCommit, 0, 16);
  Put(out, uint64_t(state.tokens));
  Put(out, uint64_t(XXH3_64bits_digest(hash_->s)));
  return out;
}

std::string StateWriter::SerializeAll(const ModelConfig& config, const SequenceState& state,
                                      DType kv_dtype) {
  StateWriter w(config, state.tokens, kv_dtype);
  std::string out = w.Header();
  out += w.SparseDelta(state, /*final=*/true);
  out += w.LinearStates(state);
  out += w.Commit(state);
  return out;
}

StateReader::StateReader(const ModelConfig& config)
    : config_(config),
      state_(SequenceState::Empty(config)),
      linear_seen_(config.num_linear_layers(), 0),
      hash_(std::make_unique<Hash>()) {}
StateReader::~StateReader() = default;

absl::Status StateReader::ParseHeader(std::string_view text) {
  auto h = nlohmann::json::parse(text, nullptr, false);
  if (h.is_discarded() || !h.is_object()) return Corrupt("header is not a JSON object");
  if (!h.contains("format_version") || !h["format_version"].is_number_unsigned() ||
      h["format_version"].get<uint32_t>() != kStateFormatVersion)
    return absl::FailedPreconditionError("state stream: unsupported format version");
  const nlohmann::json mine = LayoutJson(config_);
  for (auto it = mine.begin(); it != mine.end(); ++it) {
    if (!h.contains(it.key()) || h[it.key()] != it.value())
      return absl::FailedPreconditionError(absl::StrCat(
          "state stream: model layout differs from this engine's (", it.key(), ": sender ",
          h.contains(it.key()) ? h[it.key()].dump() : "missing", ", receiver ", it.value().dump(), ")"));
  }
  if (!h.contains("expected_tokens") || !h["expected_tokens"].is_number_unsigned() ||
      h["expected_tokens"].get<uint64_t>() > uint64_t(kMaxTokens))
    return Corrupt("header has no valid expected_tokens");
  expected_tokens_ = h["expected_tokens"].get<int64_t>();
  return absl::OkStatus();
}

absl::Status StateReader::ParseRecord(StateRecord type, uint32_t layer, std::string_view p) {
  const int64_t row = int64_t(config_.num_kv_heads) * config_.sparse_head_dim();
  if (type == StateRecord::kSparseKv) {
    if (layer >= uint32_t(config_.num_layers) || config_.layers[layer] != LayerKind::kSparse)
      return Corrupt(absl::StrCat("sparse record for layer ", layer, ", which is not sparse"));
    if (p.size() < kSparsePrefixLen) return Corrupt("short sparse record");
    uint64_t f[6];
    for (uint64_t& v : f) v = Get<uint64_t>(p);
    const auto dtype = static_cast<DType>(Get<uint32_t>(p));
    Get<uint32_t>(p);
    if (dtype != DType::kF32 && dtype != DType::kBF16) return Corrupt("sparse record dtype");
    SparseLayerCache& c = state_.sparse[config_.slot_of(int(layer))];
    const uint64_t have_tok = c.k.size() / row, have_k1 = c.k1.size() / row, have_k2 = c.k2.size() / row;
    if (f[0] != have_tok || f[2] != have_k1 || f[4] != have_k2)
      return Corrupt(absl::StrCat("layer ", layer, ": rows out of order or missing"));
    if (f[1] > uint64_t(expected_tokens_) - have_tok ||
        f[3] > uint64_t(SequenceState::NumK1(config_.sparse, expected_tokens_)) - have_k1 ||
        f[5] > uint64_t(SequenceState::NumK2(config_.sparse, expected_tokens_)) - have_k2)
      return Corrupt(absl::StrCat("layer ", layer, ": more rows than the header announced"));
    const uint64_t rows = 2 * f[1] + f[3] + f[5];
    if (p.size() != rows * row * DTypeSize(dtype))
      return Corrupt(absl::StrCat("layer ", layer, ": payload size does not match its row counts"));
    GetRows(p, c.k, f[1] * row, dtype);
    GetRows(p, c.v, f[1] * row, dtype);
    GetRows(p, c.k1, f[3] * row, dtype);
    GetRows(p, c.k2, f[5] * row, dtype);
    return absl::OkStatus();
  }
  if (type == StateRecord::kLinearState) {
    if (layer >= uint32_t(config_.num_layers) || config_.layers[layer] != LayerKind::kLinear)
      return Corrupt(absl::StrCat("linear record for layer ", layer, ", which is not linear"));
    const int slot = config_.slot_of(int(layer));
    auto& s = state_.linear[slot].s;
    if (linear_seen_[slot]++) return Corrupt(absl::StrCat("layer ", layer, ": linear state sent twice"));
    if (p.size() != kLinearPrefixLen + s.size() * 4 ||
        static_cast<DType>(Get<uint32_t>(p)) != DType::kF32)
      return Corrupt(absl::StrCat("layer ", layer, ": bad linear state record"));
    Get<uint32_t>(p);
    std::memcpy(s.data(), p.data(), s.size() * 4);
    return absl::OkStatus();
  }
  return Corrupt(absl::StrCat("unknown record type ", uint32_t(type)));
}

absl::Status StateReader::Feed(std::string_view bytes) {
  if (failed_) return absl::FailedPreconditionError("state stream: reader already failed");
  if (committed_) return Corrupt("data after commit");
  buffer_.append(bytes);
  auto fail = [this](absl::Status s) {
    failed_ = true;
    buffer_.clear();
    return s;
  };
  for (;;) {
    std::string_view in(buffer_);
    if (!have_header_) {
      if (in.size() < kMagicLen + 4) return absl::OkStatus();
      if (in.substr(0, kMagicLen) != std::string_view(kStateMagic, kMagicLen))
        return fail(Corrupt("bad magic: not a SALA state stream"));
      uint32_t len;
      std::memcpy(&len, in.data() + kMagicLen, 4);
      if (len > (1u << 20)) return fail(Corrupt("header too large"));
      if (in.size() < kMagicLen + 4 + len) return absl::OkStatus();
      if (auto s = ParseHeader(in.substr(kMagicLen + 4, len)); !s.ok()) return fail(s);
      XXH3_64bits_update(hash_->s, in.data(), kMagicLen + 4 + len);
      buffer_.erase(0, kMagicLen + 4 + len);
      have_header_ = true;
      continue;
    }
    if (in.size() < kRecordHeaderLen) return absl::OkStatus();
    std::string_view h = in;
    const auto type = static_cast<StateRecord>(Get<uint32_t>(h));
    const uint32_t layer = Get<uint32_t>(h);
    const uint64_t len = Get<uint64_t>(h);
    const uint64_t row_bytes = uint64_t(config_.num_kv_heads) * config_.sparse_head_dim() * 4;
    const uint64_t max_len =
        std::max<uint64_t>(kLinearPrefixLen + uint64_t(config_.num_heads) * config_.head_dim * config_.head_dim * 4,
                           kSparsePrefixLen + 3 * uint64_t(expected_tokens_ + 1) * row_bytes);
    if (len > max_len) return fail(Corrupt("record larger than the announced state"));
    if (in.size() < kRecordHeaderLen + len) return absl::OkStatus();
    std::string_view payload = in.substr(kRecordHeaderLen, len);
    if (type == StateRecord::kCommit) {
      if (len != 16) return fail(Corrupt("bad commit record"));
      const uint64_t tokens = Get<uint64_t>(payload);
      const uint64_t checksum = Get<uint64_t>(payload);
      if (checksum != XXH3_64bits_digest(hash_->s)) return fail(Corrupt("checksum mismatch"));
      if (int64_t(tokens) != expected_tokens_)
        return fail(Corrupt(absl::StrCat("commit says ", tokens, " tokens, header announced ", expected_tokens_)));
      const int64_t row = int64_t(config_.num_kv_heads) * config_.sparse_head_dim();
      for (const auto& c : state_.sparse) {
        if (int64_t(c.k.size()) != int64_t(tokens) * row ||
            int64_t(c.k1.size()) != SequenceState::NumK1(config_.sparse, tokens) * row ||
            int64_t(c.k2.size()) != SequenceState::NumK2(config_.sparse, tokens) * row)
          return fail(Corrupt("commit before every sparse row arrived"));
      }
      for (int64_t seen : linear_seen_)
        if (!seen) return fail(Corrupt("commit before every linear state arrived"));
      state_.tokens = int64_t(tokens);
      committed_ = true;
      buffer_.erase(0, kRecordHeaderLen + len);
      if (!buffer_.empty()) return fail(Corrupt("data after commit"));
      return absl::OkStatus();
    }
    if (auto s = ParseRecord(type, layer, payload); !s.ok()) return fail(s);
    XXH3_64bits_update(hash_->s, in.data(), kRecordHeaderLen + len);
    buffer_.erase(0, kRecordHeaderLen + len);
  }
}

absl::StatusOr<SequenceState> StateReader::Take() {
  if (!committed_) return absl::FailedPreconditionError("state stream: not committed");
  committed_ = false;
  failed_ = true;  // a reader yields one state
  return std::move(state_);
}

absl::StatusOr<SequenceState> StateReader::DeserializeAll(const ModelConfig& config,
                                                         std::string_view bytes) {
  StateReader r(config);
  SALA_RETURN_IF_ERROR(r.Feed(bytes));
  if (!r.committed()) return Corrupt("stream ended before its commit (truncated?)");
  return r.Take();
}

}  // namespace sala

// The prefill -> decode payload: a versioned, self-describing byte stream of a SequenceState.
//
// Stream (little-endian):
//   "SALAST01"  u32 header_len  header JSON        (format, layout hash, shapes, expected tokens)
//   record*                                          (u32 type, u32 layer, u64 payload_len, payload)
//     kSparseKv:    u64 first_token, num_tokens, first_k1, num_k1, first_k2, num_k2; u32 dtype, u32 0;
//                   K rows, V rows, k1 rows, k2 rows (rows of num_kv_heads * sparse_head_dim)
//     kLinearState: u32 dtype, u32 0; [num_heads, head_dim, head_dim]
//     kCommit:      u64 tokens, u64 xxh3 of every byte before this record
// Sparse records of a layer must arrive in order and without gaps, so a sender can ship
// the blocks of each prefill chunk as soon as the chunk is done, and the linear states at the end.
#pragma once

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "sala/config.h"
#include "sala/safetensors.h"
#include "sala/sequence_state.h"

namespace sala {

inline constexpr char kStateMagic[] = "SALAST01";
inline constexpr uint32_t kStateFormatVersion = 1;

enum class StateRecord : uint32_t { kSparseKv = 1, kLinearState = 2, kCommit = 3 };

class StateWriter {
 public:
  // `kv_dtype` is the wire type of K/V/k1/k2 (F32 or BF16); linear states always travel in F32.
  StateWriter(const ModelConfig& config, int64_t expected_tokens, DType kv_dtype = DType::kF32);
  ~StateWriter();

  std::string Header();
  // K/V rows and compressed keys the state gained since the last call: whole blocks only,
  // unless `final`, which also sends the partial last block.
  std::string SparseDelta(const SequenceState& state, bool final);
  std::string LinearStates(const SequenceState& state);
  std::string Commit(const SequenceState& state);

  // Header, every sparse row, linear states and commit in one string.
  static std::string SerializeAll(const ModelConfig& config, const SequenceState& state,
                                  DType kv_dtype = DType::kF32);

 private:
  std::string Emit(std::string bytes);
  const ModelConfig& config_;
  int64_t expected_tokens_;
  DType kv_dtype_;
  std::vector<int64_t> sent_tokens_, sent_k1_, sent_k2_;  // per sparse slot
  struct Hash;
  std::unique_ptr<Hash> hash_;
};

class StateReader {
 public:
  explicit StateReader(const ModelConfig& config);
  ~StateReader();

  // Accepts the stream in pieces of any size. Fails on a wrong layout, shape, order or checksum.
  absl::Status Feed(std::string_view bytes);
  bool committed() const { return committed_; }
  int64_t expected_tokens() const { return expected_tokens_; }
  // The state, once committed.
  absl::StatusOr<SequenceState> Take();

  static absl::StatusOr<SequenceState> DeserializeAll(const ModelConfig& config,
                                                      std::string_view bytes);

 private:
  absl::Status ParseHeader(std::string_view json);
  absl::Status ParseRecord(StateRecord type, uint32_t layer, std::string_view payload);
  const ModelConfig& config_;
  std::string buffer_;
  bool have_header_ = false, committed_ = false, failed_ = false;
  int64_t expected_tokens_ = 0;
  SequenceState state_;
  std::vector<int64_t> linear_seen_;
  struct Hash;
  std::unique_ptr<Hash> hash_;
};

}  // namespace sala

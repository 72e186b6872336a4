// The compute backend behind the Engine facade: CPU (the fp32 oracle) or CUDA.
#pragma once

#include <map>
#include <memory>
#include <span>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "sala/config.h"
#include "sala/sampling.h"
#include "sala/sequence_state.h"

namespace sala {

class Checkpoint;

// A piece of device memory of a sequence state, for GPU-to-GPU transfer.
struct DeviceSpan {
  void* data = nullptr;
  size_t bytes = 0;
};

// The bytes of all `spans` together.
inline int64_t SpanBytes(std::span<const DeviceSpan> spans) {
  int64_t total = 0;
  for (const DeviceSpan& s : spans) total += int64_t(s.bytes);
  return total;
}

class Backend {
 public:
  virtual ~Backend() = default;
  virtual std::string name() const = 0;

  // The prefill chunk (tokens) that EngineOptions::chunk_size = 0 stands for.
  virtual int PreferredChunkTokens() const { return 8192; }

  // Appends `tokens` to `state` in one pass and returns the logits of the last one.
  // `sparse` is the pass's dense/sparse attention choice (the same for every chunk of a prompt).
  virtual absl::StatusOr<std::vector<float>> Forward(SequenceState& state,
                                                     std::span<const int> tokens, bool sparse) = 0;

  // Forward without the logits (a prompt's chunks before its last): a backend may then skip
  // the work that only the logits read.
  virtual absl::Status Append(SequenceState& state, std::span<const int> tokens, bool sparse) {
    return Forward(state, tokens, sparse).status();
  }

  // One token for each sequence of a batch; sparse[i] as in Forward. Returns logits per sequence.
  virtual absl::StatusOr<std::vector<std::vector<float>>> DecodeStep(
      std::span<SequenceState* const> states, std::span<const int> tokens,
      std::span<const bool> sparse) = 0;

  // DecodeStep, then each sequence's next token drawn from its logits (draws[i] for sequence i)
  // where the logits are: a device backend copies back tokens, not vocabulary-sized rows.
  virtual absl::StatusOr<std::vector<int>> DecodeStepAndDraw(std::span<SequenceState* const> states,
                                                             std::span<const int> tokens,
                                                             std::span<const bool> sparse,
                                                             std::span<const TokenDraw> draws) {
    auto logits = DecodeStep(states, tokens, sparse);
    if (!logits.ok()) return logits.status();
    std::vector<int> out;
    for (size_t i = 0; i < logits->size(); ++i) out.push_back(DrawToken((*logits)[i], draws[i]));
    return out;
  }

  // Brings the host fields of `state` up to date with a device-resident state, so that it can
  // be serialised: the sparse rows and compressed keys not yet on the host, and the linear
  // states when `linear` is set. A no-op where the state lives on the host.
  virtual absl::Status SyncToHost(SequenceState& /*state*/, bool /*linear*/) { return absl::OkStatus(); }

  // Makes room in `state` for `tokens` tokens, so that a prefill does not move the state while
  // earlier rows are being sent from it. A no-op where the state lives on the host.
  virtual absl::Status Reserve(SequenceState& /*state*/, int64_t /*tokens*/) { return absl::OkStatus(); }

  // The device memory that holds what a state gained from `from_tokens` to `to_tokens`: for
  // every sparse layer in slot order its K rows, V rows, k1 and k2 entries (empty pieces left
  // out), then every linear state when `linear`. A sender lists what it has computed; a
  // receiver (`receive`) gets the state made device-resident, grown, and advanced to
  // `to_tokens`, ready to be written. Both list the same pieces in the same order for the same
  // arguments, so a transport moves them one to one. Only for device-resident backends.
  virtual absl::StatusOr<std::vector<DeviceSpan>> StateSpans(SequenceState& /*state*/, int64_t /*from_tokens*/,
                                                             int64_t /*to_tokens*/, bool /*linear*/,
                                                             bool /*receive*/) {
    return absl::FailedPreconditionError("the " + name() + " backend keeps sequence states in host memory");
  }

  // Time by kind of work (GEMM, linear attention, sparse attention, ...) while profiling is on;
  // profiling synchronises the device between sections, so it is for benchmarks only.
  virtual void SetProfiling(bool /*on*/) {}
  virtual std::map<std::string, double> TakeProfile() { return {}; }
};

// The fp32 CPU backend; weights are converted from the checkpoint.
absl::StatusOr<std::unique_ptr<Backend>> MakeCpuBackend(const ModelConfig& config,
                                                        const Checkpoint& checkpoint);
// The CUDA backend (bf16 weights on the current device). Only in builds with CUDA. With
// `decode_graphs`, decode steps replay captured CUDA graphs (one per batch size and context
// bucket) instead of launching some 450 kernels each.
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const ModelConfig& config, const Checkpoint& checkpoint,
                                                         bool decode_graphs = true);
// The CUDA backend with weights drawn on the device from `seed` (the scales sala-mkmodel uses).
absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackendWithRandomWeights(const ModelConfig& config, uint64_t seed,
                                                                          bool decode_graphs = true);

}  // namespace sala

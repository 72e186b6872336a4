// The tensors a config implies, and the checkpoint check against them.
#pragma once

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "sala/config.h"
#include "sala/safetensors.h"

namespace sala {

struct TensorSpec {
  std::string name;
  std::vector<int64_t> shape;
};

// Every tensor the model needs, with its shape, in checkpoint naming (MODEL_SPEC §1).
std::vector<TensorSpec> ExpectedTensors(const ModelConfig& config);

// Refuses a checkpoint with a missing, unexpected or mis-shaped tensor; the message names it.
absl::Status ValidateCheckpoint(const ModelConfig& config, const Checkpoint& checkpoint);

// Names of one layer's tensors.
std::string LayerTensorName(int layer, const std::string& suffix);

}  // namespace sala

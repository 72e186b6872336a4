// Token draws on the GPU: the definition of sala::DrawToken (sala/token_draw.h), one row at a time.
#pragma once

#include <cuda_runtime.h>

#include "absl/status/status.h"
#include "sala/token_draw.h"

namespace sala::cuda {

// tokens[r] = DrawToken(logits[r * vocab : (r + 1) * vocab], draws[r]) for every row r; `draws`
// and `tokens` are device arrays of `rows` entries.
absl::Status DrawTokens(const float* logits, int rows, int vocab, const TokenDraw* draws, int* tokens,
                        cudaStream_t stream);

}  // namespace sala::cuda

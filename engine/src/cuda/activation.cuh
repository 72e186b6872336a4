// Activations shared by the element-wise kernels and the GEMV's formed inputs.
#pragma once

namespace sala::cuda {

__device__ __forceinline__ float SigmoidF(float x) { return 1.0f / (1.0f + __expf(-x)); }

}  // namespace sala::cuda

// Activations shared by the element-wise kernels and the GEMV's formed inputs.
#pragma once

namespace sala::cuda {

__device__ __forceinline__ float SigmoidF(float x) { return 1.0f / (1.0f + __expf(-x)); }

// SwiGLU's gate activation, x sigmoid(x).
__device__ __forceinline__ float SiluF(float x) { return x * SigmoidF(x); }

}  // namespace sala::cuda

// Timing helpers shared by the GPU benchmarks.
#pragma once

#include <cuda_runtime.h>

#include <algorithm>
#include <vector>

namespace sala::bench {

inline double Median(std::vector<double> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

// The median device time of `run` in seconds over `reps` runs after `warmup` ones, between
// events on the legacy stream (where `run` must queue its work).
template <typename F>
double MedianDeviceSeconds(F&& run, int warmup = 2, int reps = 10) {
  for (int i = 0; i < warmup; ++i) run();
  cudaEvent_t a, b;
  cudaEventCreate(&a);
  cudaEventCreate(&b);
  std::vector<double> t;
  for (int i = 0; i < reps; ++i) {
    cudaEventRecord(a);
    run();
    cudaEventRecord(b);
    cudaEventSynchronize(b);
    float ms = 0;
    cudaEventElapsedTime(&ms, a, b);
    t.push_back(ms / 1e3);
  }
  cudaEventDestroy(a);
  cudaEventDestroy(b);
  return Median(t);
}

}  // namespace sala::bench

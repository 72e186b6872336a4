// One block per row. The top-k and top-p cuts are found by binary search over the logits'
// order-preserving 32-bit keys (32 block reductions each): no sort, no atomics, and the same
// cut values as the CPU's sort-based definition. Weights are fp32 exponentials summed in double:
// the CPU's double weights differ by a few parts in 10^7, so the two pick the same token unless
// u falls that close to a boundary. (Double exponentials on the one SM of a row's block cost a
// batch-1 decode step some 50 us.)
#include <cub/block/block_reduce.cuh>
#include <cub/block/block_scan.cuh>

#include "cuda_common.h"
#include "sampling.h"

namespace sala::cuda {
namespace {

constexpr int kThreads = 1024;

struct MaxOp {
  __device__ float operator()(float a, float b) const { return fmaxf(a, b); }
};
struct MinOp {
  __device__ int operator()(int a, int b) const { return min(a, b); }
};
struct MaxIntOp {
  __device__ int operator()(int a, int b) const { return max(a, b); }
};

// A larger float has a larger key.
__device__ uint32_t OrderKey(float f) {
  const uint32_t u = __float_as_uint(f);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

struct Shared {
  union {
    cub::BlockReduce<float, kThreads>::TempStorage max_value;
    cub::BlockReduce<int, kThreads>::TempStorage int_reduce;
    cub::BlockReduce<double, kThreads>::TempStorage mass;
    cub::BlockScan<double, kThreads>::TempStorage scan;
  } cub;
  float max_value;
  int broadcast;
  double total;
};

__global__ void __launch_bounds__(kThreads)
    DrawTokensKernel(const float* all_logits, int vocab, const TokenDraw* draws, int* tokens) {
  __shared__ Shared sh;
  const float* logits = all_logits + int64_t(blockIdx.x) * vocab;
  const TokenDraw d = draws[blockIdx.x];
  const int tid = threadIdx.x;

  // The largest logit, and the lowest id that has it.
  float local_max = -INFINITY;
  for (int i = tid; i < vocab; i += kThreads) local_max = fmaxf(local_max, logits[i]);
  float block_max = cub::BlockReduce<float, kThreads>(sh.cub.max_value).Reduce(local_max, MaxOp());
  if (tid == 0) sh.max_value = block_max;
  __syncthreads();
  block_max = sh.max_value;
  int first = vocab;
  for (int i = tid; i < vocab; i += kThreads)
    if (logits[i] == block_max) {
      first = i;
      break;
    }
  first = cub::BlockReduce<int, kThreads>(sh.cub.int_reduce).Reduce(first, MinOp());
  if (tid == 0) sh.broadcast = first;
  __syncthreads();
  const int argmax = sh.broadcast;
  if (d.temperature <= 0.0f || vocab <= 1) {
    if (tid == 0) tokens[blockIdx.x] = argmax;
    return;
  }
  const float inv_temperature = 1.0f / d.temperature;
  auto weight = [&](int i) { return double(expf((logits[i] - block_max) * inv_temperature)); };

  // The largest key K for which pred(K) holds, pred true at 0 and monotone.
  auto largest_key = [&](auto pred) {
    uint32_t lo = 0, hi = 0xffffffffu;
    while (lo < hi) {
      const uint32_t mid = lo + uint32_t((uint64_t(hi) - lo + 1) / 2);
      if (pred(mid)) lo = mid;
      else hi = mid - 1;
    }
    return lo;
  };
  // Top-k: the k-th largest key (every key >= it stays).
  uint32_t cut = 0;
  if (d.top_k > 0 && d.top_k < vocab) {
    cut = largest_key([&](uint32_t k) {
      int n = 0;
      for (int i = tid; i < vocab; i += kThreads) n += OrderKey(logits[i]) >= k;
      n = cub::BlockReduce<int, kThreads>(sh.cub.int_reduce).Sum(n);
      if (tid == 0) sh.broadcast = n;
      __syncthreads();
      const bool enough = sh.broadcast >= d.top_k;
      __syncthreads();
      return enough;
    });
  }
  auto mass_at_or_above = [&](uint32_t k) {
    double mass = 0.0;
    for (int i = tid; i < vocab; i += kThreads)
      if (OrderKey(logits[i]) >= k) mass += weight(i);
    mass = cub::BlockReduce<double, kThreads>(sh.cub.mass).Sum(mass);
    if (tid == 0) sh.total = mass;
    __syncthreads();
    mass = sh.total;
    __syncthreads();
    return mass;
  };
  // Top-p: the largest key whose candidates at or above it hold top_p of the candidates' weight.
  if (d.top_p < 1.0f) {
    const double target = double(d.top_p) * mass_at_or_above(cut);
    const uint32_t nucleus = largest_key([&](uint32_t k) { return k <= cut || mass_at_or_above(k) >= target; });
    cut = max(cut, nucleus);
  }

  // The draw: each thread owns a contiguous run of ids, so that a scan of the runs' weights
  // finds the run (and then the id) where the running weight passes u × total.
  const int per = (vocab + kThreads - 1) / kThreads;
  const int begin = min(vocab, tid * per), end = min(vocab, begin + per);
  double own = 0.0;
  int last_kept = -1;
  for (int i = begin; i < end; ++i)
    if (OrderKey(logits[i]) >= cut) {
      own += weight(i);
      last_kept = i;
    }
  double before = 0.0, total = 0.0;
  cub::BlockScan<double, kThreads>(sh.cub.scan).ExclusiveSum(own, before, total);
  const double target = d.u * total;
  __syncthreads();
  if (tid == 0) sh.broadcast = -1;
  __syncthreads();
  if (last_kept >= 0 && before <= target && target < before + own) {
    double running = before;
    int token = last_kept;
    for (int i = begin; i < end; ++i) {
      if (OrderKey(logits[i]) < cut) continue;
      running += weight(i);
      if (running > target) {
        token = i;
        break;
      }
    }
    sh.broadcast = token;
  }
  const int highest_kept = cub::BlockReduce<int, kThreads>(sh.cub.int_reduce).Reduce(last_kept, MaxIntOp());
  __syncthreads();
  if (tid == 0) tokens[blockIdx.x] = sh.broadcast >= 0 ? sh.broadcast : highest_kept;
}

}  // namespace

absl::Status DrawTokens(const float* logits, int rows, int vocab, const TokenDraw* draws, int* tokens,
                        cudaStream_t stream) {
  if (rows <= 0) return absl::OkStatus();
  if (vocab <= 0) return absl::InvalidArgumentError("DrawTokens: empty vocabulary");
  DrawTokensKernel<<<rows, kThreads, 0, stream>>>(logits, vocab, draws, tokens);
  SALA_CUDA_CHECK_LAUNCH();
  return absl::OkStatus();
}

}  // namespace sala::cuda

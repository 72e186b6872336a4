// What the DeviceLink kinds share: CUDA error statuses, bounded waits, device scoping and the
// wire timer behind busy_seconds().
#pragma once

#include <cuda_runtime.h>

#include <functional>
#include <utility>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"

namespace sala::link {

inline absl::Status CudaError(cudaError_t e, const char* what) {
  return absl::InternalError(absl::StrCat(what, ": ", cudaGetErrorString(e)));
}

#define LINK_CUDA(expr)                                                                         \
  do {                                                                                          \
    if (cudaError_t e_ = (expr); e_ != cudaSuccess) return ::sala::link::CudaError(e_, #expr); \
  } while (0)

// How long the work of an aborted link may take to leave.
constexpr absl::Duration kDrainTimeout = absl::Seconds(10);
// The links' polling interval: short next to a transfer, long next to a CPU's time slice.
constexpr absl::Duration kPoll = absl::Microseconds(200);

// What ends a link's wait early: `give_up` (polled) returning true, or `deadline` passing.
// OK while the wait should go on; `what` names the transfer ("the NCCL transfer").
inline absl::Status GivenUpOrLate(absl::Time deadline, const std::function<bool()>& give_up, const char* what) {
  if (give_up && give_up()) return absl::CancelledError(absl::StrCat(what, " was given up"));
  if (absl::Now() > deadline) return absl::DeadlineExceededError(absl::StrCat(what, " did not finish in time"));
  return absl::OkStatus();
}

// Polls `query` (cudaStreamQuery / cudaEventQuery) until the work is done, for kDrainTimeout
// at most: an aborted link frees its work, but a wait must end regardless.
template <typename Query>
bool Drained(Query query) {
  const absl::Time deadline = absl::Now() + kDrainTimeout;
  for (;;) {
    const cudaError_t e = query();
    if (e != cudaErrorNotReady) return true;
    if (absl::Now() > deadline) return false;
    absl::SleepFor(absl::Milliseconds(1));
  }
}

// Makes the link's device current for a scope and then restores the caller's: a link may be
// used or destroyed from any thread.
class OnDevice {
 public:
  explicit OnDevice(int device) {
    if (cudaGetDevice(&previous_) != cudaSuccess) previous_ = -1;
    if (previous_ != device) cudaSetDevice(device);
  }
  ~OnDevice() {
    int now = -1;
    if (previous_ >= 0 && cudaGetDevice(&now) == cudaSuccess && now != previous_) cudaSetDevice(previous_);
  }

 private:
  int previous_ = -1;
};

// Start and end events of each transfer step; Seconds() adds up the steps that completed.
// Not thread-safe; call with the link's device current.
class WireTimer {
 public:
  WireTimer() = default;
  WireTimer(const WireTimer&) = delete;
  WireTimer& operator=(const WireTimer&) = delete;
  // Leaks the events of steps still running rather than wait (the caller drained its stream).
  ~WireTimer() {
    for (auto& [a, b] : steps_) {
      if (cudaEventQuery(b) == cudaErrorNotReady) continue;
      cudaEventDestroy(a);
      cudaEventDestroy(b);
    }
  }

  // Records the start of a step on `stream`; End records its end.
  absl::Status Start(cudaStream_t stream) {
    cudaEvent_t a, b;
    LINK_CUDA(cudaEventCreate(&a));
    if (cudaError_t e = cudaEventCreate(&b); e != cudaSuccess) {
      cudaEventDestroy(a);
      return CudaError(e, "cudaEventCreate");
    }
    steps_.emplace_back(a, b);
    LINK_CUDA(cudaEventRecord(a, stream));
    return absl::OkStatus();
  }
  absl::Status End(cudaStream_t stream) {
    LINK_CUDA(cudaEventRecord(steps_.back().second, stream));
    return absl::OkStatus();
  }

  double Seconds() {
    std::vector<std::pair<cudaEvent_t, cudaEvent_t>> pending;
    for (auto& [a, b] : steps_) {
      float ms = 0;
      if (cudaEventQuery(b) == cudaSuccess && cudaEventElapsedTime(&ms, a, b) == cudaSuccess) {
        seconds_ += ms / 1e3;
        cudaEventDestroy(a);
        cudaEventDestroy(b);
      } else {
        pending.emplace_back(a, b);
      }
    }
    steps_ = std::move(pending);
    return seconds_;
  }

 private:
  std::vector<std::pair<cudaEvent_t, cudaEvent_t>> steps_;
  double seconds_ = 0;
};

}  // namespace sala::link

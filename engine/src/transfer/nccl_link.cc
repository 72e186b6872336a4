#include "sala/nccl_link.h"

#ifdef SALA_HAVE_NCCL

#include <cuda_runtime.h>
#include <nccl.h>

#include <atomic>
#include <chrono>
#include <cstring>
#include <mutex>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "link_util.h"
#include "sala/status_macros.h"

namespace sala {
namespace {

using link::CudaError;
using link::Drained;
using link::kPoll;
using link::OnDevice;

// Queueing a group on a connected link is host work of microseconds; far longer means a stuck peer.
constexpr absl::Duration kEnqueueTimeout = absl::Seconds(30);

class NcclLinkImpl final : public DeviceLink {
 public:
  NcclLinkImpl(ncclComm_t comm, int rank, int device, cudaStream_t stream, cudaEvent_t after_compute)
      : comm_(comm), rank_(rank), device_(device), stream_(stream), after_compute_(after_compute) {}

  const char* kind() const override { return "nccl"; }

  ~NcclLinkImpl() override {
    Abort();  // frees the communicator without needing the peer
    OnDevice on(device_);
    if (!Drained([&] { return cudaStreamQuery(stream_); })) return;  // leaks rather than hangs
    timer_.reset();
    cudaEventDestroy(after_compute_);
    cudaStreamDestroy(stream_);
    if (probe_) cudaFree(probe_);
  }

  // Joins, then connects the pair with a one-byte transfer: NCCL sets up a peer connection in
  // the first send/recv, which blocks until both ranks made it. Both ranks get here on their own
  // (the receiver right after the handshake), so no later transfer waits on a peer's host code.
  absl::Status WaitReady(absl::Time deadline) override {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      if (ready_) return absl::OkStatus();
      if (aborted_) return absl::UnavailableError("NCCL link was aborted");
      ncclResult_t state = ncclSuccess;
      ncclResult_t r = ncclCommGetAsyncError(comm_, &state);
      if (r == ncclSuccess) r = state;
      if (r == ncclSuccess && !connecting_) {
        connecting_ = true;
        OnDevice on(device_);
        if (cudaMalloc(&probe_, 1) != cudaSuccess) {
          cudaGetLastError();
          AbortLocked();
          return absl::ResourceExhaustedError("no device memory for the NCCL link");
        }
        r = ncclGroupStart();
        if (r == ncclSuccess)
          r = rank_ == 0 ? ncclSend(probe_, 1, ncclInt8, 1, comm_, stream_) : ncclRecv(probe_, 1, ncclInt8, 0, comm_, stream_);
        const ncclResult_t end = ncclGroupEnd();
        if (r == ncclSuccess) r = end;
        if (r == ncclSuccess) continue;  // the next round sees whether it completed
      } else if (r == ncclSuccess) {
        ready_ = true;
        return absl::OkStatus();
      }
      if (r != ncclInProgress) {
        absl::Status s = NcclError(r, connecting_ ? "connecting the NCCL peers" : "joining the NCCL communicator");
        AbortLocked();
        return s;
      }
      if (absl::Now() > deadline) {
        AbortLocked();
        return absl::DeadlineExceededError("the NCCL peer did not join in time");
      }
      lock.unlock();
      absl::SleepFor(absl::Milliseconds(1));
      lock.lock();
    }
  }

  absl::StatusOr<int64_t> Send(std::span<const DeviceSpan> spans) override { return Enqueue(spans, true); }
  absl::StatusOr<int64_t> Recv(std::span<const DeviceSpan> spans) override { return Enqueue(spans, false); }

  absl::Status Wait(absl::Time deadline, const std::function<bool()>& give_up) override {
    cudaEvent_t done;
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (aborted_) return absl::UnavailableError("NCCL link was aborted");
      OnDevice on(device_);
      LINK_CUDA(cudaEventCreateWithFlags(&done, cudaEventDisableTiming));
      if (cudaError_t e = cudaEventRecord(done, stream_); e != cudaSuccess) {
        cudaEventDestroy(done);
        return CudaError(e, "cudaEventRecord");
      }
    }
    absl::Status status = absl::OkStatus();
    for (;;) {
      const cudaError_t q = cudaEventQuery(done);
      if (q == cudaSuccess) break;
      if (q != cudaErrorNotReady) {
        status = CudaError(q, "waiting for the NCCL transfer");
        break;
      }
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (aborted_) {
          status = absl::UnavailableError("NCCL link was aborted during the transfer");
          break;
        }
        ncclResult_t state = ncclSuccess;
        if (ncclCommGetAsyncError(comm_, &state) != ncclSuccess || (state != ncclSuccess && state != ncclInProgress)) {
          status = NcclError(state, "NCCL transfer");
          break;
        }
      }
      status = link::GivenUpOrLate(deadline, give_up, "the NCCL transfer");
      if (!status.ok()) break;
      absl::SleepFor(kPoll);
    }
    if (!status.ok()) Abort();  // frees kernels that wait for the peer, so `done` completes
    if (Drained([&] { return cudaEventQuery(done); })) cudaEventDestroy(done);
    return status;
  }

  double busy_seconds() override {
    std::lock_guard<std::mutex> lock(mu_);
    OnDevice on(device_);
    return timer_->Seconds();
  }

  void Abort() override {
    std::lock_guard<std::mutex> lock(mu_);
    AbortLocked();
  }

  bool aborted() const override { return aborted_; }

 private:
  absl::Status NcclError(ncclResult_t r, const char* what) {
    const char* last = aborted_ ? "" : ncclGetLastError(comm_);
    return absl::UnavailableError(absl::StrCat(what, ": ", ncclGetErrorString(r), last && *last ? " (" : "",
                                               last ? last : "", last && *last ? ")" : ""));
  }

  void AbortLocked() {
    if (aborted_.exchange(true)) return;
    ncclCommAbort(comm_);
  }

  absl::StatusOr<int64_t> Enqueue(std::span<const DeviceSpan> spans, bool send) {
    if (send != (rank_ == 0)) return absl::InternalError("rank 0 sends and rank 1 receives");
    std::unique_lock<std::mutex> lock(mu_);
    if (aborted_) return absl::UnavailableError("NCCL link was aborted");
    if (!ready_) return absl::FailedPreconditionError("NCCL link is not ready");
    OnDevice on(device_);
    if (send) {
      // The rows must be computed before they leave; the receiver's buffers are ready already.
      LINK_CUDA(cudaEventRecord(after_compute_, cudaStreamLegacy));
      LINK_CUDA(cudaStreamWaitEvent(stream_, after_compute_, 0));
    }
    SALA_RETURN_IF_ERROR(timer_->Start(stream_));
    int64_t bytes = 0;
    ncclResult_t r = ncclGroupStart();
    for (const DeviceSpan& s : spans) {
      if (r != ncclSuccess && r != ncclInProgress) break;
      r = send ? ncclSend(s.data, s.bytes, ncclInt8, 1, comm_, stream_) : ncclRecv(s.data, s.bytes, ncclInt8, 0, comm_, stream_);
      bytes += int64_t(s.bytes);
    }
    const ncclResult_t end_r = ncclGroupEnd();
    if (r == ncclSuccess || r == ncclInProgress) r = end_r;
    // A non-blocking communicator may still be queueing the group; the peers are connected
    // (WaitReady), so this takes host time only, but it is bounded all the same.
    const absl::Time give_up = absl::Now() + kEnqueueTimeout;
    while (r == ncclInProgress && !aborted_) {
      lock.unlock();
      std::this_thread::sleep_for(std::chrono::microseconds(20));
      lock.lock();
      if (aborted_) break;
      ncclResult_t state = ncclSuccess;
      r = ncclCommGetAsyncError(comm_, &state);
      if (r == ncclSuccess) r = state;
      if (r == ncclInProgress && absl::Now() > give_up) r = ncclRemoteError;
    }
    if (aborted_) return absl::UnavailableError("NCCL link was aborted");
    if (r != ncclSuccess) {
      absl::Status s = NcclError(r, send ? "ncclSend" : "ncclRecv");
      AbortLocked();
      return s;
    }
    SALA_RETURN_IF_ERROR(timer_->End(stream_));
    return bytes;
  }

  ncclComm_t comm_;
  const int rank_, device_;
  cudaStream_t stream_;
  cudaEvent_t after_compute_;
  std::mutex mu_;
  std::atomic<bool> aborted_{false};
  bool ready_ = false, connecting_ = false;
  void* probe_ = nullptr;  // the one byte that connects the peers
  std::unique_ptr<link::WireTimer> timer_ = std::make_unique<link::WireTimer>();  // each group
};

}  // namespace

bool NcclLink::Available() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return n > 0;
}

absl::StatusOr<std::string> NcclLink::NewUniqueId() {
  ncclUniqueId id;
  if (ncclResult_t r = ncclGetUniqueId(&id); r != ncclSuccess)
    return absl::UnavailableError(absl::StrCat("ncclGetUniqueId: ", ncclGetErrorString(r)));
  return std::string(reinterpret_cast<const char*>(&id), sizeof(id));
}

absl::StatusOr<std::unique_ptr<DeviceLink>> NcclLink::Join(const std::string& unique_id, int rank) {
  if (unique_id.size() != sizeof(ncclUniqueId))
    return absl::InvalidArgumentError(absl::StrCat("an NCCL unique id has ", sizeof(ncclUniqueId), " bytes, not ",
                                                   unique_id.size()));
  if (rank != 0 && rank != 1) return absl::InvalidArgumentError("an NCCL link has ranks 0 and 1");
  ncclUniqueId id;
  std::memcpy(&id, unique_id.data(), sizeof(id));
  int device = 0;
  LINK_CUDA(cudaGetDevice(&device));
  cudaStream_t stream;
  // Highest priority: the transfer kernels of a chunk get SMs ahead of the next chunk's compute.
  int least = 0, greatest = 0;
  LINK_CUDA(cudaDeviceGetStreamPriorityRange(&least, &greatest));
  LINK_CUDA(cudaStreamCreateWithPriority(&stream, cudaStreamNonBlocking, greatest));
  cudaEvent_t after_compute;
  if (cudaError_t e = cudaEventCreateWithFlags(&after_compute, cudaEventDisableTiming); e != cudaSuccess) {
    cudaStreamDestroy(stream);
    return CudaError(e, "cudaEventCreate");
  }
  ncclConfig_t config = NCCL_CONFIG_INITIALIZER;
  config.blocking = 0;  // joins and waits are polled, so that every one has a deadline
  ncclComm_t comm = nullptr;
  const ncclResult_t r = ncclCommInitRankConfig(&comm, 2, id, rank, &config);
  if (r != ncclSuccess && r != ncclInProgress) {
    if (comm) ncclCommAbort(comm);
    cudaEventDestroy(after_compute);
    cudaStreamDestroy(stream);
    return absl::UnavailableError(absl::StrCat("ncclCommInitRankConfig: ", ncclGetErrorString(r)));
  }
  return std::unique_ptr<DeviceLink>(new NcclLinkImpl(comm, rank, device, stream, after_compute));
}

}  // namespace sala

#else  // !SALA_HAVE_NCCL

namespace sala {

bool NcclLink::Available() { return false; }

absl::StatusOr<std::string> NcclLink::NewUniqueId() {
  return absl::FailedPreconditionError("this build has no NCCL");
}

absl::StatusOr<std::unique_ptr<DeviceLink>> NcclLink::Join(const std::string&, int) {
  return absl::FailedPreconditionError("this build has no NCCL");
}

}  // namespace sala

#endif

#include "sala/copy_link.h"

#include <unistd.h>

#include <fstream>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

#ifdef SALA_HAVE_CUDA

#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "link_util.h"
#include "sala/status_macros.h"

namespace sala {
namespace {

using link::CudaError;
using link::Drained;
using link::OnDevice;

// The two counters follow the slots, each on its own 256-byte line: pieces filled (written by
// the sender's copy stream) and pieces drained (written by the receiver's).
constexpr int64_t kCounterStride = 256;
enum Counter { kFilled = 0, kDrained = 1 };
// How long the hosts wait between two reads of a counter: a piece of a few MiB takes tens of
// microseconds on NVLink, and the ring keeps the sender that many pieces ahead.
constexpr absl::Duration kCounterPoll = absl::Microseconds(20);
// How long a ring outlives its link: a sender stops writing once the ring stops draining (at
// most a ring's worth of pieces later) or once it hears of the abort, within seconds.
constexpr absl::Duration kRingQuarantine = absl::Seconds(60);

// Random, not the pid: pids repeat across containers of one host.
const std::string& ThisProcess() {
  static const std::string id = [] {
    std::random_device rd;
    return absl::StrCat(absl::Hex(uint64_t(rd()) << 32 | rd(), absl::kZeroPad16),
                        absl::Hex(uint64_t(rd()) << 32 | rd(), absl::kZeroPad16));
  }();
  return id;
}

struct QuarantinedRing {
  void* ring;
  int device;
  absl::Time freed_at;
};
std::mutex quarantine_mu;
std::vector<QuarantinedRing>& Quarantine() {
  static auto* rings = new std::vector<QuarantinedRing>();
  return *rings;
}

// Frees the rings whose quarantine is over.
void FreeQuarantinedRings() {
  std::lock_guard<std::mutex> lock(quarantine_mu);
  auto& rings = Quarantine();
  const absl::Time now = absl::Now();
  for (auto it = rings.begin(); it != rings.end();) {
    if (now < it->freed_at) {
      ++it;
      continue;
    }
    OnDevice on(it->device);
    cudaFree(it->ring);
    it = rings.erase(it);
  }
}

class CopyLinkImpl final : public DeviceLink {
 public:
  enum class Role { kSender, kReceiver };
  struct Ring {
    char* base = nullptr;
    int64_t slot_bytes = 0;
    int32_t slots = 0;
    bool owned = false;       // the receiver's allocation
    bool ipc_mapped = false;  // opened from another process's handle
  };

  static absl::StatusOr<std::unique_ptr<CopyLinkImpl>> Make(Role role, Ring ring) {
    int device = 0;
    LINK_CUDA(cudaGetDevice(&device));
    auto link = std::unique_ptr<CopyLinkImpl>(new CopyLinkImpl(role, device, ring));
    LINK_CUDA(cudaStreamCreateWithFlags(&link->stream_, cudaStreamNonBlocking));
    LINK_CUDA(cudaStreamCreateWithFlags(&link->poll_stream_, cudaStreamNonBlocking));
    // One counter value per slot (a slot's value is rewritten only after its piece cycled the
    // ring, so its copy has run by then), and one word that polls land in.
    LINK_CUDA(cudaHostAlloc(&link->host_words_, (ring.slots + 1) * sizeof(uint64_t), cudaHostAllocDefault));
    if (role == Role::kReceiver) {
      LINK_CUDA(cudaMemsetAsync(ring.base + ring.slots * ring.slot_bytes, 0, 2 * kCounterStride, link->stream_));
      LINK_CUDA(cudaStreamSynchronize(link->stream_));
    }
    link->pump_ = std::thread([l = link.get()] { l->Pump(); });
    return link;
  }

  ~CopyLinkImpl() override {
    Abort();
    if (pump_.joinable()) pump_.join();
    OnDevice on(device_);
    for (Step& s : steps_) cudaEventDestroy(s.ready);
    if (stream_ && !Drained([&] { return cudaStreamQuery(stream_); })) return;  // leaks rather than hangs
    timer_.reset();
    if (stream_) cudaStreamDestroy(stream_);
    if (poll_stream_) cudaStreamDestroy(poll_stream_);
    if (host_words_) cudaFreeHost(host_words_);
    if (ring_.ipc_mapped) cudaIpcCloseMemHandle(ring_.base);
    if (ring_.owned) {
      std::lock_guard<std::mutex> lock(quarantine_mu);
      Quarantine().push_back({ring_.base, device_, absl::Now() + kRingQuarantine});
    }
  }

  const char* kind() const override { return "copy"; }
  absl::Status WaitReady(absl::Time) override {
    if (aborted_) return absl::UnavailableError("copy link was aborted");
    return absl::OkStatus();
  }
  absl::StatusOr<int64_t> Send(std::span<const DeviceSpan> spans) override { return Queue(spans, Role::kSender); }
  absl::StatusOr<int64_t> Recv(std::span<const DeviceSpan> spans) override { return Queue(spans, Role::kReceiver); }

  absl::Status Wait(absl::Time deadline, const std::function<bool()>& give_up) override {
    absl::Status status = absl::OkStatus();
    for (bool queued = true;;) {
      {
        std::lock_guard<std::mutex> lock(mu_);
        if (!error_.ok()) return error_;
        if (aborted_) return absl::UnavailableError("copy link was aborted");
        queued = !steps_.empty() || pumping_;
      }
      // Everything is queued on the stream: until its copies land.
      if (!queued) {
        const cudaError_t q = cudaStreamQuery(stream_);
        if (q == cudaSuccess) return absl::OkStatus();
        if (q != cudaErrorNotReady) {
          status = CudaError(q, "waiting for the copy-engine transfer");
          break;
        }
      }
      if (give_up && give_up()) {
        status = absl::CancelledError("the copy-engine transfer was given up");
        break;
      }
      if (absl::Now() > deadline) {
        status = absl::DeadlineExceededError("the copy-engine transfer did not finish in time");
        break;
      }
      absl::SleepFor(link::kPoll);
    }
    Abort();
    return status;
  }

  double busy_seconds() override {
    std::lock_guard<std::mutex> lock(mu_);
    OnDevice on(device_);
    return timer_->Seconds();
  }

  void Abort() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      aborted_ = true;
    }
    cv_.notify_all();
  }

  bool aborted() const override { return aborted_; }

 private:
  // One Send or Recv: its spans (contiguous ones merged) and the default stream's progress
  // when it was queued.
  struct Step {
    std::vector<DeviceSpan> spans;
    int64_t bytes = 0;
    cudaEvent_t ready = nullptr;
  };

  CopyLinkImpl(Role role, int device, Ring ring) : role_(role), device_(device), ring_(ring) {}

  char* CounterAt(Counter c) const { return ring_.base + ring_.slots * ring_.slot_bytes + c * kCounterStride; }

  absl::StatusOr<int64_t> Queue(std::span<const DeviceSpan> spans, Role role) {
    if (role != role_) return absl::InternalError("the sender sends and the receiver receives");
    Step step;
    for (const DeviceSpan& s : spans) {
      if (s.bytes == 0) continue;
      DeviceSpan* last = step.spans.empty() ? nullptr : &step.spans.back();
      if (last && static_cast<char*>(last->data) + last->bytes == s.data) last->bytes += s.bytes;
      else step.spans.push_back(s);
      step.bytes += int64_t(s.bytes);
    }
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_) return absl::UnavailableError("copy link was aborted");
    if (step.bytes == 0) return 0;
    OnDevice on(device_);
    // The sender's rows must be computed, the receiver's memory ready, before the copies.
    LINK_CUDA(cudaEventCreateWithFlags(&step.ready, cudaEventDisableTiming));
    if (cudaError_t e = cudaEventRecord(step.ready, cudaStreamLegacy); e != cudaSuccess) {
      cudaEventDestroy(step.ready);
      return CudaError(e, "cudaEventRecord");
    }
    const int64_t bytes = step.bytes;
    steps_.push_back(std::move(step));
    cv_.notify_all();
    return bytes;
  }

  void Pump() {
    cudaSetDevice(device_);
    for (;;) {
      Step step;
      {
        std::unique_lock<std::mutex> lock(mu_);
        cv_.wait(lock, [&] { return aborted_ || !steps_.empty(); });
        if (aborted_) return;
        step = std::move(steps_.front());
        steps_.pop_front();
        pumping_ = true;
      }
      absl::Status s = Move(step);
      cudaEventDestroy(step.ready);
      {
        std::lock_guard<std::mutex> lock(mu_);
        pumping_ = false;
        if (!s.ok() && !aborted_) {
          error_ = s;
          aborted_ = true;
        }
      }
      cv_.notify_all();
    }
  }

  // Until the peer's counter reaches `target`, or the link is aborted.
  absl::Status AwaitCounter(Counter c, uint64_t target) {
    while (seen_[c] < target) {
      if (aborted_) return absl::UnavailableError("copy link was aborted");
      uint64_t* word = &host_words_[ring_.slots];
      LINK_CUDA(cudaMemcpyAsync(word, CounterAt(c), sizeof(uint64_t), cudaMemcpyDefault, poll_stream_));
      LINK_CUDA(cudaStreamSynchronize(poll_stream_));
      const uint64_t value = *static_cast<volatile uint64_t*>(word);
      seen_[c] = std::max(seen_[c], value);
      if (seen_[c] < target) absl::SleepFor(kCounterPoll);
    }
    return absl::OkStatus();
  }

  // Moves one step piece by piece through the ring.
  absl::Status Move(const Step& step) {
    const bool send = role_ == Role::kSender;
    LINK_CUDA(cudaStreamWaitEvent(stream_, step.ready, 0));
    size_t span = 0, in_span = 0;
    for (int64_t left = step.bytes; left > 0;) {
      const uint64_t n = pieces_;
      const int32_t slot = int32_t(n % uint64_t(ring_.slots));
      // The sender may fill a slot once the receiver drained its previous piece; the receiver
      // may drain it once the sender filled it.
      if (send) SALA_RETURN_IF_ERROR(AwaitCounter(kDrained, n >= uint64_t(ring_.slots) ? n + 1 - ring_.slots : 0));
      else SALA_RETURN_IF_ERROR(AwaitCounter(kFilled, n + 1));
      if (left == step.bytes) {
        // The step's wire time starts with its first piece: for the sender once its rows are
        // computed, for the receiver once the first piece has arrived.
        std::lock_guard<std::mutex> lock(mu_);
        SALA_RETURN_IF_ERROR(timer_->Start(stream_));
      }
      const int64_t piece = std::min(left, ring_.slot_bytes);
      char* staged = ring_.base + slot * ring_.slot_bytes;
      for (int64_t at = 0; at < piece;) {
        const DeviceSpan& s = step.spans[span];
        const size_t len = std::min(s.bytes - in_span, size_t(piece - at));
        char* mine = static_cast<char*>(s.data) + in_span;
        LINK_CUDA(cudaMemcpyAsync(send ? staged + at : mine, send ? mine : staged + at, len, cudaMemcpyDefault, stream_));
        at += int64_t(len);
        in_span += len;
        if (in_span == s.bytes) {
          ++span;
          in_span = 0;
        }
      }
      host_words_[slot] = n + 1;
      LINK_CUDA(cudaMemcpyAsync(CounterAt(send ? kFilled : kDrained), &host_words_[slot], sizeof(uint64_t),
                                cudaMemcpyDefault, stream_));
      pieces_ = n + 1;
      left -= piece;
    }
    std::lock_guard<std::mutex> lock(mu_);
    return timer_->End(stream_);
  }

  const Role role_;
  const int device_;
  const Ring ring_;
  cudaStream_t stream_ = nullptr;       // the copies and counter writes, in piece order
  cudaStream_t poll_stream_ = nullptr;  // reads of the peer's counter
  uint64_t* host_words_ = nullptr;      // pinned: [slots] counter values, then the polled word
  std::thread pump_;
  // Pump thread only: pieces moved over the link's life, the counters' last values read.
  uint64_t pieces_ = 0;
  uint64_t seen_[2] = {0, 0};

  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<Step> steps_;
  bool pumping_ = false;
  std::atomic<bool> aborted_{false};
  absl::Status error_;
  std::unique_ptr<link::WireTimer> timer_ = std::make_unique<link::WireTimer>();
};

absl::Status CheckGeometry(int64_t slot_bytes, int32_t slots) {
  if (slot_bytes <= 0 || slot_bytes % kCounterStride != 0 || slots < 2 || slot_bytes > (int64_t(1) << 34) / slots)
    return absl::InvalidArgumentError(absl::StrCat("a copy ring of ", slots, " slots of ", slot_bytes,
                                                   " bytes (at least 2 slots, a multiple of 256 bytes each, 16 GiB in all at most)"));
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<std::pair<std::unique_ptr<DeviceLink>, CopyRing>> CopyLink::Listen(int64_t slot_bytes, int32_t slots) {
  SALA_RETURN_IF_ERROR(CheckGeometry(slot_bytes, slots));
  FreeQuarantinedRings();
  void* base = nullptr;
  if (cudaError_t e = cudaMalloc(&base, slots * slot_bytes + 2 * kCounterStride); e != cudaSuccess) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(absl::StrCat("no device memory for a copy ring: ", cudaGetErrorString(e)));
  }
  cudaIpcMemHandle_t handle;
  if (cudaError_t e = cudaIpcGetMemHandle(&handle, base); e != cudaSuccess) {
    cudaGetLastError();
    cudaFree(base);
    return absl::UnavailableError(absl::StrCat("cudaIpcGetMemHandle: ", cudaGetErrorString(e)));
  }
  // From here the link owns the ring.
  auto link = CopyLinkImpl::Make(CopyLinkImpl::Role::kReceiver,
                                 {static_cast<char*>(base), slot_bytes, slots, /*owned=*/true, /*ipc_mapped=*/false});
  if (!link.ok()) return link.status();
  CopyRing ring;
  ring.ipc_handle.assign(reinterpret_cast<const char*>(&handle), sizeof(handle));
  ring.slot_bytes = slot_bytes;
  ring.slots = slots;
  ring.process_id = ThisProcess();
  ring.address = reinterpret_cast<uint64_t>(base);
  return std::pair<std::unique_ptr<DeviceLink>, CopyRing>(std::move(*link), std::move(ring));
}

absl::StatusOr<std::unique_ptr<DeviceLink>> CopyLink::Connect(const CopyRing& ring) {
  SALA_RETURN_IF_ERROR(CheckGeometry(ring.slot_bytes, ring.slots));
  int device = 0;
  LINK_CUDA(cudaGetDevice(&device));
  void* base = nullptr;
  const bool same_process = ring.process_id == ThisProcess();
  if (same_process) {
    base = reinterpret_cast<void*>(ring.address);
    cudaPointerAttributes attr;
    LINK_CUDA(cudaPointerGetAttributes(&attr, base));
    if (attr.type != cudaMemoryTypeDevice) return absl::InvalidArgumentError("a copy ring outside device memory");
    int can = 0;
    if (attr.device != device && cudaDeviceCanAccessPeer(&can, device, attr.device) == cudaSuccess && can) {
      if (cudaError_t e = cudaDeviceEnablePeerAccess(attr.device, 0);
          e != cudaSuccess && e != cudaErrorPeerAccessAlreadyEnabled)
        return CudaError(e, "cudaDeviceEnablePeerAccess");
      cudaGetLastError();
    }
  } else {
    cudaIpcMemHandle_t handle;
    if (ring.ipc_handle.size() != sizeof(handle))
      return absl::InvalidArgumentError(absl::StrCat("a CUDA IPC handle has ", sizeof(handle), " bytes, not ",
                                                     ring.ipc_handle.size()));
    std::memcpy(&handle, ring.ipc_handle.data(), sizeof(handle));
    if (cudaError_t e = cudaIpcOpenMemHandle(&base, handle, cudaIpcMemLazyEnablePeerAccess); e != cudaSuccess) {
      cudaGetLastError();
      return absl::UnavailableError(absl::StrCat("cannot map the decode GPU's copy ring (cudaIpcOpenMemHandle: ",
                                                 cudaGetErrorString(e), ")"));
    }
  }
  auto link = CopyLinkImpl::Make(CopyLinkImpl::Role::kSender, {static_cast<char*>(base), ring.slot_bytes, ring.slots,
                                                               /*owned=*/false, /*ipc_mapped=*/!same_process});
  if (!link.ok()) return link.status();
  return std::unique_ptr<DeviceLink>(std::move(*link));
}

}  // namespace sala

#else  // !SALA_HAVE_CUDA

namespace sala {

absl::StatusOr<std::pair<std::unique_ptr<DeviceLink>, CopyRing>> CopyLink::Listen(int64_t, int32_t) {
  return absl::FailedPreconditionError("this build has no CUDA");
}

absl::StatusOr<std::unique_ptr<DeviceLink>> CopyLink::Connect(const CopyRing&) {
  return absl::FailedPreconditionError("this build has no CUDA");
}

}  // namespace sala

#endif

namespace sala {

std::string CopyLink::HostId() {
  std::ifstream boot("/proc/sys/kernel/random/boot_id");
  std::string id;
  if (boot && std::getline(boot, id) && !absl::StripAsciiWhitespace(id).empty())
    return std::string(absl::StripAsciiWhitespace(id));
  char name[256] = {};
  if (gethostname(name, sizeof(name) - 1) == 0) return name;
  return "";
}

}  // namespace sala

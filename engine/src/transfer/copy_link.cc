#include "sala/copy_link.h"

#include <poll.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include <fstream>
#include <random>

#include "absl/strings/ascii.h"
#include "absl/strings/str_cat.h"

#ifdef SALA_HAVE_CUDA

#include <cuda.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <atomic>
#include <cerrno>
#include <condition_variable>
#include <cstddef>
#include <cstring>
#include <deque>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/cleanup/cleanup.h"
#include "absl/time/clock.h"
#include "cuda/driver_api.h"
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
// What an aborting end writes into the counter its stream may wait on, so that every wait passes.
constexpr uint64_t kUnblocked = uint64_t(1) << 62;
// The receiver's host reads the filled counter (an 8-byte copy, ~10 us) back to back for this
// many reads after the last change, then sleeps between reads. Its wake-up latency stays off the
// wire: the ring buffers the sender's first pieces meanwhile.
constexpr int kSpinningReads = 200;
constexpr absl::Duration kCounterPoll = absl::Microseconds(50);
// What a pointer is, for errors: "device 1", "host", "unknown".
std::string DescribePointer(const void* p) {
  cudaPointerAttributes attr;
  if (cudaPointerGetAttributes(&attr, p) != cudaSuccess) {
    cudaGetLastError();
    return absl::StrCat(absl::Hex(reinterpret_cast<uintptr_t>(p)), " (unknown to CUDA)");
  }
  switch (attr.type) {
    case cudaMemoryTypeDevice:
      return absl::StrCat(absl::Hex(reinterpret_cast<uintptr_t>(p)), " (device ", attr.device, ")");
    case cudaMemoryTypeHost:
      return absl::StrCat(absl::Hex(reinterpret_cast<uintptr_t>(p)), " (pinned host)");
    case cudaMemoryTypeManaged:
      return absl::StrCat(absl::Hex(reinterpret_cast<uintptr_t>(p)), " (managed)");
    default:
      return absl::StrCat(absl::Hex(reinterpret_cast<uintptr_t>(p)), " (pageable host)");
  }
}

// Random, not the pid: pids repeat across containers of one host.
const std::string& ThisProcess() {
  static const std::string id = [] {
    std::random_device rd;
    return absl::StrCat(absl::Hex(uint64_t(rd()) << 32 | rd(), absl::kZeroPad16),
                        absl::Hex(uint64_t(rd()) << 32 | rd(), absl::kZeroPad16));
  }();
  return id;
}

// A connection's wait for the ring's file descriptor.
constexpr absl::Duration kHandOverTimeout = absl::Seconds(10);

// The hand-over message: the ring's size, with the file descriptor of its memory beside it.
struct RingMessage {
  int64_t mapped_bytes = 0;
  iovec data{&mapped_bytes, sizeof(mapped_bytes)};
  alignas(cmsghdr) char control[CMSG_SPACE(sizeof(int))] = {};
  msghdr msg{};
  RingMessage() {
    msg.msg_iov = &data;
    msg.msg_iovlen = 1;
    msg.msg_control = control;
    msg.msg_controllen = sizeof(control);
  }
  RingMessage(const RingMessage&) = delete;
  RingMessage& operator=(const RingMessage&) = delete;
};

// Hands the ring's memory (a file descriptor of its cuMem allocation) to senders that connect
// to an abstract Unix socket, as long as the receiver's link lives. Only processes of this
// user are served.
class RingServer {
 public:
  static absl::StatusOr<std::unique_ptr<RingServer>> Start(int memory_fd, int64_t mapped_bytes) {
    auto server = std::unique_ptr<RingServer>(new RingServer(memory_fd, mapped_bytes));
    server->name_ = absl::StrCat("sala-copy-ring-", ThisProcess(), "-", Counter());
    server->socket_ = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (server->socket_ < 0) return absl::UnavailableError(absl::StrCat("socket: ", strerror(errno)));
    sockaddr_un addr = Address(server->name_);
    if (bind(server->socket_, reinterpret_cast<sockaddr*>(&addr), AddressLength(server->name_)) != 0 ||
        listen(server->socket_, 4) != 0)
      return absl::UnavailableError(absl::StrCat("the copy ring's socket: ", strerror(errno)));
    server->thread_ = std::thread([s = server.get()] { s->Serve(); });
    return server;
  }

  ~RingServer() {
    stop_ = true;
    if (thread_.joinable()) thread_.join();
    if (socket_ >= 0) close(socket_);
    close(memory_fd_);
  }

  const std::string& name() const { return name_; }

  // The sender's end: the ring's file descriptor from the server called `name`.
  static absl::StatusOr<int> Fetch(const std::string& name, int64_t mapped_bytes) {
    const int fd = socket(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return absl::UnavailableError(absl::StrCat("socket: ", strerror(errno)));
    absl::Cleanup closer = [fd] { close(fd); };
    const timeval timeout = absl::ToTimeval(kHandOverTimeout);
    setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &timeout, sizeof(timeout));
    sockaddr_un addr = Address(name);
    if (connect(fd, reinterpret_cast<sockaddr*>(&addr), AddressLength(name)) != 0)
      return absl::UnavailableError(absl::StrCat("cannot reach the decode worker's copy ring (", strerror(errno),
                                                 "): it is not in this network namespace"));
    RingMessage m;
    if (recvmsg(fd, &m.msg, MSG_CMSG_CLOEXEC) != ssize_t(sizeof(m.mapped_bytes)))
      return absl::UnavailableError("the decode worker did not hand over its copy ring");
    const int64_t bytes = m.mapped_bytes;
    const cmsghdr* c = CMSG_FIRSTHDR(&m.msg);
    if (c == nullptr || c->cmsg_level != SOL_SOCKET || c->cmsg_type != SCM_RIGHTS)
      return absl::UnavailableError("the decode worker did not hand over its copy ring");
    int memory_fd = -1;
    std::memcpy(&memory_fd, CMSG_DATA(c), sizeof(int));
    if (bytes != mapped_bytes) {
      close(memory_fd);
      return absl::InvalidArgumentError(absl::StrCat("a copy ring of ", bytes, " bytes where ", mapped_bytes,
                                                     " were announced"));
    }
    return memory_fd;
  }

 private:
  RingServer(int memory_fd, int64_t mapped_bytes) : memory_fd_(memory_fd), mapped_bytes_(mapped_bytes) {}

  static int Counter() {
    static std::atomic<int> n{0};
    return n++;
  }
  // An abstract address: no file to clean up, gone with the socket.
  static sockaddr_un Address(const std::string& name) {
    sockaddr_un addr{};
    addr.sun_family = AF_UNIX;
    std::memcpy(addr.sun_path + 1, name.data(), std::min(name.size(), sizeof(addr.sun_path) - 2));
    return addr;
  }
  static socklen_t AddressLength(const std::string& name) {
    return socklen_t(offsetof(sockaddr_un, sun_path) + 1 + std::min(name.size(), sizeof(sockaddr_un::sun_path) - 2));
  }

  void Serve() {
    while (!stop_) {
      pollfd p{socket_, POLLIN, 0};
      if (poll(&p, 1, 100) <= 0) continue;
      const int conn = accept4(socket_, nullptr, nullptr, SOCK_CLOEXEC);
      if (conn < 0) continue;
      ucred peer{};
      socklen_t len = sizeof(peer);
      if (getsockopt(conn, SOL_SOCKET, SO_PEERCRED, &peer, &len) == 0 && peer.uid == geteuid()) {
        RingMessage m;
        m.mapped_bytes = mapped_bytes_;
        cmsghdr* c = CMSG_FIRSTHDR(&m.msg);
        c->cmsg_level = SOL_SOCKET;
        c->cmsg_type = SCM_RIGHTS;
        c->cmsg_len = CMSG_LEN(sizeof(int));
        std::memcpy(CMSG_DATA(c), &memory_fd_, sizeof(int));
        (void)sendmsg(conn, &m.msg, MSG_NOSIGNAL);
      }
      close(conn);
    }
  }

  const int memory_fd_;
  const int64_t mapped_bytes_;
  std::string name_;
  int socket_ = -1;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

// Lets `device` read and write [va, va + bytes).
absl::Status AllowAccess(CUdeviceptr va, size_t bytes, int device) {
  SALA_ASSIGN_OR_RETURN(const cuda::DriverApi* drv, cuda::GetDriverApi());
  CUmemAccessDesc access{};
  access.location.type = CU_MEM_LOCATION_TYPE_DEVICE;
  access.location.id = device;
  access.flags = CU_MEM_ACCESS_FLAGS_PROT_READWRITE;
  if (const CUresult r = drv->set_access(va, bytes, &access, 1); r != CUDA_SUCCESS)
    return absl::FailedPreconditionError(absl::StrCat("this GPU cannot map the decode GPU's copy ring (cuMemSetAccess: "
                                                      "CUDA driver error ", int(r), "; no peer access between them?)"));
  return absl::OkStatus();
}

// A mapping of a ring's memory in this process: the receiver's own allocation, or the sender's
// import of it. The memory lives on until every process has unmapped it, so a sender that has
// not yet heard of an abort writes into memory nobody else uses.
struct RingMapping {
  CUdeviceptr va = 0;
  size_t bytes = 0;
  CUmemGenericAllocationHandle handle = 0;  // released once mapped
  ~RingMapping() {
    auto drv = cuda::GetDriverApi();
    if (!drv.ok()) return;
    if (va && mapped) (*drv)->unmap(va, bytes);
    if (va) (*drv)->address_free(va, bytes);
    if (handle) (*drv)->release(handle);
  }
  // Maps `handle` at a fresh address, readable and writable by `device`.
  absl::Status Map(int device) {
    SALA_ASSIGN_OR_RETURN(const cuda::DriverApi* drv, cuda::GetDriverApi());
    SALA_RETURN_IF_ERROR(cuda::DriverStatus(drv->reserve(&va, bytes, 0, 0, 0), "cuMemAddressReserve (copy ring)"));
    SALA_RETURN_IF_ERROR(cuda::DriverStatus(drv->map(va, bytes, 0, handle, 0), "cuMemMap (copy ring)"));
    mapped = true;
    drv->release(handle);
    handle = 0;
    return AllowAccess(va, bytes, device);
  }
  bool mapped = false;
};

class CopyLinkImpl final : public DeviceLink {
 public:
  enum class Role { kSender, kReceiver };
  struct Ring {
    char* base = nullptr;
    int64_t slot_bytes = 0;
    int32_t slots = 0;
    std::unique_ptr<RingMapping> mapping;  // null where another link of this process owns it
    std::unique_ptr<RingServer> server;    // the receiver's
  };

  static absl::StatusOr<std::unique_ptr<CopyLinkImpl>> Make(Role role, Ring ring) {
    int device = 0;
    LINK_CUDA(cudaGetDevice(&device));
    SALA_ASSIGN_OR_RETURN(const cuda::DriverApi* drv, cuda::GetDriverApi());
    auto link = std::unique_ptr<CopyLinkImpl>(new CopyLinkImpl(role, device, std::move(ring), drv));
    const Ring& r = link->ring_;
    // Created one after the other, so that they get separate hardware queues: the side stream's
    // writes must reach the GPU while the copy stream waits on a counter.
    LINK_CUDA(cudaStreamCreateWithFlags(&link->stream_, cudaStreamNonBlocking));
    LINK_CUDA(cudaStreamCreateWithFlags(&link->side_stream_, cudaStreamNonBlocking));
    LINK_CUDA(cudaHostAlloc(&link->polled_, sizeof(uint64_t), cudaHostAllocDefault));
    if (role == Role::kReceiver) {
      LINK_CUDA(cudaMemsetAsync(r.base + r.slots * r.slot_bytes, 0, 2 * kCounterStride, link->stream_));
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
    // A stream that Abort could not drain is leaked rather than waited for.
    if (stream_ && cudaStreamQuery(stream_) != cudaSuccess) return;
    timer_.reset();
    if (stream_) cudaStreamDestroy(stream_);
    if (side_stream_) cudaStreamDestroy(side_stream_);
    if (polled_) cudaFreeHost(polled_);
    ring_.server.reset();
    ring_.mapping.reset();
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
        status = error_;
        if (status.ok() && aborted_) return absl::UnavailableError("copy link was aborted");
        queued = !steps_.empty() || pumping_;
      }
      if (!status.ok()) break;  // the pump failed: drain what it queued
      // Everything is queued on the stream: until its copies land.
      if (!queued) {
        const cudaError_t q = cudaStreamQuery(stream_);
        if (q == cudaSuccess) return absl::OkStatus();
        if (q != cudaErrorNotReady) {
          status = CudaError(q, "waiting for the copy-engine transfer");
          break;
        }
      }
      status = link::GivenUpOrLate(deadline, give_up, "the copy-engine transfer");
      if (!status.ok()) break;
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

  // Once aborted_ is set under mu_ nothing more is queued; the copy stream is then drained
  // before Abort returns, so that no copy of this link touches the spans' memory afterwards.
  // Its waits on the peer's counter pass because this end overwrites that counter (again and
  // again: a live peer may still write it); the copies behind them move stale bytes, which the
  // aborted transfer discards.
  void Abort() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      aborted_ = true;
    }
    cv_.notify_all();
    if (stream_ == nullptr) return;
    OnDevice on(device_);
    const Counter awaited = role_ == Role::kSender ? kDrained : kFilled;
    // A stream with nothing left touches no counter: a sender in the receiver's process must not
    // write into a ring that the receiver's link may already have unmapped.
    Drained([&] {
      const cudaError_t e = cudaStreamQuery(stream_);
      if (e == cudaErrorNotReady)
        drv_->write_value64(side_stream_, reinterpret_cast<CUdeviceptr>(CounterAt(awaited)), kUnblocked,
                            CU_STREAM_WRITE_VALUE_DEFAULT);
      return e;
    });
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

  CopyLinkImpl(Role role, int device, Ring ring, const cuda::DriverApi* drv)
      : role_(role), device_(device), ring_(std::move(ring)), drv_(drv) {}

  char* CounterAt(Counter c) const { return ring_.base + ring_.slots * ring_.slot_bytes + c * kCounterStride; }

  absl::StatusOr<int64_t> Queue(std::span<const DeviceSpan> spans, Role role) {
    if (role != role_) return absl::InternalError("the sender sends and the receiver receives");
    Step step;
    CUdeviceptr last_range = 0;
    for (const DeviceSpan& s : spans) {
      if (s.bytes == 0) continue;
      // Spans side by side merge into one copy, but only within one allocation: a copy may not
      // run from one cudaMalloc into the next, however close they lie.
      CUdeviceptr range = 0;
      if (drv_->pointer_attribute(&range, CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, reinterpret_cast<CUdeviceptr>(s.data)) !=
          CUDA_SUCCESS)
        range = reinterpret_cast<CUdeviceptr>(s.data);  // unknown to the driver: never merged
      DeviceSpan* last = step.spans.empty() ? nullptr : &step.spans.back();
      if (last && static_cast<char*>(last->data) + last->bytes == s.data && range == last_range) last->bytes += s.bytes;
      else step.spans.push_back(s);
      last_range = range;
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

  // The receiver's host, until the sender has filled `target` pieces or the link is aborted.
  absl::Status AwaitFilled(uint64_t target) {
    for (int misses = 0; seen_filled_ < target; ++misses) {
      if (aborted_) return absl::UnavailableError("copy link was aborted");
      LINK_CUDA(cudaMemcpyAsync(polled_, CounterAt(kFilled), sizeof(uint64_t), cudaMemcpyDefault, side_stream_));
      LINK_CUDA(cudaStreamSynchronize(side_stream_));
      const uint64_t value = *static_cast<volatile uint64_t*>(polled_);
      if (value > seen_filled_) {
        seen_filled_ = value;
        misses = 0;
      }
      if (seen_filled_ >= target) break;
      if (misses < kSpinningReads) std::this_thread::yield();
      else absl::SleepFor(kCounterPoll);
    }
    return absl::OkStatus();
  }

  // Queues the copies of one piece as one batch (the copy engines take many small copies
  // batched at the rate of one large one, and one at a time at a third of it).
  absl::Status CopyPiece(std::vector<void*>& dsts, std::vector<const void*>& srcs, std::vector<size_t>& sizes) {
    cudaMemcpyAttributes attr{};
    attr.srcAccessOrder = cudaMemcpySrcAccessOrderStream;
    attr.flags = cudaMemcpyFlagPreferOverlapWithCompute;
    size_t first = 0;
    const cudaError_t e = cudaMemcpyBatchAsync(dsts.data(), srcs.data(), sizes.data(), sizes.size(), &attr, &first, 1, stream_);
    if (e == cudaSuccess) return absl::OkStatus();
    cudaGetLastError();
    std::string copies;
    for (size_t i = 0; i < sizes.size() && i < 3; ++i)
      absl::StrAppend(&copies, i ? "; " : "", sizes[i], " bytes from ", DescribePointer(srcs[i]), " to ",
                      DescribePointer(dsts[i]));
    return absl::InternalError(absl::StrCat("copy-engine transfer of ", sizes.size(), " copies (", copies,
                                            sizes.size() > 3 ? "; ..." : "", "): ", cudaGetErrorString(e)));
  }

  // Queues one step piece by piece through the ring. The copy stream itself waits for the
  // peer's counters, so pieces follow each other at the wire's pace with no host in between.
  // Only the receiver's first piece is awaited by its host: between steps the sender computes
  // for up to seconds, and a device wait that long would hold a hardware queue that the decode
  // worker's own kernels may share.
  absl::Status Move(const Step& step) {
    const bool send = role_ == Role::kSender;
    if (!send) SALA_RETURN_IF_ERROR(AwaitFilled(pieces_ + 1));
    std::lock_guard<std::mutex> lock(mu_);
    if (aborted_) return absl::UnavailableError("copy link was aborted");
    LINK_CUDA(cudaStreamWaitEvent(stream_, step.ready, 0));
    size_t span = 0, in_span = 0;
    for (int64_t left = step.bytes; left > 0;) {
      const uint64_t n = pieces_;
      const int32_t slot = int32_t(n % uint64_t(ring_.slots));
      // The sender may fill a slot once the receiver drained its previous piece; the receiver
      // may drain it once the sender filled it.
      const Counter awaited = send ? kDrained : kFilled;
      const uint64_t target = send ? (n >= uint64_t(ring_.slots) ? n + 1 - ring_.slots : 0) : n + 1;
      if (target > 0)
        SALA_RETURN_IF_ERROR(
            cuda::DriverStatus(drv_->wait_value64(stream_, reinterpret_cast<CUdeviceptr>(CounterAt(awaited)), target,
                                                  CU_STREAM_WAIT_VALUE_GEQ),
                               "cuStreamWaitValue64 (copy ring counter)"));
      // The step's wire time starts with its first piece: for the sender once its rows are
      // computed and a slot is free, for the receiver once the first piece has arrived.
      if (left == step.bytes) SALA_RETURN_IF_ERROR(timer_->Start(stream_));
      const int64_t piece = std::min(left, ring_.slot_bytes);
      char* staged = ring_.base + slot * ring_.slot_bytes;
      dsts_.clear();
      srcs_.clear();
      sizes_.clear();
      for (int64_t at = 0; at < piece;) {
        const DeviceSpan& s = step.spans[span];
        const size_t len = std::min(s.bytes - in_span, size_t(piece - at));
        char* mine = static_cast<char*>(s.data) + in_span;
        dsts_.push_back(send ? staged + at : mine);
        srcs_.push_back(send ? mine : staged + at);
        sizes_.push_back(len);
        at += int64_t(len);
        in_span += len;
        if (in_span == s.bytes) {
          ++span;
          in_span = 0;
        }
      }
      SALA_RETURN_IF_ERROR(CopyPiece(dsts_, srcs_, sizes_));
      // The default flags fence the piece's copies before the write.
      const auto written = reinterpret_cast<CUdeviceptr>(CounterAt(send ? kFilled : kDrained));
      SALA_RETURN_IF_ERROR(
          cuda::DriverStatus(drv_->write_value64(stream_, written, n + 1, CU_STREAM_WRITE_VALUE_DEFAULT),
                             "cuStreamWriteValue64 (copy ring counter)"));
      pieces_ = n + 1;
      left -= piece;
    }
    return timer_->End(stream_);
  }

  const Role role_;
  const int device_;
  Ring ring_;
  const cuda::DriverApi* const drv_;
  cudaStream_t stream_ = nullptr;       // the copies, the counter writes and waits, in piece order
  cudaStream_t side_stream_ = nullptr;  // the receiver's reads of the filled counter; an abort's writes
  uint64_t* polled_ = nullptr;          // pinned: where a read of a counter lands
  std::thread pump_;
  // Pump thread only: pieces moved over the link's life, the filled counter's last value read,
  // and the copies of the piece being queued.
  uint64_t pieces_ = 0;
  uint64_t seen_filled_ = 0;
  std::vector<void*> dsts_;
  std::vector<const void*> srcs_;
  std::vector<size_t> sizes_;

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
  SALA_ASSIGN_OR_RETURN(const cuda::DriverApi* drv, cuda::GetDriverApi());
  int device = 0;
  LINK_CUDA(cudaGetDevice(&device));
  // The ring and its counters in one allocation that other processes can import (cuMem with a
  // file descriptor: unlike CUDA IPC handles it needs the sender to see only its own GPU, and
  // the sender maps it at an address of its own choosing).
  const CUmemAllocationProp prop = cuda::DeviceMemoryProp(device, /*shareable=*/true);
  size_t granularity = 0;
  SALA_RETURN_IF_ERROR(cuda::DriverStatus(drv->granularity(&granularity, &prop, CU_MEM_ALLOC_GRANULARITY_RECOMMENDED),
                                          "cuMemGetAllocationGranularity"));
  auto mapping = std::make_unique<RingMapping>();
  mapping->bytes = (size_t(slots) * slot_bytes + 2 * kCounterStride + granularity - 1) / granularity * granularity;
  SALA_RETURN_IF_ERROR(cuda::DriverStatus(drv->create(&mapping->handle, mapping->bytes, &prop, 0), "cuMemCreate (copy ring)"));
  int memory_fd = -1;
  SALA_RETURN_IF_ERROR(cuda::DriverStatus(
      drv->export_handle(&memory_fd, mapping->handle, CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR, 0),
      "cuMemExportToShareableHandle (copy ring)"));
  absl::Cleanup close_fd = [&] { if (memory_fd >= 0) close(memory_fd); };
  SALA_RETURN_IF_ERROR(mapping->Map(device));
  auto server = RingServer::Start(memory_fd, int64_t(mapping->bytes));
  memory_fd = -1;  // the server's now, even one that failed to start
  if (!server.ok()) return server.status();
  CopyRing ring;
  ring.socket_name = (*server)->name();
  ring.slot_bytes = slot_bytes;
  ring.slots = slots;
  ring.mapped_bytes = int64_t(mapping->bytes);
  ring.process_id = ThisProcess();
  ring.address = uint64_t(mapping->va);
  CopyLinkImpl::Ring r;
  r.base = reinterpret_cast<char*>(mapping->va);
  r.slot_bytes = slot_bytes;
  r.slots = slots;
  r.mapping = std::move(mapping);
  r.server = std::move(*server);
  SALA_ASSIGN_OR_RETURN(auto link, CopyLinkImpl::Make(CopyLinkImpl::Role::kReceiver, std::move(r)));
  return std::pair<std::unique_ptr<DeviceLink>, CopyRing>(std::move(link), std::move(ring));
}

absl::StatusOr<std::unique_ptr<DeviceLink>> CopyLink::Connect(const CopyRing& ring) {
  SALA_RETURN_IF_ERROR(CheckGeometry(ring.slot_bytes, ring.slots));
  if (ring.mapped_bytes < ring.slots * ring.slot_bytes + 2 * kCounterStride)
    return absl::InvalidArgumentError(absl::StrCat("a copy ring of ", ring.slots, " slots of ", ring.slot_bytes,
                                                   " bytes in ", ring.mapped_bytes, " bytes"));
  int device = 0;
  LINK_CUDA(cudaGetDevice(&device));
  CopyLinkImpl::Ring r;
  r.slot_bytes = ring.slot_bytes;
  r.slots = ring.slots;
  if (ring.process_id == ThisProcess()) {
    // Both ends in this process (tests, benchmarks): the receiver's mapping, opened to this GPU.
    SALA_RETURN_IF_ERROR(AllowAccess(CUdeviceptr(ring.address), size_t(ring.mapped_bytes), device));
    r.base = reinterpret_cast<char*>(ring.address);
  } else {
    SALA_ASSIGN_OR_RETURN(const cuda::DriverApi* drv, cuda::GetDriverApi());
    SALA_ASSIGN_OR_RETURN(const int memory_fd, RingServer::Fetch(ring.socket_name, ring.mapped_bytes));
    auto mapping = std::make_unique<RingMapping>();
    mapping->bytes = size_t(ring.mapped_bytes);
    const CUresult imported = drv->import_handle(&mapping->handle, reinterpret_cast<void*>(intptr_t(memory_fd)),
                                                 CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR);
    close(memory_fd);
    if (imported != CUDA_SUCCESS)
      return absl::FailedPreconditionError(
          absl::StrCat("cannot import the decode GPU's copy ring (cuMemImportFromShareableHandle: CUDA driver error ",
                       int(imported), ")"));
    SALA_RETURN_IF_ERROR(mapping->Map(device));
    r.base = reinterpret_cast<char*>(mapping->va);
    r.mapping = std::move(mapping);
  }
  SALA_ASSIGN_OR_RETURN(auto link, CopyLinkImpl::Make(CopyLinkImpl::Role::kSender, std::move(r)));
  return std::unique_ptr<DeviceLink>(std::move(link));
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

// The GPU links of this host: spans arrive intact and in order, and every wait ends by its
// deadline even when the peer never answers. The NCCL link needs two GPUs; the copy link runs
// between two GPUs where there are two, else within one (both ends in this process: the sender
// uses the ring's address, which is all that CUDA IPC would have given it).
#include <cuda_runtime.h>

#include <algorithm>
#include <future>
#include <numeric>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "sala/copy_link.h"
#include "sala/nccl_link.h"
#include "sala/status_macros.h"

namespace sala {
namespace {

int DeviceCount() {
  int n = 0;
  if (cudaGetDeviceCount(&n) != cudaSuccess) {
    cudaGetLastError();
    return 0;
  }
  return n;
}

struct LinkPair {
  std::unique_ptr<DeviceLink> sender, receiver;
  int send_device = 0, recv_device = 0;
};

// Rank 0 on device 0, rank 1 on device 1.
absl::StatusOr<LinkPair> NcclPair() {
  SALA_ASSIGN_OR_RETURN(std::string id, NcclLink::NewUniqueId());
  auto join = [&](int rank) -> absl::StatusOr<std::unique_ptr<DeviceLink>> {
    cudaSetDevice(rank);
    SALA_ASSIGN_OR_RETURN(std::unique_ptr<DeviceLink> link, NcclLink::Join(id, rank));
    SALA_RETURN_IF_ERROR(link->WaitReady(absl::Now() + absl::Seconds(60)));
    return link;
  };
  auto other = std::async(std::launch::async, join, 1);
  auto sender = join(0);
  auto receiver = other.get();
  if (!sender.ok()) return sender.status();
  if (!receiver.ok()) return receiver.status();
  return LinkPair{std::move(*sender), std::move(*receiver), 0, 1};
}

// The receiver's ring on the last device, the sender on device 0.
absl::StatusOr<LinkPair> CopyPair(int64_t slot_bytes, int32_t slots) {
  LinkPair pair;
  pair.recv_device = DeviceCount() - 1;
  cudaSetDevice(pair.recv_device);
  SALA_ASSIGN_OR_RETURN(auto listening, CopyLink::Listen(slot_bytes, slots));
  pair.receiver = std::move(listening.first);
  cudaSetDevice(0);
  SALA_ASSIGN_OR_RETURN(pair.sender, CopyLink::Connect(listening.second));
  return pair;
}

class DeviceLinkTest : public testing::TestWithParam<std::string> {
 protected:
  void SetUp() override {
    const int n = DeviceCount();
    if (n == 0) GTEST_SKIP() << "needs a GPU";
    if (GetParam() == "nccl") {
      if (n < 2) GTEST_SKIP() << "needs two GPUs";
      if (!NcclLink::Available()) GTEST_SKIP() << "built without NCCL";
    }
  }

  // The copy link with a small ring, so that a few MiB wrap around it many times.
  void Connect() {
    auto pair = GetParam() == "nccl" ? NcclPair() : CopyPair(int64_t(1) << 20, 3);
    ASSERT_TRUE(pair.ok()) << pair.status();
    p_ = std::move(*pair);
  }

  LinkPair p_;
};

TEST_P(DeviceLinkTest, SpansArriveIntactAndInOrder) {
  Connect();
  // Odd sizes, several steps: what a prefill's chunks look like. The sender's spans lie side by
  // side (the copy link merges them), the receiver's have gaps between them (it cannot), so
  // pieces cut across spans differently at the two ends; the copy link's ring wraps some 70 times.
  const std::vector<size_t> sizes = {4096, 1, 3 << 20, 77777, 64 << 20, 5 << 20};
  constexpr size_t kGap = 4096;
  const size_t total = std::accumulate(sizes.begin(), sizes.end(), size_t(0));
  const size_t spread = total + kGap * sizes.size();
  std::vector<unsigned char> host(total);
  for (size_t i = 0; i < total; ++i) host[i] = static_cast<unsigned char>((i * 2654435761u) >> 13);
  void *src = nullptr, *dst = nullptr;
  cudaSetDevice(p_.send_device);
  ASSERT_EQ(cudaMalloc(&src, total), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(src, host.data(), total, cudaMemcpyHostToDevice), cudaSuccess);
  cudaSetDevice(p_.recv_device);
  ASSERT_EQ(cudaMalloc(&dst, spread), cudaSuccess);
  ASSERT_EQ(cudaMemset(dst, 0xab, spread), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  size_t at = 0;
  for (size_t i = 0; i < sizes.size(); i += 2) {  // two spans per step
    std::vector<DeviceSpan> out, in;
    for (size_t j = i; j < std::min(i + 2, sizes.size()); ++j) {
      out.push_back({static_cast<char*>(src) + at, sizes[j]});
      in.push_back({static_cast<char*>(dst) + at + kGap * (j + 1), sizes[j]});
      at += sizes[j];
    }
    cudaSetDevice(p_.recv_device);
    auto got = p_.receiver->Recv(in);
    cudaSetDevice(p_.send_device);
    auto sent = p_.sender->Send(out);
    ASSERT_TRUE(got.ok() && sent.ok()) << got.status() << sent.status();
    EXPECT_EQ(*got, *sent);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  ASSERT_TRUE(p_.sender->Wait(deadline).ok());
  ASSERT_TRUE(p_.receiver->Wait(deadline).ok());
  EXPECT_GT(p_.sender->busy_seconds(), 0);
  EXPECT_GT(p_.receiver->busy_seconds(), 0);
  std::vector<unsigned char> back(spread);
  cudaSetDevice(p_.recv_device);
  ASSERT_EQ(cudaMemcpy(back.data(), dst, spread, cudaMemcpyDeviceToHost), cudaSuccess);
  at = 0;
  for (size_t j = 0; j < sizes.size(); ++j) {
    const unsigned char* landed = back.data() + at + kGap * (j + 1);
    EXPECT_TRUE(std::equal(landed, landed + sizes[j], host.data() + at)) << "span " << j;
    EXPECT_EQ(landed[-1], 0xab) << "before span " << j;  // nothing written between the spans
    at += sizes[j];
  }
  cudaFree(dst);
  cudaSetDevice(p_.send_device);
  cudaFree(src);
}

// A state's buffers are separate allocations that often lie side by side (a layer's compressed
// keys after the previous layer's): one step over them must not become one copy across them.
TEST_P(DeviceLinkTest, SeparateAllocationsSideBySideArriveIntact) {
  Connect();
  constexpr size_t kBuffers = 8, kBytes = size_t(2) << 20;
  std::vector<unsigned char> host(kBuffers * kBytes);
  for (size_t i = 0; i < host.size(); ++i) host[i] = static_cast<unsigned char>((i * 40503u) >> 7);
  std::vector<void*> buffers(kBuffers);
  std::vector<DeviceSpan> out;
  cudaSetDevice(p_.send_device);
  int adjacent = 0;
  for (size_t b = 0; b < kBuffers; ++b) {
    ASSERT_EQ(cudaMalloc(&buffers[b], kBytes), cudaSuccess);
    ASSERT_EQ(cudaMemcpy(buffers[b], host.data() + b * kBytes, kBytes, cudaMemcpyHostToDevice), cudaSuccess);
    out.push_back({buffers[b], kBytes});
    adjacent += b > 0 && static_cast<char*>(buffers[b - 1]) + kBytes == buffers[b];
  }
  void* dst = nullptr;
  cudaSetDevice(p_.recv_device);
  ASSERT_EQ(cudaMalloc(&dst, host.size()), cudaSuccess);
  // The same spans at the receiver (an NCCL step matches them one to one), side by side in one
  // allocation there.
  std::vector<DeviceSpan> in;
  for (size_t b = 0; b < kBuffers; ++b) in.push_back({static_cast<char*>(dst) + b * kBytes, kBytes});
  ASSERT_TRUE(p_.receiver->Recv(in).ok());
  cudaSetDevice(p_.send_device);
  ASSERT_TRUE(p_.sender->Send(out).ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  ASSERT_TRUE(p_.sender->Wait(deadline).ok());
  ASSERT_TRUE(p_.receiver->Wait(deadline).ok());
  std::vector<unsigned char> back(host.size());
  cudaSetDevice(p_.recv_device);
  ASSERT_EQ(cudaMemcpy(back.data(), dst, back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(back == host);
  cudaFree(dst);
  cudaSetDevice(p_.send_device);
  for (void* b : buffers) cudaFree(b);
  RecordProperty("adjacent_buffers", adjacent);
}

TEST_P(DeviceLinkTest, ReceiverWithoutSenderTimesOutAndAborts) {
  Connect();
  void* dst = nullptr;
  cudaSetDevice(p_.recv_device);
  ASSERT_EQ(cudaMalloc(&dst, 1 << 20), cudaSuccess);
  std::vector<DeviceSpan> in = {{dst, 1 << 20}};
  ASSERT_TRUE(p_.receiver->Recv(in).ok());
  const absl::Time start = absl::Now();
  absl::Status s = p_.receiver->Wait(start + absl::Milliseconds(500));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_TRUE(p_.receiver->aborted());
  EXPECT_FALSE(p_.receiver->Recv(in).ok());  // an aborted link takes no more work
  cudaFree(dst);
}

INSTANTIATE_TEST_SUITE_P(Kinds, DeviceLinkTest, testing::Values("nccl", "copy"),
                         [](const testing::TestParamInfo<std::string>& info) { return info.param; });

TEST(CopyLinkTest, SenderStopsAtAFullRingAndGivesUp) {
  if (DeviceCount() == 0) GTEST_SKIP() << "needs a GPU";
  auto pair = CopyPair(int64_t(1) << 20, 2);
  ASSERT_TRUE(pair.ok()) << pair.status();
  void* src = nullptr;
  cudaSetDevice(pair->send_device);
  ASSERT_EQ(cudaMalloc(&src, 8 << 20), cudaSuccess);
  std::vector<DeviceSpan> out = {{src, 8 << 20}};  // four times the ring, and nobody drains it
  ASSERT_TRUE(pair->sender->Send(out).ok());
  bool asked = false;
  const absl::Time start = absl::Now();
  absl::Status s = pair->sender->Wait(start + absl::Seconds(30), [&] { return asked = absl::Now() - start > absl::Milliseconds(300); });
  EXPECT_EQ(s.code(), absl::StatusCode::kCancelled) << s;
  EXPECT_TRUE(asked);
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_TRUE(pair->sender->aborted());
  EXPECT_FALSE(pair->sender->Send(out).ok());
  pair->sender.reset();  // returns although its ring never drained
  cudaFree(src);
}

// The receiver's stream waits on the device for the pieces after a step's first: when the sender
// stops halfway, the receiver gives up by its deadline, and once Abort returns no copy of the
// link lands in the receiver's memory any more (the caller frees it next), not even when the
// sender then goes on filling the ring.
TEST(CopyLinkTest, ReceiverStuckMidStepGivesUpAndDrains) {
  if (DeviceCount() == 0) GTEST_SKIP() << "needs a GPU";
  auto pair = CopyPair(int64_t(1) << 20, 3);
  ASSERT_TRUE(pair.ok()) << pair.status();
  constexpr size_t kHalf = size_t(2) << 20;
  void *src = nullptr, *dst = nullptr;
  cudaSetDevice(pair->recv_device);
  ASSERT_EQ(cudaMalloc(&dst, 3 * kHalf), cudaSuccess);
  std::vector<DeviceSpan> in = {{dst, 3 * kHalf}};
  ASSERT_TRUE(pair->receiver->Recv(in).ok());
  cudaSetDevice(pair->send_device);
  ASSERT_EQ(cudaMalloc(&src, kHalf), cudaSuccess);
  std::vector<DeviceSpan> out = {{src, kHalf}};  // a third of what the receiver expects
  ASSERT_TRUE(pair->sender->Send(out).ok());
  const absl::Time start = absl::Now();
  EXPECT_TRUE(pair->sender->Wait(start + absl::Seconds(30)).ok());
  absl::Status s = pair->receiver->Wait(start + absl::Milliseconds(500));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_TRUE(pair->receiver->aborted());
  cudaSetDevice(pair->recv_device);
  ASSERT_EQ(cudaMemset(dst, 0x5a, 3 * kHalf), cudaSuccess);
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
  cudaSetDevice(pair->send_device);
  ASSERT_TRUE(pair->sender->Send(out).ok());
  ASSERT_TRUE(pair->sender->Send(out).ok());
  EXPECT_TRUE(pair->sender->Wait(absl::Now() + absl::Seconds(30)).ok());
  absl::SleepFor(absl::Milliseconds(100));
  cudaSetDevice(pair->recv_device);
  std::vector<unsigned char> back(3 * kHalf);
  ASSERT_EQ(cudaMemcpy(back.data(), dst, back.size(), cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_EQ(std::count(back.begin(), back.end(), 0x5a), ptrdiff_t(back.size()));
  cudaFree(dst);
  cudaSetDevice(pair->send_device);
  cudaFree(src);
}

TEST(CopyLinkTest, RefusesBadRings) {
  if (DeviceCount() == 0) GTEST_SKIP() << "needs a GPU";
  EXPECT_EQ(CopyLink::Listen(int64_t(1) << 20, 1).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(CopyLink::Listen(1000, 4).status().code(), absl::StatusCode::kInvalidArgument);
  CopyRing ring;
  ring.slot_bytes = int64_t(1) << 20;
  ring.slots = 4;
  ring.mapped_bytes = int64_t(1) << 20;  // smaller than its slots
  ring.socket_name = "sala-no-such-ring";
  ring.process_id = "another process";
  EXPECT_EQ(CopyLink::Connect(ring).status().code(), absl::StatusCode::kInvalidArgument);
  ring.mapped_bytes = int64_t(6) << 20;
  EXPECT_EQ(CopyLink::Connect(ring).status().code(), absl::StatusCode::kUnavailable);  // nobody serves it
  EXPECT_FALSE(CopyLink::HostId().empty());
}

TEST(NcclLinkTest, JoinWithoutPeerTimesOut) {
  if (DeviceCount() < 2 || !NcclLink::Available()) GTEST_SKIP() << "needs two GPUs and NCCL";
  auto id = NcclLink::NewUniqueId();
  ASSERT_TRUE(id.ok());
  cudaSetDevice(0);
  auto link = NcclLink::Join(*id, 0);
  ASSERT_TRUE(link.ok()) << link.status();
  EXPECT_EQ((*link)->WaitReady(absl::Now() + absl::Milliseconds(500)).code(), absl::StatusCode::kDeadlineExceeded);
  EXPECT_FALSE(NcclLink::Join("short", 0).ok());
}

}  // namespace
}  // namespace sala

// The NCCL link between two GPUs of this host (skipped with fewer than two): spans arrive
// intact and in order, and every wait ends by its deadline even when the peer never answers.
#include <cuda_runtime.h>

#include <future>
#include <numeric>
#include <vector>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "sala/nccl_link.h"

namespace sala {
namespace {

class NcclLinkTest : public testing::Test {
 protected:
  void SetUp() override {
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess || n < 2) GTEST_SKIP() << "needs two GPUs";
    if (!NcclLink::Available()) GTEST_SKIP() << "built without NCCL";
  }

  // Joins rank 0 on device 0 and rank 1 on device 1.
  void Connect() {
    auto id = NcclLink::NewUniqueId();
    ASSERT_TRUE(id.ok()) << id.status();
    auto join = [&](int rank) {
      cudaSetDevice(rank);
      auto link = NcclLink::Join(*id, rank);
      if (link.ok()) {
        absl::Status s = (*link)->WaitReady(absl::Now() + absl::Seconds(60));
        if (!s.ok()) return absl::StatusOr<std::unique_ptr<NcclLink>>(s);
      }
      return link;
    };
    auto other = std::async(std::launch::async, join, 1);
    auto sender = join(0);
    auto receiver = other.get();
    ASSERT_TRUE(sender.ok()) << sender.status();
    ASSERT_TRUE(receiver.ok()) << receiver.status();
    sender_ = std::move(*sender);
    receiver_ = std::move(*receiver);
  }

  std::unique_ptr<NcclLink> sender_, receiver_;
};

TEST_F(NcclLinkTest, SpansArriveIntactAndInOrder) {
  Connect();
  // Odd sizes, several steps: what a prefill's chunks look like.
  const std::vector<size_t> sizes = {4096, 1, 3 << 20, 77777, 64 << 20};
  const size_t total = std::accumulate(sizes.begin(), sizes.end(), size_t(0));
  std::vector<unsigned char> host(total);
  for (size_t i = 0; i < total; ++i) host[i] = static_cast<unsigned char>((i * 2654435761u) >> 13);
  void *src = nullptr, *dst = nullptr;
  cudaSetDevice(0);
  ASSERT_EQ(cudaMalloc(&src, total), cudaSuccess);
  ASSERT_EQ(cudaMemcpy(src, host.data(), total, cudaMemcpyHostToDevice), cudaSuccess);
  cudaSetDevice(1);
  ASSERT_EQ(cudaMalloc(&dst, total), cudaSuccess);
  ASSERT_EQ(cudaMemset(dst, 0xab, total), cudaSuccess);
  size_t at = 0;
  for (size_t i = 0; i < sizes.size(); i += 2) {  // two spans per step, the last alone
    std::vector<DeviceSpan> out, in;
    for (size_t j = i; j < std::min(i + 2, sizes.size()); ++j) {
      out.push_back({static_cast<char*>(src) + at, sizes[j]});
      in.push_back({static_cast<char*>(dst) + at, sizes[j]});
      at += sizes[j];
    }
    cudaSetDevice(1);
    auto got = receiver_->Recv(in);
    cudaSetDevice(0);
    auto sent = sender_->Send(out);
    ASSERT_TRUE(got.ok() && sent.ok()) << got.status() << sent.status();
    EXPECT_EQ(*got, *sent);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(30);
  ASSERT_TRUE(sender_->Wait(deadline).ok());
  ASSERT_TRUE(receiver_->Wait(deadline).ok());
  EXPECT_GT(sender_->busy_seconds(), 0);
  std::vector<unsigned char> back(total);
  cudaSetDevice(1);
  ASSERT_EQ(cudaMemcpy(back.data(), dst, total, cudaMemcpyDeviceToHost), cudaSuccess);
  EXPECT_TRUE(back == host);
  cudaFree(dst);
  cudaSetDevice(0);
  cudaFree(src);
}

TEST_F(NcclLinkTest, ReceiverWithoutSenderTimesOutAndAborts) {
  Connect();
  void* dst = nullptr;
  cudaSetDevice(1);
  ASSERT_EQ(cudaMalloc(&dst, 1 << 20), cudaSuccess);
  std::vector<DeviceSpan> in = {{dst, 1 << 20}};
  ASSERT_TRUE(receiver_->Recv(in).ok());
  const absl::Time start = absl::Now();
  absl::Status s = receiver_->Wait(start + absl::Milliseconds(500));
  EXPECT_EQ(s.code(), absl::StatusCode::kDeadlineExceeded) << s;
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_TRUE(receiver_->aborted());
  EXPECT_FALSE(receiver_->Recv(in).ok());  // an aborted link takes no more work
  cudaFree(dst);
}

TEST_F(NcclLinkTest, JoinWithoutPeerTimesOut) {
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

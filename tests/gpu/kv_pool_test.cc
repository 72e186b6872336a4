// The paged KV pool: pages are handed out once, reused after Free, keep their contents and
// addresses while the pool grows, and a pool that reaches its limit says so.
#include "cuda/kv_pool.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <set>
#include <vector>

#include "cuda/cuda_common.h"
#include "gtest/gtest.h"

namespace sala::cuda {
namespace {

class KvPoolTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

TEST_F(KvPoolTest, PagesStayPutAsThePoolGrowsAndAreReused) {
  // 3 layers of 256-element rows: 384 KiB pages, so 1000 pages take several mappings.
  auto pool = KvPool::Create(3, 256);
  ASSERT_TRUE(pool.ok()) << pool.status();
  KvPool& p = **pool;
  EXPECT_EQ(p.page_elems(), size_t(3) * 2 * kKvPageTokens * 256);
  std::vector<int> first;
  ASSERT_TRUE(p.Allocate(10, first).ok());
  const std::vector<uint16_t> pattern(p.page_elems(), 0x3f80);  // bf16 1.0
  for (int page : first)
    ASSERT_EQ(cudaMemcpy(p.base() + size_t(page) * p.page_elems(), pattern.data(), p.page_bytes(), cudaMemcpyHostToDevice),
              cudaSuccess);
  const size_t backed = p.bytes_backed();
  std::vector<int> more;
  ASSERT_TRUE(p.Allocate(1000, more).ok());
  EXPECT_GT(p.bytes_backed(), backed);
  EXPECT_EQ(p.pages_in_use(), 1010u);
  std::set<int> all(first.begin(), first.end());
  all.insert(more.begin(), more.end());
  EXPECT_EQ(all.size(), 1010u);  // no page handed out twice
  for (int page : more)  // every page is mapped
    ASSERT_EQ(cudaMemset(p.base() + size_t(page) * p.page_elems(), 0, p.page_bytes()), cudaSuccess);
  std::vector<uint16_t> back(p.page_elems());
  for (int page : first) {  // written before the pool grew, still there
    ASSERT_EQ(cudaMemcpy(back.data(), p.base() + size_t(page) * p.page_elems(), p.page_bytes(), cudaMemcpyDeviceToHost),
              cudaSuccess);
    ASSERT_EQ(back, pattern);
  }
  p.Free(first.data(), first.size());
  EXPECT_EQ(p.pages_in_use(), 1000u);
  std::vector<int> again;
  ASSERT_TRUE(p.Allocate(10, again).ok());
  EXPECT_EQ(again, first);  // the freed pages come back, in their order, before fresh ones
  EXPECT_EQ(p.pages_in_use(), 1010u);
}

TEST_F(KvPoolTest, AFullPoolRefusesAndStaysUsable) {
  // Pages of 1 layer x 128 elements = 128 KiB; a 64 MiB pool holds 512 of them.
  auto pool = KvPool::Create(1, 128, size_t(64) << 20);
  ASSERT_TRUE(pool.ok()) << pool.status();
  KvPool& p = **pool;
  std::vector<int> pages;
  ASSERT_TRUE(p.Allocate(500, pages).ok());
  const absl::Status full = p.Allocate(13, pages);
  EXPECT_EQ(full.code(), absl::StatusCode::kResourceExhausted) << full;
  EXPECT_EQ(pages.size(), 500u);  // all or none
  ASSERT_TRUE(p.Allocate(12, pages).ok());
  p.Free(pages.data(), 100);
  EXPECT_TRUE(p.Allocate(100, pages).ok());
  EXPECT_EQ(p.pages_in_use(), 512u);
}

TEST_F(KvPoolTest, RejectsAShapeWithoutRows) {
  EXPECT_EQ(KvPool::Create(0, 256).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(KvPool::Create(2, 0).status().code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace sala::cuda

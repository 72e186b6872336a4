// The GPU's paged pool for the sparse layers' K/V cache. A page holds kKvPageTokens tokens of
// every sparse layer, [slot][K | V][token][kv_heads * dim] in bf16, so that a whole page is one
// piece of a state transfer; a sequence keeps a table of its pages.
//
// Pages live in one virtual address range reserved up front and backed with physical memory as
// the pool grows (CUDA virtual memory management): pages never move, so captured decode graphs
// and transfers in flight keep their pointers, a long context costs no copies as it grows, and
// an idle pool holds no memory. Freed pages are reused, not returned to the device.
#pragma once

#include <cuda_bf16.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <mutex>
#include <vector>

#include "absl/status/statusor.h"

namespace sala::cuda {

// A multiple of every sparse block size the kernels take (64), so that no block straddles pages.
constexpr int kKvPageTokens = 256;

class KvPool {
 public:
  // A pool for `slots` sparse layers of `row_elems` elements per token and layer, on the current
  // device, of at most `max_bytes` (0: the device's memory).
  static absl::StatusOr<std::shared_ptr<KvPool>> Create(int slots, size_t row_elems, size_t max_bytes = 0);
  ~KvPool();
  KvPool(const KvPool&) = delete;
  KvPool& operator=(const KvPool&) = delete;

  // Appends `n` pages to `pages`, all or none; RESOURCE_EXHAUSTED when the device has no memory
  // left for them. Thread-safe.
  absl::Status Allocate(size_t n, std::vector<int>& pages);
  void Free(const int* pages, size_t n);

  // Page p's K rows of layer slot s start at base() + p * page_elems() + s * slot_elems();
  // its V rows v_offset() elements after them.
  __nv_bfloat16* base() const { return base_; }
  size_t page_elems() const { return page_elems_; }
  size_t page_bytes() const { return page_elems_ * sizeof(__nv_bfloat16); }
  size_t slot_elems() const { return 2 * v_offset(); }
  size_t v_offset() const { return size_t(kKvPageTokens) * row_elems_; }
  size_t row_elems() const { return row_elems_; }

  size_t pages_in_use() const;
  size_t bytes_backed() const;

 private:
  KvPool(int slots, size_t row_elems) : row_elems_(row_elems), page_elems_(size_t(slots) * 2 * kKvPageTokens * row_elems) {}
  // Backs the range up to `bytes` with physical memory; the lock is held.
  absl::Status BackUpTo(size_t bytes);

  const size_t row_elems_, page_elems_;
  int device_ = 0;
  size_t granularity_ = 0, reserved_ = 0;
  __nv_bfloat16* base_ = nullptr;
  mutable std::mutex mu_;
  size_t backed_ = 0;                 // bytes mapped from base_
  std::vector<uint64_t> handles_;     // the physical allocations mapped, in address order
  std::vector<size_t> handle_bytes_;
  std::vector<int> free_;             // pages freed and not yet reused
  int next_page_ = 0;                 // pages below this have been handed out before
};

}  // namespace sala::cuda

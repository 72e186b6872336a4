// The copy-engine kind of DeviceLink, for two GPUs of one host: bytes move on the GPUs' copy
// engines, which need no SMs, so a transfer runs at the link's speed while the sending GPU
// computes (NCCL's kernels wait for SMs behind the prefill's).
//
// The receiver owns a ring of staging slots in its device memory and offers it (a cuMem
// allocation whose file descriptor it hands over a Unix socket); the sender maps it. Each step's
// bytes are cut into pieces of at most one slot: the sender copies a piece into the next slot
// over NVLink, the receiver copies it on into its own spans. Two counters beside the ring hand
// slots over (pieces filled, pieces drained); each is written by a copy stream after the piece's
// data, and the other end's copy stream waits for it (cuStreamWaitValue64), so the pieces of a
// step follow each other at the wire's pace without a host in between. Only the receiver's host
// waits for the first piece of each step, as a step may take the sender seconds to compute.
// An aborting end overwrites the counter its stream waits on, so nothing stays stuck on a device.
//
// The ring's memory lives until both ends have unmapped it, so a sender that has not yet heard
// of an abort writes into memory nobody else uses.
#pragma once

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "sala/device_link.h"

namespace sala {

// What a receiver offers and a sender needs to map its ring.
struct CopyRing {
  // The abstract Unix socket that hands the ring's memory (a file descriptor) to a sender of
  // this user in this network namespace.
  std::string socket_name;
  int64_t slot_bytes = 0;
  int32_t slots = 0;
  int64_t mapped_bytes = 0;  // the ring and its counters, rounded up to the allocation granularity
  // The receiving process (a random id) and the ring's address in it: a sender in the same
  // process opens that mapping to its GPU instead.
  std::string process_id;
  uint64_t address = 0;
};

class CopyLink {
 public:
  // Identifies this host (its boot id): peers with the same one may try a copy link.
  static std::string HostId();
  // The receiving end: a ring of `slots` slots of `slot_bytes` on the current device, and what
  // to hand the sender.
  static absl::StatusOr<std::pair<std::unique_ptr<DeviceLink>, CopyRing>> Listen(int64_t slot_bytes, int32_t slots);
  // The sending end on the current device: maps the receiver's ring. Fails where the processes
  // cannot share memory or the two GPUs cannot reach each other; use NCCL then. The failure is
  // FAILED_PRECONDITION where it will not change while this process runs (no peer access).
  static absl::StatusOr<std::unique_ptr<DeviceLink>> Connect(const CopyRing& ring);
};

}  // namespace sala

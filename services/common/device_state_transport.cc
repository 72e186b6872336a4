#include "device_state_transport.h"

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "channels.h"
#include "log.h"
#include "sala/copy_link.h"
#include "sala/nccl_link.h"
#include "sala/status_macros.h"
#include "status_map.h"

namespace sala::service {
namespace {

// How long a pair without a GPU path uses the gRPC stream before trying a GPU link again, and
// a pair whose copy ring could not be mapped uses NCCL before trying a ring again.
constexpr absl::Duration kHostPathFor = absl::Seconds(60);
constexpr absl::Duration kNcclFor = absl::Seconds(600);
// Setting up a link: the handshake call and the join of both ranks.
constexpr absl::Duration kHandshakeTimeout = absl::Seconds(10);
constexpr absl::Duration kJoinTimeout = absl::Seconds(60);

class DeviceStateSender final : public StateSender {
 public:
  DeviceStateSender(Engine& engine, std::shared_ptr<DeviceStateTransport::Link> link, const std::string& target,
                    const std::string& session_id, int64_t expected_tokens, int64_t min_step_bytes, absl::Time deadline)
      : engine_(engine),
        link_(std::move(link)),
        min_step_bytes_(min_step_bytes),
        deadline_(deadline),
        stream_(target, deadline) {
    holds_link_ = link_->busy.try_acquire_until(absl::ToChronoTime(deadline));
    if (!holds_link_) {
      opened_ = absl::DeadlineExceededError(absl::StrCat("the GPU link to ", target, " stayed busy"));
      return;
    }
    sala::v1::StateChunk first;
    first.set_session_id(session_id);
    busy_before_ = link_->device->busy_seconds();
    sala::v1::DeviceSegment& seg = *first.mutable_device();
    seg.set_link_id(link_->id);
    seg.set_layout_hash(engine.config().layout_hash_hex());
    seg.set_expected_tokens(expected_tokens);
    opened_ = stream_.Write(std::move(first));
  }

  ~DeviceStateSender() override {
    if (!finished_) Abort("transfer abandoned");
    if (holds_link_) link_->busy.release();
  }

  absl::Status SendProgress(SequenceState& state) override { return Step(state, false, 0); }

  absl::Status Finish(SequenceState& state, int first_token) override {
    SALA_RETURN_IF_ERROR(Step(state, true, first_token));
    // The receiver acknowledges once its receives completed; the sends end no later.
    absl::Status s = link_->device->Wait(deadline_, [this] { return stream_.failed(); });
    // Given up because the receiver's stream broke: its error (UNAVAILABLE, a lost decode
    // worker, which the router then takes out of routing) says more than the cancelled wait.
    if (s.ok() || stream_.failed()) s = stream_.Finish();
    if (!s.ok()) {
      Abort(std::string(s.message()));
      return s;
    }
    wire_seconds_ = link_->device->busy_seconds() - busy_before_;
    finished_ = true;
    return absl::OkStatus();
  }

  void Abort(const std::string& reason) override {
    // Sends may wait for a receiver that is gone: abort the link before anything frees the state
    // (not a link that another transfer holds).
    if (holds_link_) link_->device->Abort();
    stream_.Cancel(reason);
    finished_ = true;
  }

  int64_t bytes_sent() const override { return bytes_; }
  double wire_seconds() override { return wire_seconds_; }
  const char* kind() const override { return link_->device->kind(); }

 private:
  // Queues the sends of what the state gained since the last step and writes their descriptor.
  // Rows short of a step wait for the next chunk's; their descriptor still goes out, empty, so a
  // lost decode worker is noticed within a chunk.
  absl::Status Step(SequenceState& state, bool last, int first_token) {
    absl::Status s = opened_;
    if (s.ok()) s = SendRows(state, last, first_token);
    if (!s.ok()) Abort(std::string(s.message()));
    return s;
  }

  absl::Status SendRows(SequenceState& state, bool last, int first_token) {
    SALA_ASSIGN_OR_RETURN(
        auto spans, engine_.backend().StateSpans(state, sent_tokens_, state.tokens, /*linear=*/last, /*receive=*/false));
    int64_t bytes = 0;
    int64_t to = sent_tokens_;
    if (last || SpanBytes(spans) >= min_step_bytes_) {
      SALA_ASSIGN_OR_RETURN(bytes, link_->device->Send(spans));
      to = state.tokens;
    }
    sala::v1::StateChunk chunk;
    sala::v1::DeviceSegment& seg = *chunk.mutable_device();
    seg.set_from_tokens(sent_tokens_);
    seg.set_to_tokens(to);
    seg.set_linear_states(last);
    seg.set_bytes(bytes);
    if (last) {
      chunk.set_last(true);
      chunk.set_first_token(first_token);
    }
    bytes_ += bytes;
    sent_tokens_ = to;
    return stream_.Write(std::move(chunk));
  }

  Engine& engine_;
  std::shared_ptr<DeviceStateTransport::Link> link_;
  const int64_t min_step_bytes_;
  bool holds_link_ = false;
  const absl::Time deadline_;
  StateStream stream_;
  absl::Status opened_;
  int64_t sent_tokens_ = 0, bytes_ = 0;
  double busy_before_ = 0, wire_seconds_ = 0;
  bool finished_ = false;
};

}  // namespace

DeviceStateTransport::DeviceStateTransport(Engine& engine, std::string worker_id, DeviceTransportOptions options)
    : engine_(engine),
      worker_id_(std::move(worker_id)),
      options_(options),
      gpu_path_(engine.backend().name() == "cuda"),
      host_id_(options.copy_engines ? CopyLink::HostId() : ""),
      host_path_(engine) {
  if (!gpu_path_ && options_.fallback) LogInfo("no GPU path on this worker: states go through host memory");
}

absl::StatusOr<std::shared_ptr<DeviceStateTransport::Link>> DeviceStateTransport::LinkTo(const std::string& target,
                                                                                         absl::Time deadline) {
  if (!gpu_path_) {
    if (options_.fallback) return nullptr;
    return absl::FailedPreconditionError(absl::StrCat("GPU state transfer to ", target, ": this worker has no GPU path"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  Peer& peer = peers_[target];
  if (absl::Now() < peer.host_path_until) return nullptr;
  // No GPU path at all, or none to this peer: the host path where allowed.
  auto no_gpu_path = [&](const absl::Status& why) -> absl::StatusOr<std::shared_ptr<Link>> {
    if (!options_.fallback)
      return absl::Status(why.code(), absl::StrCat("GPU state transfer to ", target, ": ", why.message()));
    LogWarning("state transfers go through host memory", {{"decode_worker", target}, {"reason", std::string(why.message())}});
    peer.host_path_until = absl::Now() + kHostPathFor;
    peer.link.reset();
    return nullptr;
  };
  // A copy ring where offered; if it cannot be mapped, once more for an NCCL link.
  for (;;) {
    sala::v1::DeviceLinkRequest request;
    request.set_prefill_worker_id(worker_id_);
    request.set_layout_hash(engine_.config().layout_hash_hex());
    if (absl::Now() >= peer.nccl_until) request.set_host_id(host_id_);
    if (peer.link && !peer.link->device->aborted()) request.set_link_id(peer.link->id);
    sala::v1::DeviceLinkReply reply;
    grpc::ClientContext context;
    context.set_deadline(absl::ToChronoTime(std::min(deadline, absl::Now() + kHandshakeTimeout)));
    const grpc::Status rpc =
        sala::v1::DecodeWorker::NewStub(SharedChannel(target))->OpenDeviceLink(&context, request, &reply);
    if (!rpc.ok()) {
      if (rpc.error_code() == grpc::StatusCode::FAILED_PRECONDITION || rpc.error_code() == grpc::StatusCode::UNIMPLEMENTED)
        return no_gpu_path(FromGrpcStatus(rpc));
      return FromGrpcStatus(rpc);  // the peer is unreachable: no path would work
    }
    if (reply.link_case() == sala::v1::DeviceLinkReply::LINK_NOT_SET) {
      if (!peer.link || peer.link->id != reply.link_id())
        return absl::InternalError("the decode worker confirmed a link this worker does not hold");
      return peer.link;
    }
    peer.link.reset();  // the peer does not know it any more (restarted, or the link failed)
    absl::StatusOr<std::unique_ptr<DeviceLink>> device;
    if (reply.has_copy_ring()) {
      if (request.host_id().empty()) return absl::InternalError("the decode worker offered a copy ring unasked");
      const sala::v1::CopyRing& r = reply.copy_ring();
      device = CopyLink::Connect(
          {r.socket_name(), r.slot_bytes(), r.slots(), r.mapped_bytes(), r.process_id(), r.address()});
      if (!device.ok()) {
        LogWarning("no copy link: state transfers use NCCL",
                   {{"decode_worker", target}, {"reason", std::string(device.status().message())}});
        // GPUs without peer access stay so; other failures may pass.
        peer.nccl_until = device.status().code() == absl::StatusCode::kFailedPrecondition ? absl::InfiniteFuture()
                                                                                          : absl::Now() + kNcclFor;
        continue;
      }
    } else {
      device = NcclLink::Join(reply.nccl_unique_id(), /*rank=*/0);
      if (!device.ok()) return no_gpu_path(device.status());
      if (absl::Status s = (*device)->WaitReady(std::min(deadline, absl::Now() + kJoinTimeout)); !s.ok())
        return no_gpu_path(s);
    }
    auto link = std::make_shared<Link>();
    link->id = reply.link_id();
    link->device = std::move(*device);
    peer.link = link;
    LogInfo("GPU link up", {{"decode_worker", target}, {"link", link->id}, {"kind", link->device->kind()}});
    return link;
  }
}

absl::StatusOr<std::unique_ptr<StateSender>> DeviceStateTransport::Open(const std::string& target,
                                                                       const std::string& session_id,
                                                                       int64_t expected_tokens, absl::Time deadline) {
  SALA_ASSIGN_OR_RETURN(std::shared_ptr<Link> link, LinkTo(target, deadline));
  if (!link) return host_path_.Open(target, session_id, expected_tokens, deadline);
  return std::unique_ptr<StateSender>(
      new DeviceStateSender(engine_, link, target, session_id, expected_tokens, options_.min_step_bytes, deadline));
}

}  // namespace sala::service

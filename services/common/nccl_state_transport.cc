#include "nccl_state_transport.h"

#include <numeric>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "channels.h"
#include "log.h"
#include "sala/status_macros.h"
#include "status_map.h"

namespace sala::service {
namespace {

// How long a pair without a GPU path uses the gRPC stream before trying NCCL again.
constexpr absl::Duration kHostPathFor = absl::Seconds(60);
// Setting up a link: the handshake call and the join of both ranks.
constexpr absl::Duration kHandshakeTimeout = absl::Seconds(10);
constexpr absl::Duration kJoinTimeout = absl::Seconds(60);

class NcclStateSender final : public StateSender {
 public:
  NcclStateSender(Engine& engine, std::shared_ptr<NcclStateTransport::Link> link, const std::string& target,
                  const std::string& session_id, int64_t expected_tokens, absl::Time deadline)
      : engine_(engine), link_(std::move(link)), deadline_(deadline), stream_(target, deadline) {
    holds_link_ = link_->busy.try_acquire_until(absl::ToChronoTime(deadline));
    if (!holds_link_) {
      opened_ = absl::DeadlineExceededError(absl::StrCat("the NCCL link to ", target, " stayed busy"));
      return;
    }
    sala::v1::StateChunk first;
    first.set_session_id(session_id);
    sala::v1::NcclSegment& seg = *first.mutable_nccl();
    seg.set_link_id(link_->id);
    seg.set_layout_hash(engine.config().layout_hash_hex());
    seg.set_expected_tokens(expected_tokens);
    opened_ = stream_.Write(std::move(first));
  }

  ~NcclStateSender() override {
    if (!finished_) Abort("transfer abandoned");
    if (holds_link_) link_->busy.release();
  }

  absl::Status SendProgress(SequenceState& state) override { return Step(state, false, 0); }

  absl::Status Finish(SequenceState& state, int first_token) override {
    SALA_RETURN_IF_ERROR(Step(state, true, first_token));
    // The receiver acknowledges once its receives completed; the sends end no later.
    absl::Status s = link_->nccl->Wait(deadline_, [this] { return stream_.failed(); });
    // Given up because the receiver's stream broke: its error (UNAVAILABLE, a lost decode
    // worker, which the router then takes out of routing) says more than the cancelled wait.
    if (s.ok() || stream_.failed()) s = stream_.Finish();
    if (!s.ok()) {
      Abort(std::string(s.message()));
      return s;
    }
    wire_seconds_ = link_->nccl->busy_seconds();
    finished_ = true;
    return absl::OkStatus();
  }

  void Abort(const std::string& reason) override {
    // Sends may wait for a receiver that is gone: abort the link before anything frees the state
    // (not a link that another transfer holds).
    if (holds_link_) link_->nccl->Abort();
    stream_.Cancel(reason);
    finished_ = true;
  }

  int64_t bytes_sent() const override { return bytes_; }
  double wire_seconds() override { return wire_seconds_; }
  const char* kind() const override { return "nccl"; }

 private:
  // Queues the sends of what the state gained since the last step and writes their descriptor.
  absl::Status Step(SequenceState& state, bool last, int first_token) {
    absl::Status s = opened_;
    sala::v1::StateChunk chunk;
    if (s.ok()) {
      auto spans = engine_.backend().StateSpans(state, sent_tokens_, state.tokens, /*linear=*/last, /*receive=*/false);
      auto bytes = spans.ok() ? link_->nccl->Send(*spans) : absl::StatusOr<int64_t>(spans.status());
      if (bytes.ok()) {
        sala::v1::NcclSegment& seg = *chunk.mutable_nccl();
        seg.set_from_tokens(sent_tokens_);
        seg.set_to_tokens(state.tokens);
        seg.set_linear_states(last);
        seg.set_bytes(*bytes);
        if (last) {
          chunk.set_last(true);
          chunk.set_first_token(first_token);
        }
        bytes_ += *bytes;
        sent_tokens_ = state.tokens;
        s = stream_.Write(std::move(chunk));
      } else {
        s = bytes.status();
      }
    }
    if (!s.ok()) Abort(std::string(s.message()));
    return s;
  }

  Engine& engine_;
  std::shared_ptr<NcclStateTransport::Link> link_;
  bool holds_link_ = false;
  const absl::Time deadline_;
  StateStream stream_;
  absl::Status opened_;
  int64_t sent_tokens_ = 0, bytes_ = 0;
  double wire_seconds_ = 0;
  bool finished_ = false;
};

}  // namespace

NcclStateTransport::NcclStateTransport(Engine& engine, std::string worker_id, bool fallback)
    : engine_(engine),
      worker_id_(std::move(worker_id)),
      fallback_(fallback),
      gpu_path_(engine.backend().name() == "cuda" && NcclLink::Available()),
      host_path_(engine) {
  if (!gpu_path_ && fallback_) LogInfo("no GPU path on this worker: states go through host memory");
}

absl::StatusOr<std::shared_ptr<NcclStateTransport::Link>> NcclStateTransport::LinkTo(const std::string& target,
                                                                                     absl::Time deadline) {
  if (!gpu_path_) {
    if (fallback_) return nullptr;
    return absl::FailedPreconditionError(absl::StrCat("NCCL state transfer to ", target, ": this worker has no GPU path"));
  }
  std::lock_guard<std::mutex> lock(mu_);
  Peer& peer = peers_[target];
  if (absl::Now() < peer.host_path_until) return nullptr;
  // No GPU path at all, or none to this peer: the host path where allowed.
  auto no_gpu_path = [&](const absl::Status& why) -> absl::StatusOr<std::shared_ptr<Link>> {
    if (!fallback_) return absl::Status(why.code(), absl::StrCat("NCCL state transfer to ", target, ": ", why.message()));
    LogWarning("state transfers go through host memory", {{"decode_worker", target}, {"reason", std::string(why.message())}});
    peer.host_path_until = absl::Now() + kHostPathFor;
    peer.link.reset();
    return nullptr;
  };

  sala::v1::NcclLinkRequest request;
  request.set_prefill_worker_id(worker_id_);
  request.set_layout_hash(engine_.config().layout_hash_hex());
  if (peer.link && !peer.link->nccl->aborted()) request.set_link_id(peer.link->id);
  sala::v1::NcclLinkReply reply;
  grpc::ClientContext context;
  context.set_deadline(absl::ToChronoTime(std::min(deadline, absl::Now() + kHandshakeTimeout)));
  const grpc::Status rpc = sala::v1::DecodeWorker::NewStub(SharedChannel(target))->OpenNcclLink(&context, request, &reply);
  if (!rpc.ok()) {
    if (rpc.error_code() == grpc::StatusCode::FAILED_PRECONDITION || rpc.error_code() == grpc::StatusCode::UNIMPLEMENTED)
      return no_gpu_path(FromGrpcStatus(rpc));
    return FromGrpcStatus(rpc);  // the peer is unreachable: no path would work
  }
  if (reply.nccl_unique_id().empty()) {
    if (!peer.link || peer.link->id != reply.link_id())
      return absl::InternalError("the decode worker confirmed a link this worker does not hold");
    return peer.link;
  }
  peer.link.reset();  // the peer does not know it any more (restarted, or the link failed)
  auto nccl = NcclLink::Join(reply.nccl_unique_id(), /*rank=*/0);
  if (!nccl.ok()) return no_gpu_path(nccl.status());
  if (absl::Status s = (*nccl)->WaitReady(std::min(deadline, absl::Now() + kJoinTimeout)); !s.ok()) return no_gpu_path(s);
  auto link = std::make_shared<Link>();
  link->id = reply.link_id();
  link->nccl = std::move(*nccl);
  peer.link = link;
  LogInfo("NCCL link up", {{"decode_worker", target}, {"link", link->id}});
  return link;
}

absl::StatusOr<std::unique_ptr<StateSender>> NcclStateTransport::Open(const std::string& target,
                                                                     const std::string& session_id,
                                                                     int64_t expected_tokens, absl::Time deadline) {
  SALA_ASSIGN_OR_RETURN(std::shared_ptr<Link> link, LinkTo(target, deadline));
  if (!link) return host_path_.Open(target, session_id, expected_tokens, deadline);
  return std::unique_ptr<StateSender>(new NcclStateSender(engine_, link, target, session_id, expected_tokens, deadline));
}

}  // namespace sala::service

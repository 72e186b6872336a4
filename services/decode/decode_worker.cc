#include "decode_worker.h"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <deque>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "log.h"
#include "metrics.h"
#include "process.h"
#include "sampling_proto.h"
#include "sala/copy_link.h"
#include "sala/nccl_link.h"
#include "sala/state_serialization.h"
#include "sala/status_macros.h"
#include "status_map.h"
#include "worker_main.h"

namespace sala::decode {

using service::LogInfo;
using service::LogWarning;
using service::Metrics;
using Clock = std::chrono::steady_clock;

struct DecodeWorker::Sequence {
  enum class Phase { kWaitingState, kAppend, kRunning, kKept, kDone };
  std::string session_id, request_id;
  uint64_t arrival = 0;
  Phase phase = Phase::kWaitingState;
  SamplingParams params;
  std::unique_ptr<Sampler> sampler;
  SequenceState state;
  std::vector<int> append_ids;
  int next_input = -1;  // sampled, not yet fed to the model
  int generated = 0;
  bool keep = false;
  bool attached = false;   // an Attach stream is reading its events
  bool cancelled = false;  // freed at the next chance
  absl::Time lease_deadline = absl::InfiniteFuture();
  absl::Time kept_until = absl::InfiniteFuture();
  absl::Time client_deadline = absl::InfiniteFuture();
  Clock::time_point last_token;
  double prefill_seconds = 0;
  std::deque<sala::v1::DecodeEvent> events;
  bool closed = false;  // finished or failed: no more events after `events`
  absl::Status error;
};

namespace {

constexpr int kFinishStop = sala::v1::FINISH_REASON_STOP;
constexpr int kFinishLength = sala::v1::FINISH_REASON_LENGTH;

}  // namespace

DecodeWorker::DecodeWorker(std::unique_ptr<Engine> engine, std::string worker_id, std::string address,
                           std::string model_name, DecodeOptions options)
    : engine_(std::move(engine)),
      worker_id_(std::move(worker_id)),
      address_(std::move(address)),
      model_name_(std::move(model_name)),
      options_(options),
      host_id_(CopyLink::HostId()),
      thread_([this] { Loop(); }) {}

DecodeWorker::~DecodeWorker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
  }
  work_cv_.notify_all();
  thread_.join();
}

int64_t DecodeWorker::EstimateBytes(int64_t tokens) const {
  const ModelConfig& c = engine_->config();
  const int64_t per_token = int64_t(c.num_sparse_layers()) * 2 * c.num_kv_heads * c.sparse_head_dim() * 4;
  const int64_t linear = int64_t(c.num_linear_layers()) * c.num_heads * c.head_dim * c.head_dim * 4;
  return tokens * per_token * 9 / 8 + linear;  // + compressed keys
}

int64_t DecodeWorker::UsedBytesLocked() const {
  int64_t used = 0;
  for (const auto& [id, s] : sequences_) used += int64_t(s->state.bytes());
  return used;
}

std::pair<int, int> DecodeWorker::RunningAndWaitingLocked() const {
  int running = 0, waiting = 0;
  for (const auto& [id, s] : sequences_) {
    running += s->phase == Sequence::Phase::kRunning || s->phase == Sequence::Phase::kAppend;
    waiting += s->phase == Sequence::Phase::kWaitingState;
  }
  return {running, waiting};
}

void DecodeWorker::UpdateGaugesLocked() const {
  const auto [running, waiting] = RunningAndWaitingLocked();
  Metrics::Get().running.Set(running);
  Metrics::Get().waiting.Set(waiting);
  Metrics::Get().state_memory_ratio.Set(double(UsedBytesLocked()) / double(options_.state_memory_bytes));
}

sala::v1::WorkerInfo DecodeWorker::Info() const {
  sala::v1::WorkerInfo info = service::WorkerIdentity(worker_id_, "decode", address_, model_name_, *engine_);
  std::lock_guard<std::mutex> lock(mu_);
  const auto [running, waiting] = RunningAndWaitingLocked();
  info.set_running(running);
  info.set_waiting(waiting);
  info.set_total_state_bytes(options_.state_memory_bytes);
  info.set_free_state_bytes(options_.state_memory_bytes - UsedBytesLocked());
  info.set_serving(!draining_);
  return info;
}

void DecodeWorker::Drain() {
  std::lock_guard<std::mutex> lock(mu_);
  draining_ = true;
}

bool DecodeWorker::Idle() const {
  std::lock_guard<std::mutex> lock(mu_);
  for (const auto& [id, s] : sequences_)
    if (s->attached) return false;
  return true;
}

grpc::Status DecodeWorker::GetWorkerInfo(grpc::ServerContext*, const sala::v1::WorkerInfoRequest*,
                                         sala::v1::WorkerInfo* info) {
  *info = Info();
  return grpc::Status::OK;
}

grpc::Status DecodeWorker::Abort(grpc::ServerContext*, const sala::v1::AbortRequest* request,
                                 sala::v1::AbortResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = sequences_.find(request->session_id());
  response->set_found(it != sequences_.end());
  if (it == sequences_.end()) return grpc::Status::OK;
  Sequence& s = *it->second;
  s.cancelled = true;
  if (!s.attached) sequences_.erase(it);  // a kept session: free it now
  else FailLocked(s, absl::CancelledError(request->reason().empty() ? "aborted" : request->reason()));
  UpdateGaugesLocked();
  events_cv_.notify_all();
  work_cv_.notify_all();
  return grpc::Status::OK;
}

void DecodeWorker::FailLocked(Sequence& s, const absl::Status& status) {
  if (s.closed) return;
  s.closed = true;
  s.error = status;
  s.phase = Sequence::Phase::kDone;
  s.state = SequenceState();
  events_cv_.notify_all();
}

void DecodeWorker::FinishLocked(Sequence& s, int reason) {
  sala::v1::DecodeEvent e;
  e.mutable_finished()->set_finish_reason(sala::v1::FinishReason(reason));
  e.mutable_finished()->set_generated_tokens(s.generated);
  e.mutable_finished()->set_prefill_seconds(s.prefill_seconds);
  s.events.push_back(std::move(e));
  s.closed = true;
  if (s.keep) {
    s.phase = Sequence::Phase::kKept;  // next_input stays: the next turn feeds it first
    s.kept_until = absl::Now() + absl::Seconds(options_.kept_session_ttl_seconds);
  } else {
    s.phase = Sequence::Phase::kDone;
    s.state = SequenceState();
  }
  events_cv_.notify_all();
}

void DecodeWorker::TakeTokenLocked(Sequence& s, int token) {
  const auto now = Clock::now();
  if (s.generated > 0) Metrics::Get().inter_token.Observe(std::chrono::duration<double>(now - s.last_token).count());
  s.last_token = now;
  s.next_input = token;
  if (engine_->IsStopToken(token, s.params)) {
    FinishLocked(s, kFinishStop);
    return;
  }
  sala::v1::DecodeEvent e;
  e.mutable_token()->set_token_id(token);
  s.events.push_back(std::move(e));
  ++s.generated;
  Metrics::Get().generation_tokens.Increment();
  if (s.generated >= s.params.max_new_tokens || s.state.tokens + 1 > engine_->max_context_tokens())
    FinishLocked(s, kFinishLength);
  events_cv_.notify_all();
}

grpc::Status DecodeWorker::Attach(grpc::ServerContext* context, const sala::v1::AttachRequest* request,
                                  grpc::ServerWriter<sala::v1::DecodeEvent>* writer) {
  if (request->session_id().empty()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "session id is empty");
  SamplingParams params = service::SamplingFromProto(request->sampling());
  if (absl::Status s = ValidateSamplingParams(params, engine_->config().vocab_size); !s.ok())
    return service::ToGrpcStatus(s);
  std::shared_ptr<Sequence> seq;
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "decode worker is draining");
    auto it = sequences_.find(request->session_id());
    if (request->append_ids_size() > 0) {
      if (it == sequences_.end() || it->second->phase != Sequence::Phase::kKept)
        return grpc::Status(grpc::StatusCode::NOT_FOUND,
                            absl::StrCat("no kept session '", request->session_id(), "' on this worker"));
      seq = it->second;
      seq->append_ids.clear();
      if (seq->next_input >= 0) seq->append_ids.push_back(seq->next_input);
      seq->append_ids.insert(seq->append_ids.end(), request->append_ids().begin(), request->append_ids().end());
      seq->phase = Sequence::Phase::kAppend;
      seq->events.clear();
      seq->closed = false;
      seq->error = absl::OkStatus();
    } else {
      if (it != sequences_.end())
        return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "session already on this worker");
      const int64_t need = EstimateBytes(request->prompt_tokens() + params.max_new_tokens);
      if (UsedBytesLocked() + need > options_.state_memory_bytes)
        return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED, "decode worker has no state memory left");
      seq = std::make_shared<Sequence>();
      seq->session_id = request->session_id();
      seq->phase = Sequence::Phase::kWaitingState;
      seq->lease_deadline = absl::Now() + absl::Seconds(request->lease_seconds() > 0 ? request->lease_seconds() : 60);
      sequences_[seq->session_id] = seq;
    }
    seq->request_id = request->request_id();
    seq->arrival = ++arrival_;
    seq->params = params;
    seq->sampler = std::make_unique<Sampler>(params);
    seq->generated = 0;
    seq->keep = request->keep_session();
    seq->attached = true;
    seq->cancelled = false;
    seq->client_deadline = absl::FromChrono(context->deadline());
    UpdateGaugesLocked();
  }
  work_cv_.notify_all();
  sala::v1::DecodeEvent attached;
  attached.mutable_attached()->set_worker_id(worker_id_);
  bool ok = writer->Write(attached);

  // Relay events until the sequence closes or the router goes away.
  absl::Status result = absl::OkStatus();
  std::unique_lock<std::mutex> lock(mu_);
  while (ok) {
    events_cv_.wait_for(lock, std::chrono::milliseconds(50),
                        [&] { return !seq->events.empty() || seq->closed; });
    if (context->IsCancelled()) {
      ok = false;
      break;
    }
    while (!seq->events.empty() && ok) {
      sala::v1::DecodeEvent e = std::move(seq->events.front());
      seq->events.pop_front();
      lock.unlock();
      ok = writer->Write(e);
      lock.lock();
    }
    if (seq->closed && seq->events.empty()) {
      result = seq->error;
      break;
    }
  }
  seq->attached = false;
  if (!ok) {
    // Router cancelled, disconnected or died: free everything, kept or not.
    seq->cancelled = true;
    result = absl::CancelledError("router went away");
  }
  if (seq->cancelled || seq->phase != Sequence::Phase::kKept) {
    if (seq->phase == Sequence::Phase::kRunning || seq->phase == Sequence::Phase::kAppend) {
      // The loop may be using the state right now: it frees it after the step.
      seq->cancelled = true;
    } else {
      auto it = sequences_.find(seq->session_id);
      if (it != sequences_.end() && it->second == seq) sequences_.erase(it);
    }
  }
  UpdateGaugesLocked();
  work_cv_.notify_all();
  return service::ToGrpcStatus(result);
}

struct DecodeWorker::PeerLink {
  std::string prefill_worker_id;
  std::unique_ptr<DeviceLink> device;
  std::mutex busy;  // one transfer at a time: receives must match the sender's order
  std::atomic<int64_t> last_used_ns{absl::GetCurrentTimeNanos()};
};

namespace {
// A link unused this long is dropped (it holds GPU buffers); a prefill worker that comes back
// after it simply sets up a new one.
constexpr absl::Duration kIdleLinkLifetime = absl::Minutes(10);
// The slots of a copy ring: a few MiB take tens of microseconds on NVLink, long next to the
// hosts' hand-over of a slot, short next to a prefill chunk's rows.
constexpr int64_t kCopySlotBytes = int64_t(16) << 20;
}  // namespace

grpc::Status DecodeWorker::OpenDeviceLink(grpc::ServerContext*, const sala::v1::DeviceLinkRequest* request,
                                          sala::v1::DeviceLinkReply* reply) {
  if (engine_->backend().name() != "cuda")
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION, "this decode worker has no GPU path");
  const std::string hash = engine_->config().layout_hash_hex();
  if (request->layout_hash() != hash)
    return grpc::Status(grpc::StatusCode::FAILED_PRECONDITION,
                        absl::StrCat("model layout ", request->layout_hash(), " differs from this worker's ", hash));
  std::lock_guard<std::mutex> lock(links_mu_);
  if (!request->link_id().empty()) {
    auto it = links_.find(request->link_id());
    if (it != links_.end() && !it->second->device->aborted()) {
      it->second->last_used_ns = absl::GetCurrentTimeNanos();
      reply->set_link_id(request->link_id());
      return grpc::Status::OK;
    }
  }
  // A new link replaces the peer's old ones; links nobody used for long go too.
  const int64_t idle_before = absl::ToUnixNanos(absl::Now() - kIdleLinkLifetime);
  for (auto it = links_.begin(); it != links_.end();) {
    const PeerLink& l = *it->second;
    const bool drop = l.prefill_worker_id == request->prefill_worker_id() || l.device->aborted() ||
                      l.last_used_ns < idle_before;
    it = drop ? links_.erase(it) : std::next(it);
  }
  auto link = std::make_shared<PeerLink>();
  link->prefill_worker_id = request->prefill_worker_id();
  const std::string link_id = service::RandomId("link-");
  const int32_t copy_slots = int32_t(options_.copy_ring_bytes / kCopySlotBytes);
  if (!request->host_id().empty() && request->host_id() == host_id_ && copy_slots >= 2) {
    auto ring = CopyLink::Listen(kCopySlotBytes, copy_slots);
    if (!ring.ok()) return service::ToGrpcStatus(ring.status());
    link->device = std::move(ring->first);
    sala::v1::CopyRing& r = *reply->mutable_copy_ring();
    r.set_socket_name(ring->second.socket_name);
    r.set_mapped_bytes(ring->second.mapped_bytes);
    r.set_slot_bytes(ring->second.slot_bytes);
    r.set_slots(ring->second.slots);
    r.set_process_id(ring->second.process_id);
    r.set_address(ring->second.address);
  } else {
    auto id = NcclLink::NewUniqueId();
    auto nccl = id.ok() ? NcclLink::Join(*id, /*rank=*/1) : absl::StatusOr<std::unique_ptr<DeviceLink>>(id.status());
    if (!nccl.ok()) return service::ToGrpcStatus(nccl.status());
    link->device = std::move(*nccl);
    // The join completes, and the peers connect, while the prefill worker joins on its side.
    std::thread([link] { (void)link->device->WaitReady(absl::Now() + absl::Seconds(60)); }).detach();
    reply->set_nccl_unique_id(*id);
  }
  links_[link_id] = link;
  reply->set_link_id(link_id);
  LogInfo("GPU link opened",
          {{"link", link_id}, {"kind", link->device->kind()}, {"prefill_worker", request->prefill_worker_id()}});
  return grpc::Status::OK;
}

bool DecodeWorker::Cancelled(const Sequence& seq) const {
  std::lock_guard<std::mutex> lock(mu_);
  return seq.cancelled || seq.closed;
}

absl::Status DecodeWorker::NextChunk(grpc::ServerContext* context, grpc::ServerReader<sala::v1::StateChunk>* reader,
                                     const Sequence& seq, sala::v1::StateChunk& chunk) const {
  if (Cancelled(seq)) return absl::CancelledError("sequence was cancelled");
  if (reader->Read(&chunk)) return absl::OkStatus();
  return absl::UnavailableError(context->IsCancelled() ? "state transfer cancelled by the prefill worker"
                                                       : "state transfer broken");
}

absl::StatusOr<SequenceState> DecodeWorker::ReceiveBytes(grpc::ServerContext* context,
                                                         grpc::ServerReader<sala::v1::StateChunk>* reader,
                                                         sala::v1::StateChunk& chunk, Sequence& seq, int64_t& bytes) {
  StateReader state_reader(engine_->config());
  for (;;) {
    bytes += int64_t(chunk.data().size());
    SALA_RETURN_IF_ERROR(state_reader.Feed(chunk.data()));
    if (chunk.last()) break;
    SALA_RETURN_IF_ERROR(NextChunk(context, reader, seq, chunk));
  }
  if (!state_reader.committed()) return absl::DataLossError("state stream ended without a commit");
  return state_reader.Take();
}

absl::StatusOr<SequenceState> DecodeWorker::ReceiveOverLink(grpc::ServerContext* context,
                                                            grpc::ServerReader<sala::v1::StateChunk>* reader,
                                                            sala::v1::StateChunk& chunk, Sequence& seq,
                                                            int64_t& bytes) {
  const sala::v1::DeviceSegment first = chunk.device();
  const std::string hash = engine_->config().layout_hash_hex();
  if (first.layout_hash() != hash)
    return absl::FailedPreconditionError(
        absl::StrCat("state of model layout ", first.layout_hash(), " does not fit this worker's ", hash));
  if (first.expected_tokens() <= 0 || first.expected_tokens() > engine_->max_context_tokens())
    return absl::InvalidArgumentError(absl::StrCat("a state of ", first.expected_tokens(), " tokens"));
  std::shared_ptr<PeerLink> link;
  {
    std::lock_guard<std::mutex> lock(links_mu_);
    auto it = links_.find(first.link_id());
    if (it == links_.end()) return absl::NotFoundError(absl::StrCat("no GPU link '", first.link_id(), "' here"));
    link = it->second;
  }
  std::unique_lock<std::mutex> busy(link->busy, std::try_to_lock);
  if (!busy.owns_lock()) return absl::AbortedError("the GPU link is busy with another transfer");
  link->last_used_ns = absl::GetCurrentTimeNanos();
  absl::Time deadline;
  {
    std::lock_guard<std::mutex> lock(mu_);
    deadline = seq.lease_deadline;
  }
  auto drop_link = [&] {
    link->device->Abort();
    std::lock_guard<std::mutex> lock(links_mu_);
    links_.erase(first.link_id());
  };
  absl::Status status = link->device->WaitReady(deadline);
  const double busy_before = status.ok() ? link->device->busy_seconds() : 0;
  SequenceState state = engine_->NewSequence();
  // Room for the prompt and the answer at once; the blocks land straight in the state.
  if (status.ok())
    status = engine_->backend().Reserve(
        state, std::min(first.expected_tokens() + seq.params.max_new_tokens, engine_->max_context_tokens()));
  while (status.ok()) {
    const sala::v1::DeviceSegment& seg = chunk.device();
    if (seg.to_tokens() > first.expected_tokens()) {
      status = absl::InvalidArgumentError("the state grows past its announced size");
      break;
    }
    if (seg.to_tokens() > seg.from_tokens() || seg.linear_states()) {
      auto spans = engine_->backend().StateSpans(state, seg.from_tokens(), seg.to_tokens(), seg.linear_states(),
                                                 /*receive=*/true);
      if (!spans.ok()) {
        status = spans.status();
        break;
      }
      const int64_t expect = SpanBytes(*spans);
      if (expect != seg.bytes()) {
        status = absl::DataLossError(absl::StrCat("a step of ", seg.bytes(), " bytes where this layout has ", expect));
        break;
      }
      auto n = link->device->Recv(*spans);
      if (!n.ok()) {
        status = n.status();
        break;
      }
      bytes += *n;
    }
    if (chunk.last()) break;
    status = NextChunk(context, reader, seq, chunk);
    if (status.ok() && !chunk.has_device())
      status = absl::InvalidArgumentError("a GPU transfer step without its descriptor");
  }
  if (status.ok())
    status = link->device->Wait(deadline, [&] { return context->IsCancelled() || Cancelled(seq); });
  if (status.ok() && !(chunk.last() && state.tokens == first.expected_tokens()))
    status = absl::DataLossError(absl::StrCat("the state ended at ", state.tokens, " of ", first.expected_tokens(),
                                              " tokens"));
  if (!status.ok()) {
    drop_link();  // receives may be pending: abort before the state's memory goes
    return status;
  }
  // Receives are posted once the sender's data is ready, so their time is the wire's.
  const double wire = link->device->busy_seconds() - busy_before;
  LogInfo("state received", {{"session", seq.session_id}, {"transport", link->device->kind()}, {"link", first.link_id()},
                             {"tokens", std::to_string(state.tokens)}, {"state_bytes", std::to_string(bytes)},
                             {"wire_seconds", absl::StrFormat("%.4f", wire)},
                             {"wire_gb_per_s", absl::StrFormat("%.1f", wire > 0 ? bytes / wire / 1e9 : 0.0)}});
  return state;
}

grpc::Status DecodeWorker::TransferState(grpc::ServerContext* context,
                                         grpc::ServerReader<sala::v1::StateChunk>* reader,
                                         sala::v1::TransferAck* ack) {
  const auto start = Clock::now();
  sala::v1::StateChunk chunk;
  if (!reader->Read(&chunk)) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "empty state stream");
  const std::string session = chunk.session_id();
  std::shared_ptr<Sequence> seq;
  {
    std::lock_guard<std::mutex> lock(mu_);
    auto it = sequences_.find(session);
    if (it == sequences_.end() || it->second->phase != Sequence::Phase::kWaitingState)
      return grpc::Status(grpc::StatusCode::NOT_FOUND, absl::StrCat("no sequence '", session, "' waits for state here"));
    seq = it->second;
  }
  int64_t bytes = 0;
  auto state = chunk.has_device() ? ReceiveOverLink(context, reader, chunk, *seq, bytes)
                                : ReceiveBytes(context, reader, chunk, *seq, bytes);
  Metrics::Get().transfer_bytes.Increment(double(bytes));
  std::lock_guard<std::mutex> lock(mu_);
  if (!state.ok()) {
    const absl::Status& status = state.status();
    Metrics::Get().TransferFailures(service::CodeLabel(status.code())).Increment();
    FailLocked(*seq, absl::Status(status.code(), absl::StrCat("state transfer: ", status.message())));
    work_cv_.notify_all();
    return service::ToGrpcStatus(status);
  }
  if (seq->cancelled || seq->closed) return grpc::Status(grpc::StatusCode::CANCELLED, "sequence was cancelled");
  seq->state = std::move(*state);
  Metrics::Get().transfer_time.Observe(std::chrono::duration<double>(Clock::now() - start).count());
  ack->set_tokens(seq->state.tokens);
  ack->set_bytes(bytes);
  seq->phase = Sequence::Phase::kRunning;
  // The first token was sampled by the prefill worker: the sampler skips its draw.
  if (seq->params.temperature > 0) seq->sampler->Skip(1);
  TakeTokenLocked(*seq, chunk.first_token());
  UpdateGaugesLocked();
  work_cv_.notify_all();
  return grpc::Status::OK;
}

void DecodeWorker::Loop() {
  std::unique_lock<std::mutex> lock(mu_);
  while (!stop_) {
    work_cv_.wait_for(lock, std::chrono::milliseconds(50));
    const absl::Time now = absl::Now();
    std::vector<std::shared_ptr<Sequence>> batch, appends;
    for (auto it = sequences_.begin(); it != sequences_.end();) {
      Sequence& s = *it->second;
      if ((s.cancelled && !s.attached) || (s.phase == Sequence::Phase::kKept && !s.attached && now > s.kept_until)) {
        it = sequences_.erase(it);  // frees the state
        continue;
      }
      if (s.phase == Sequence::Phase::kWaitingState && now > s.lease_deadline)
        FailLocked(s, absl::DeadlineExceededError("the sequence state did not arrive within the lease"));
      else if ((s.phase == Sequence::Phase::kRunning || s.phase == Sequence::Phase::kAppend) && now > s.client_deadline)
        FailLocked(s, absl::DeadlineExceededError("deadline exceeded while decoding"));
      else if (s.phase == Sequence::Phase::kAppend && !s.cancelled)
        appends.push_back(it->second);
      else if (s.phase == Sequence::Phase::kRunning && !s.cancelled && !s.closed)
        batch.push_back(it->second);
      ++it;
    }
    // Oldest first, at most max_running_requests per step; the rest wait their turn.
    std::sort(batch.begin(), batch.end(), [](const auto& a, const auto& b) { return a->arrival < b->arrival; });
    if (int(batch.size()) > options_.max_running_requests) batch.resize(options_.max_running_requests);
    UpdateGaugesLocked();
    if (batch.empty() && appends.empty()) continue;
    lock.unlock();
    for (const auto& seq : appends) AppendPrefill(seq);
    if (!batch.empty()) Step(batch);
    lock.lock();
    UpdateGaugesLocked();
    work_cv_.notify_all();  // more work may be ready: loop again at once
  }
}

void DecodeWorker::AppendPrefill(const std::shared_ptr<Sequence>& seq) {
  const auto start = Clock::now();
  auto logits = engine_->Prefill(seq->state, seq->append_ids);
  std::lock_guard<std::mutex> lock(mu_);
  seq->prefill_seconds = std::chrono::duration<double>(Clock::now() - start).count();
  if (!logits.ok()) {
    FailLocked(*seq, logits.status());
    return;
  }
  Metrics::Get().prompt_tokens.Increment(double(seq->append_ids.size()));
  seq->phase = Sequence::Phase::kRunning;
  TakeTokenLocked(*seq, seq->sampler->Sample(*logits));
}

void DecodeWorker::Step(std::vector<std::shared_ptr<Sequence>>& batch) {
  std::vector<SequenceState*> states;
  std::vector<int> inputs;
  std::vector<TokenDraw> draws;
  {
    std::lock_guard<std::mutex> lock(mu_);
    for (const auto& s : batch) {
      states.push_back(&s->state);
      inputs.push_back(s->next_input);
      draws.push_back(s->sampler->Next());
    }
  }
  auto next = engine_->DecodeAndDraw(states, inputs, draws);
  std::lock_guard<std::mutex> lock(mu_);
  for (size_t i = 0; i < batch.size(); ++i) {
    Sequence& s = *batch[i];
    if (!next.ok()) {
      if (next.status().code() == absl::StatusCode::kOutOfRange) FinishLocked(s, kFinishLength);
      else FailLocked(s, next.status());
      continue;
    }
    if (s.cancelled || s.closed) continue;
    TakeTokenLocked(s, (*next)[i]);
  }
}

}  // namespace sala::decode

#include "prefill_worker.h"

#include <atomic>
#include <chrono>
#include <future>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "log.h"
#include "metrics.h"
#include "process.h"
#include "sampling_proto.h"
#include "sala/status_macros.h"
#include "status_map.h"
#include "worker_main.h"

namespace sala::prefill {

using service::LogInfo;
using service::LogWarning;
using service::Metrics;
using Clock = std::chrono::steady_clock;

struct PrefillWorker::Job {
  sala::v1::PrefillTicket ticket;
  absl::Time lease_deadline;
  Clock::time_point enqueued = Clock::now();
  std::atomic<bool> cancelled{false};
  bool done = false;
  absl::Status status;
  sala::v1::PrefillResult result;
  std::deque<sala::v1::PrefillProgress> progress;  // for the caller's stream
};

PrefillWorker::PrefillWorker(std::unique_ptr<Engine> engine, std::unique_ptr<StateTransport> transport,
                             std::string worker_id, std::string address, std::string model_name)
    : engine_(std::move(engine)),
      transport_(std::move(transport)),
      worker_id_(std::move(worker_id)),
      address_(std::move(address)),
      model_name_(std::move(model_name)),
      thread_([this] { Loop(); }) {}

PrefillWorker::~PrefillWorker() {
  {
    std::lock_guard<std::mutex> lock(mu_);
    stop_ = true;
    for (auto& j : queue_) j->cancelled = true;
  }
  cv_.notify_all();
  thread_.join();
}

void PrefillWorker::Drain() {
  std::lock_guard<std::mutex> lock(mu_);
  draining_ = true;
}

sala::v1::WorkerInfo PrefillWorker::Info() const {
  sala::v1::WorkerInfo info = service::WorkerIdentity(worker_id_, "prefill", address_, model_name_, *engine_);
  std::lock_guard<std::mutex> lock(mu_);
  info.set_queued_prompt_tokens(queued_tokens_);
  info.set_waiting(int(queue_.size()));
  info.set_running(int(jobs_.size() - queue_.size()));
  info.set_serving(!draining_);
  return info;
}

grpc::Status PrefillWorker::GetWorkerInfo(grpc::ServerContext*, const sala::v1::WorkerInfoRequest*,
                                          sala::v1::WorkerInfo* info) {
  *info = Info();
  return grpc::Status::OK;
}

grpc::Status PrefillWorker::Prefill(grpc::ServerContext* context, const sala::v1::PrefillTicket* ticket,
                                    grpc::ServerWriter<sala::v1::PrefillProgress>* writer) {
  if (ticket->session_id().empty() || ticket->decode_worker_address().empty())
    return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "ticket needs a session id and a decode worker");
  if (ticket->prompt_ids().empty()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "prompt is empty");
  auto job = std::make_shared<Job>();
  job->ticket = *ticket;
  job->lease_deadline = absl::Now() + absl::Seconds(ticket->lease_seconds() > 0 ? ticket->lease_seconds() : 60);
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (draining_) return grpc::Status(grpc::StatusCode::UNAVAILABLE, "prefill worker is draining");
    if (jobs_.count(ticket->session_id()))
      return grpc::Status(grpc::StatusCode::ALREADY_EXISTS, "session already being prefilled here");
    queue_.push_back(job);
    jobs_[ticket->session_id()] = job;
    queued_tokens_ += ticket->prompt_ids_size();
    Metrics::Get().waiting.Set(double(queue_.size()));
  }
  cv_.notify_all();
  // Relay progress until the job ends, noticing a caller that went away (router cancelled or died).
  std::unique_lock<std::mutex> lock(mu_);
  for (;;) {
    while (!job->progress.empty()) {
      const sala::v1::PrefillProgress p = std::move(job->progress.front());
      job->progress.pop_front();
      lock.unlock();
      if (!writer->Write(p)) job->cancelled = true;
      lock.lock();
    }
    if (job->done) break;
    cv_.wait_for(lock, std::chrono::milliseconds(50));
    if (context->IsCancelled()) job->cancelled = true;
  }
  if (!job->status.ok()) return service::ToGrpcStatus(job->status);
  sala::v1::PrefillProgress last;
  *last.mutable_result() = job->result;
  lock.unlock();
  writer->Write(last);
  return grpc::Status::OK;
}

grpc::Status PrefillWorker::Abort(grpc::ServerContext*, const sala::v1::AbortRequest* request,
                                  sala::v1::AbortResponse* response) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = jobs_.find(request->session_id());
  response->set_found(it != jobs_.end());
  if (it != jobs_.end()) it->second->cancelled = true;
  return grpc::Status::OK;
}

void PrefillWorker::Progress(Job& job, const std::function<void(sala::v1::PrefillProgress&)>& fill) {
  sala::v1::PrefillProgress p;
  fill(p);
  std::lock_guard<std::mutex> lock(mu_);
  job.progress.push_back(std::move(p));
  cv_.notify_all();
}

void PrefillWorker::Loop() {
  for (;;) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mu_);
      cv_.wait(lock, [this] { return stop_ || !queue_.empty(); });
      if (stop_ && queue_.empty()) return;
      job = queue_.front();
      queue_.pop_front();
      Metrics::Get().waiting.Set(double(queue_.size()));
      Metrics::Get().running.Set(1);
    }
    const absl::Status status = job->cancelled ? absl::CancelledError("cancelled while queued") : Run(*job);
    if (!status.ok())
      LogWarning("prefill failed", {{"session", job->ticket.session_id()}, {"request_id", job->ticket.request_id()},
                                    {"error", status.ToString()}});
    Metrics::Get().Requests(service::CodeLabel(status.code())).Increment();
    std::lock_guard<std::mutex> lock(mu_);
    Metrics::Get().running.Set(0);
    job->status = status;
    job->done = true;
    jobs_.erase(job->ticket.session_id());
    queued_tokens_ -= job->ticket.prompt_ids_size();
    cv_.notify_all();
  }
}

absl::Status PrefillWorker::Run(Job& job) {
  const sala::v1::PrefillTicket& t = job.ticket;
  const double queue_seconds = service::SecondsSince(job.enqueued);
  Metrics::Get().queue_time.Observe(queue_seconds);
  const std::vector<int> prompt(t.prompt_ids().begin(), t.prompt_ids().end());
  const auto start = Clock::now();
  // Declared before the sender, so destroyed after it: an unfinished sender aborts its
  // transfer before the memory it may still be reading goes.
  SequenceState state = engine_->NewSequence();
  // The transfer opens (for NCCL: a link set up on first use, which takes a while) while the
  // first chunks compute; what they produce goes out once it is open.
  std::future<absl::StatusOr<std::unique_ptr<StateSender>>> opening = std::async(std::launch::async, [&] {
    return transport_->Open(t.decode_worker_address(), t.session_id(), int64_t(prompt.size()), job.lease_deadline);
  });
  std::unique_ptr<StateSender> sender;
  absl::Status transfer_status = absl::OkStatus();
  auto take_sender = [&]() -> absl::Status {
    auto opened = opening.get();
    if (opened.ok()) sender = std::move(*opened);
    return opened.status();
  };
  // After each chunk its rows go out while the next chunk computes.
  auto after_chunk = [&](const SequenceState&) -> absl::Status {
    if (job.cancelled) return absl::CancelledError("prefill cancelled");
    if (absl::Now() > job.lease_deadline) return absl::DeadlineExceededError("prefill lease expired");
    if (!sender && opening.wait_for(std::chrono::seconds(0)) == std::future_status::ready)
      transfer_status = take_sender();
    if (sender && transfer_status.ok()) transfer_status = sender->SendProgress(state);
    SALA_RETURN_IF_ERROR(transfer_status);
    Progress(job, [&](sala::v1::PrefillProgress& p) { p.mutable_chunk()->set_tokens_done(state.tokens); });
    return absl::OkStatus();
  };
  auto logits = engine_->Prefill(state, prompt, after_chunk);
  if (!logits.ok()) {
    if (!transfer_status.ok())
      Metrics::Get().TransferFailures(service::CodeLabel(transfer_status.code())).Increment();
    if (!sender && opening.valid()) (void)take_sender();  // its thread must not outlive this call
    if (sender) sender->Abort(std::string(logits.status().message()));
    return logits.status();
  }
  const double prefill_seconds = service::SecondsSince(start);
  Sampler sampler(service::SamplingFromProto(t.sampling()));
  const int first_token = sampler.Sample(*logits);
  const auto finish_start = Clock::now();
  Progress(job, [](sala::v1::PrefillProgress& p) { p.mutable_transferring(); });
  if (!sender) {
    if (absl::Status s = take_sender(); !s.ok()) {
      Metrics::Get().TransferFailures(service::CodeLabel(s.code())).Increment();
      return s;
    }
  }
  if (absl::Status s = sender->Finish(state, first_token); !s.ok()) {
    Metrics::Get().TransferFailures(service::CodeLabel(s.code())).Increment();
    return s;
  }
  const double exposed = service::SecondsSince(finish_start);
  Metrics::Get().prefill_time.Observe(prefill_seconds);
  Metrics::Get().transfer_time.Observe(service::SecondsSince(start));
  Metrics::Get().transfer_exposed.Observe(exposed);
  Metrics::Get().transfer_bytes.Increment(double(sender->bytes_sent()));
  Metrics::Get().prompt_tokens.Increment(double(prompt.size()));
  job.result.set_first_token(first_token);
  job.result.set_queue_seconds(queue_seconds);
  job.result.set_prefill_seconds(prefill_seconds);
  job.result.set_transfer_exposed_seconds(exposed);
  job.result.set_state_bytes(sender->bytes_sent());
  const double wire = sender->wire_seconds();
  LogInfo("prefill done", {{"session", t.session_id()}, {"request_id", t.request_id()},
                           {"prompt_tokens", std::to_string(prompt.size())},
                           {"prefill_seconds", absl::StrFormat("%.3f", prefill_seconds)},
                           {"transport", sender->kind()},
                           {"state_bytes", std::to_string(sender->bytes_sent())},
                           {"exposed_seconds", absl::StrFormat("%.4f", exposed)},
                           {"wire_seconds", absl::StrFormat("%.4f", wire)},
                           {"wire_gb_per_s", absl::StrFormat("%.1f", wire > 0 ? sender->bytes_sent() / wire / 1e9 : 0.0)}});
  return absl::OkStatus();
}

}  // namespace sala::prefill

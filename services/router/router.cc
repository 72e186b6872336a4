#include "router.h"

#include <chrono>
#include <random>
#include <set>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "channels.h"
#include "grpcpp/grpcpp.h"
#include "log.h"
#include "metrics.h"
#include "process.h"
#include "sala/sampling.h"
#include "sampling_proto.h"
#include "sala/status_macros.h"
#include "sala/v1/worker.grpc.pb.h"
#include "status_map.h"

namespace sala::router {

using service::LogInfo;
using service::LogWarning;
using service::Metrics;
using Clock = std::chrono::steady_clock;

namespace {

int64_t NowMs() { return absl::ToUnixMillis(absl::Now()); }

// Worker failures that another worker may not share.
bool IsWorkerFailure(absl::StatusCode c) {
  return c == absl::StatusCode::kUnavailable || c == absl::StatusCode::kAborted ||
         c == absl::StatusCode::kDataLoss || c == absl::StatusCode::kInternal ||
         c == absl::StatusCode::kUnknown || c == absl::StatusCode::kResourceExhausted;
}

}  // namespace

struct Router::Call {
  std::string request_id;
  Clock::time_point start = Clock::now();
  absl::Time deadline;
  std::vector<int> prompt;
  sala::v1::SamplingParameters sampling;  // seed always set
  bool continuing = false;
  bool keep = false;
  SessionRecord record;
  int generated = 0;
  bool first_token_sent = false;
  std::set<std::string> tried_prefill;
  double queue_seconds = 0, prefill_seconds = 0, transfer_seconds = 0, ttft = 0;
  std::unique_ptr<StreamDecoder> decoder;
  std::string held;  // decoded text not yet sent: it may be the start of a stop string
  // Cancellation: the contexts of the worker calls in progress.
  std::mutex mu;
  bool cancelled = false;
  grpc::ClientContext* attach_ctx = nullptr;
  grpc::ClientContext* prefill_ctx = nullptr;
};

Router::Router(std::unique_ptr<Tokenizer> tokenizer, ModelConfig config, WorkerPool* pool, SessionStore* sessions,
               RouterOptions options)
    : tokenizer_(std::move(tokenizer)),
      config_(std::move(config)),
      pool_(pool),
      sessions_(sessions),
      options_(std::move(options)) {
  if (options_.max_context_tokens <= 0) options_.max_context_tokens = config_.max_position_embeddings;
}

bool Router::Ready() { return pool_->CountUsable("prefill") > 0 && pool_->CountUsable("decode") > 0; }

sala::v1::ListModelsResponse Router::ListModels() const {
  sala::v1::ListModelsResponse r;
  auto* m = r.add_models();
  m->set_name(options_.model_name);
  m->set_max_context_tokens(options_.max_context_tokens);
  m->set_vocab_size(config_.vocab_size);
  return r;
}

absl::StatusOr<sala::v1::Session> Router::GetSession(const std::string& session_id) {
  if (session_id.empty()) return absl::InvalidArgumentError("session_id is empty");
  auto r = sessions_->Get(session_id);
  if (!r) return absl::NotFoundError(absl::StrCat("unknown session '", session_id, "'"));
  return r->session;
}

bool Router::Cancel(const std::string& request_id) {
  std::lock_guard<std::mutex> lock(mu_);
  auto it = calls_.find(request_id);
  if (it == calls_.end()) return false;
  Call& c = *it->second;
  std::lock_guard<std::mutex> call_lock(c.mu);
  c.cancelled = true;
  if (c.attach_ctx) c.attach_ctx->TryCancel();
  if (c.prefill_ctx) c.prefill_ctx->TryCancel();
  return true;
}

absl::StatusOr<std::vector<int>> Router::Tokenize(const sala::v1::GenerateRequest& req, bool continuing) const {
  std::vector<int> ids;
  switch (req.input_case()) {
    case sala::v1::GenerateRequest::kText:
      if (req.text().empty()) return absl::InvalidArgumentError("prompt is empty");
      ids = continuing ? tokenizer_->Encode(req.text()) : tokenizer_->EncodePrompt(req.text());
      break;
    case sala::v1::GenerateRequest::kChat: {
      std::vector<ChatMessage> msgs;
      for (const auto& m : req.chat().messages()) msgs.push_back({m.role(), m.content()});
      if (msgs.empty()) return absl::InvalidArgumentError("chat has no messages");
      if (continuing) {
        for (const auto& m : msgs)
          if (m.role != "system" && m.role != "user" && m.role != "assistant")
            return absl::InvalidArgumentError(absl::StrCat("unknown chat role '", m.role, "'"));
        // The previous turn ended with <|im_end|>, which the decode worker feeds first.
        ids = tokenizer_->Encode("\n" + Tokenizer::RenderChat(msgs));
      } else {
        SALA_ASSIGN_OR_RETURN(ids, tokenizer_->EncodeChat(msgs));
      }
      break;
    }
    case sala::v1::GenerateRequest::kTokenIds:
      ids.assign(req.token_ids().ids().begin(), req.token_ids().ids().end());
      break;
    default:
      return absl::InvalidArgumentError("request has no input (text, chat or token_ids)");
  }
  if (ids.empty()) return absl::InvalidArgumentError("prompt is empty");
  for (int id : ids)
    if (id < 0 || id >= config_.vocab_size)
      return absl::InvalidArgumentError(absl::StrCat("token id ", id, " is outside the vocabulary [0, ",
                                                     config_.vocab_size, ")"));
  return ids;
}

void Router::Record(Call& call, sala::v1::SessionStatus status, const std::string& error) {
  sala::v1::Session& s = call.record.session;
  s.set_status(status);
  s.set_updated_unix_ms(NowMs());
  if (!error.empty()) s.set_error(error);
  sessions_->Put(call.record);
}

absl::StatusOr<sala::v1::GenerationFinal> Router::Generate(const sala::v1::GenerateRequest& req, absl::Time deadline,
                                                           ResponseSink& sink) {
  auto finish = [&](absl::Status s) {
    Metrics::Get().Requests(service::CodeLabel(s.code())).Increment();
    return s;
  };
  if (draining_) return finish(absl::UnavailableError("router is shutting down"));
  if (!req.model().empty() && req.model() != options_.model_name)
    return finish(absl::NotFoundError(absl::StrCat("unknown model '", req.model(), "' (serving '",
                                                   options_.model_name, "')")));
  Call call;
  call.request_id = req.request_id().empty() ? service::RandomId("req-") : req.request_id();
  call.deadline = std::min(deadline, absl::Now() + absl::Seconds(options_.request_timeout_seconds));
  call.continuing = !req.session_id().empty();
  call.keep = req.keep_session();
  if (call.continuing) {
    auto r = sessions_->Get(req.session_id());
    if (!r) return finish(absl::NotFoundError(absl::StrCat("unknown session '", req.session_id(), "'")));
    if (!r->session.kept() || r->decode_address.empty())
      return finish(absl::FailedPreconditionError(
          absl::StrCat("session '", req.session_id(), "' was not kept (set keep_session on its previous request)")));
    call.record = *r;
  }
  auto prompt = Tokenize(req, call.continuing);
  if (!prompt.ok()) return finish(prompt.status());
  call.prompt = std::move(*prompt);
  const int64_t history = call.continuing ? call.record.session.prompt_tokens() + call.record.session.generated_tokens() : 0;
  if (history + int64_t(call.prompt.size()) > options_.max_context_tokens)
    return finish(absl::InvalidArgumentError(absl::StrCat("prompt of ", call.prompt.size(), " tokens",
                                                          history ? absl::StrCat(" (", history + call.prompt.size(), " with the session's history)") : "",
                                                          " exceeds the maximum context of ", options_.max_context_tokens,
                                                          " tokens")));
  call.sampling = req.sampling();
  if (!call.sampling.has_seed()) call.sampling.set_seed(std::random_device{}() | (uint64_t(std::random_device{}()) << 32));
  {
    const SamplingParams p = service::SamplingFromProto(call.sampling);
    if (absl::Status s = ValidateSamplingParams(p, config_.vocab_size); !s.ok()) return finish(s);
    if (p.max_new_tokens == 0) return finish(absl::InvalidArgumentError("max_new_tokens must be at least 1"));
  }
  if (call.sampling.stop_strings_size() > 8)
    return finish(absl::InvalidArgumentError("at most 8 stop strings"));
  for (const std::string& stop : call.sampling.stop_strings())
    if (stop.empty() || stop.size() > 256)
      return finish(absl::InvalidArgumentError("stop strings must be 1 to 256 bytes long"));
  if (call.sampling.stop_strings_size() > 0 && call.keep)
    return finish(absl::InvalidArgumentError("stop strings cannot be combined with keep_session"));
  // Admission.
  if (in_flight_.fetch_add(1) >= options_.max_queue) {
    in_flight_.fetch_sub(1);
    return finish(absl::ResourceExhaustedError(
        absl::StrCat("too many requests in flight (", options_.max_queue, "); retry later")));
  }
  {
    std::lock_guard<std::mutex> lock(mu_);
    if (calls_.count(call.request_id)) {
      in_flight_.fetch_sub(1);
      return finish(absl::AlreadyExistsError(absl::StrCat("request id '", call.request_id, "' is already running")));
    }
    calls_[call.request_id] = &call;
  }
  Metrics::Get().waiting.Set(in_flight_);
  sala::v1::GenerationFinal final;
  absl::Status status = Run(call, sink, &final);
  {
    std::lock_guard<std::mutex> lock(mu_);
    calls_.erase(call.request_id);
  }
  in_flight_.fetch_sub(1);
  Metrics::Get().waiting.Set(in_flight_);
  const double e2e = service::SecondsSince(call.start);
  Metrics::Get().e2e.Observe(e2e);
  if (status.ok()) {
    Record(call, sala::v1::SESSION_STATUS_DONE);
  } else {
    Record(call, status.code() == absl::StatusCode::kCancelled ? sala::v1::SESSION_STATUS_CANCELLED
                                                                : sala::v1::SESSION_STATUS_FAILED,
           std::string(status.message()));
    LogWarning("request failed", {{"request_id", call.request_id}, {"error", status.ToString()}});
  }
  if (!status.ok()) return finish(status);
  Metrics::Get().Requests(service::CodeLabel(absl::StatusCode::kOk)).Increment();
  final.set_request_id(call.request_id);
  auto* t = final.mutable_timings();
  t->set_queue_seconds(call.queue_seconds);
  t->set_prefill_seconds(call.prefill_seconds);
  t->set_transfer_seconds(call.transfer_seconds);
  t->set_time_to_first_token_seconds(call.ttft);
  t->set_e2e_seconds(e2e);
  final.mutable_usage()->set_prompt_tokens(int(call.prompt.size()));
  final.mutable_usage()->set_generated_tokens(call.generated);
  if (call.keep || call.continuing) final.set_session_id(call.record.session.session_id());
  return final;
}

absl::Status Router::Run(Call& call, ResponseSink& sink, sala::v1::GenerationFinal* final) {
  sala::v1::Session& s = call.record.session;
  if (!call.continuing) {
    s.set_session_id(service::RandomId("s-"));
    s.set_created_unix_ms(NowMs());
    s.set_prompt_tokens(int64_t(call.prompt.size()));
  } else {
    s.set_prompt_tokens(s.prompt_tokens() + s.generated_tokens() + int64_t(call.prompt.size()));
    s.set_generated_tokens(0);
  }
  s.set_kept(call.keep);
  Record(call, sala::v1::SESSION_STATUS_QUEUED);
  Metrics::Get().prompt_tokens.Increment(double(call.prompt.size()));
  call.decoder = std::make_unique<StreamDecoder>(*tokenizer_);

  absl::Status last = absl::UnavailableError("no prefill or decode worker is available");
  for (int attempt = 0; attempt < (call.continuing ? 1 : options_.max_attempts); ++attempt) {
    if (absl::Now() > call.deadline) return absl::DeadlineExceededError("deadline exceeded before the first token");
    bool retryable = false;
    if (!call.continuing) call.record.worker_key = attempt == 0 ? s.session_id() : absl::StrCat(s.session_id(), "/", attempt);
    last = Attempt(call, sink, final, &retryable);
    if (last.ok() || !retryable || call.first_token_sent) break;
    {
      std::lock_guard<std::mutex> lock(call.mu);
      if (call.cancelled) return absl::CancelledError("request cancelled");
    }
    LogWarning("retrying on other workers", {{"request_id", call.request_id}, {"error", last.ToString()}});
    call.tried_prefill.insert(s.prefill_worker());
  }
  return last;
}

absl::Status Router::Attempt(Call& call, ResponseSink& sink, sala::v1::GenerationFinal* final, bool* retryable) {
  sala::v1::Session& s = call.record.session;
  // Decode side first: the sequence must be waiting there before its state arrives.
  std::string decode_address = call.record.decode_address;
  if (!call.continuing) {
    auto d = pool_->PickDecode({});
    auto p = pool_->PickPrefill(call.tried_prefill);  // another worker than the one that failed, if any
    if (!p) p = pool_->PickPrefill({});
    if (!d || !p) {
      *retryable = false;
      return absl::UnavailableError(!p ? "no prefill worker is available" : "no decode worker is available");
    }
    decode_address = d->address();
    s.set_decode_worker(d->worker_id());
    s.set_prefill_worker(p->address());
    call.record.decode_address = decode_address;
  }
  grpc::ClientContext attach_ctx;
  attach_ctx.set_deadline(absl::ToChronoTime(call.deadline));
  sala::v1::AttachRequest attach;
  attach.set_session_id(call.record.worker_key);
  attach.set_request_id(call.request_id);
  *attach.mutable_sampling() = call.sampling;
  attach.set_prompt_tokens(int64_t(call.prompt.size()));
  attach.set_lease_seconds(options_.lease_seconds);
  attach.set_keep_session(call.keep);
  if (call.continuing) attach.mutable_append_ids()->Add(call.prompt.begin(), call.prompt.end());
  {
    std::lock_guard<std::mutex> lock(call.mu);
    if (call.cancelled) return absl::CancelledError("request cancelled");
    call.attach_ctx = &attach_ctx;
  }
  auto detach = [&] {
    std::lock_guard<std::mutex> lock(call.mu);
    call.attach_ctx = nullptr;
    call.prefill_ctx = nullptr;
  };
  auto stub = sala::v1::DecodeWorker::NewStub(service::SharedChannel(decode_address));
  std::unique_ptr<grpc::ClientReader<sala::v1::DecodeEvent>> reader = stub->Attach(&attach_ctx, attach);
  sala::v1::DecodeEvent event;
  if (!reader->Read(&event) || !event.has_attached()) {
    const absl::Status st = service::FromGrpcStatus(reader->Finish());
    detach();
    if (call.continuing) return st.ok() ? absl::UnavailableError("decode worker closed the stream") : st;
    pool_->MarkFailed(decode_address);
    *retryable = true;
    return absl::UnavailableError(absl::StrCat("decode worker ", decode_address, ": ", st.message()));
  }
  if (!call.continuing) {
    // Prefill, shipping the state to the decode worker as it goes.
    Record(call, sala::v1::SESSION_STATUS_PREFILLING);
    const std::string prefill_address = s.prefill_worker();
    grpc::ClientContext prefill_ctx;
    prefill_ctx.set_deadline(absl::ToChronoTime(std::min(call.deadline, absl::Now() + absl::Seconds(options_.lease_seconds))));
    {
      std::lock_guard<std::mutex> lock(call.mu);
      if (call.cancelled) {
        attach_ctx.TryCancel();
        detach();
        return absl::CancelledError("request cancelled");
      }
      call.prefill_ctx = &prefill_ctx;
    }
    sala::v1::PrefillTicket ticket;
    ticket.set_session_id(call.record.worker_key);
    ticket.set_request_id(call.request_id);
    ticket.mutable_prompt_ids()->Add(call.prompt.begin(), call.prompt.end());
    *ticket.mutable_sampling() = call.sampling;
    ticket.set_decode_worker_address(decode_address);
    ticket.set_lease_seconds(options_.lease_seconds);
    sala::v1::PrefillResult result;
    pool_->AddInflight(prefill_address, int64_t(call.prompt.size()));
    auto progress = sala::v1::PrefillWorker::NewStub(service::SharedChannel(prefill_address))->Prefill(&prefill_ctx, ticket);
    sala::v1::PrefillProgress event;
    bool got_result = false;
    while (progress->Read(&event)) {
      if (event.has_transferring()) Record(call, sala::v1::SESSION_STATUS_TRANSFERRING);
      if (event.has_result()) {
        result = event.result();
        got_result = true;
      }
    }
    grpc::Status ps = progress->Finish();
    if (ps.ok() && !got_result) ps = grpc::Status(grpc::StatusCode::UNAVAILABLE, "prefill stream ended without a result");
    pool_->AddInflight(prefill_address, -int64_t(call.prompt.size()));
    {
      std::lock_guard<std::mutex> lock(call.mu);
      call.prefill_ctx = nullptr;
    }
    if (!ps.ok()) {
      attach_ctx.TryCancel();
      reader->Finish();
      detach();
      const absl::Status st = service::FromGrpcStatus(ps);
      {
        std::lock_guard<std::mutex> lock(call.mu);
        if (call.cancelled) return absl::CancelledError("request cancelled");
      }
      if (st.code() == absl::StatusCode::kUnavailable) pool_->MarkFailed(prefill_address);
      *retryable = IsWorkerFailure(st.code());
      return absl::Status(st.code(), absl::StrCat("prefill: ", st.message()));
    }
    call.queue_seconds = result.queue_seconds();
    call.prefill_seconds = result.prefill_seconds();
    call.transfer_seconds = result.transfer_exposed_seconds();
    Metrics::Get().queue_time.Observe(call.queue_seconds);
    Metrics::Get().prefill_time.Observe(call.prefill_seconds);
  }
  Record(call, sala::v1::SESSION_STATUS_DECODING);
  // Relay the decode worker's tokens.
  bool client_gone = false;
  while (reader->Read(&event)) {
    if (event.has_token()) {
      const int token = event.token().token_id();
      bool stopped = false;
      const std::string text = ReleaseText(call, call.decoder->Push(token), &stopped);
      if (!call.first_token_sent) {
        call.first_token_sent = true;
        call.ttft = service::SecondsSince(call.start);
        Metrics::Get().ttft.Observe(call.ttft);
        if (call.continuing) call.prefill_seconds = 0;
      }
      ++call.generated;
      s.set_generated_tokens(call.generated);
      if (!sink.OnDelta({token}, text)) {
        client_gone = true;
        std::lock_guard<std::mutex> lock(call.mu);
        call.cancelled = true;
        attach_ctx.TryCancel();
        break;
      }
      if (stopped) {
        // A stop string: the answer is complete; the decode worker frees the sequence.
        final->set_finish_reason(sala::v1::FINISH_REASON_STOP);
        attach_ctx.TryCancel();
        reader->Finish();
        detach();
        return absl::OkStatus();
      }
    } else if (event.has_finished()) {
      final->set_finish_reason(event.finished().finish_reason());
      if (call.continuing) call.prefill_seconds = event.finished().prefill_seconds();
    }
  }
  const absl::Status st = service::FromGrpcStatus(reader->Finish());
  detach();
  if (client_gone) return absl::CancelledError("client went away");
  {
    std::lock_guard<std::mutex> lock(call.mu);
    if (call.cancelled) return absl::CancelledError("request cancelled");
  }
  if (!st.ok()) {
    if (call.first_token_sent)
      return absl::AbortedError(absl::StrCat("decode worker failed after ", call.generated, " tokens: ", st.message()));
    if (!call.continuing && st.code() == absl::StatusCode::kUnavailable) pool_->MarkFailed(decode_address);
    *retryable = !call.continuing && IsWorkerFailure(st.code());
    return st;
  }
  if (final->finish_reason() == sala::v1::FINISH_REASON_UNSPECIFIED)
    return absl::AbortedError("decode stream ended without a finish");
  bool stopped = false;
  std::string tail = ReleaseText(call, call.decoder->Flush(), &stopped);
  if (!stopped) tail += std::exchange(call.held, "");
  else final->set_finish_reason(sala::v1::FINISH_REASON_STOP);
  if (!tail.empty()) sink.OnDelta({}, tail);
  return absl::OkStatus();
}

std::string Router::ReleaseText(Call& call, const std::string& text, bool* stopped) {
  const auto& stops = call.sampling.stop_strings();
  call.held += text;
  if (stops.empty()) return std::exchange(call.held, "");
  // The earliest complete stop string ends the answer.
  size_t cut = std::string::npos;
  for (const std::string& stop : stops) cut = std::min(cut, call.held.find(stop));
  if (cut != std::string::npos) {
    *stopped = true;
    std::string out = call.held.substr(0, cut);
    call.held.clear();
    return out;
  }
  // Hold back the longest tail that could still grow into a stop string.
  size_t keep = 0;
  for (const std::string& stop : stops)
    for (size_t n = std::min(stop.size() - 1, call.held.size()); n > keep; --n)
      if (call.held.compare(call.held.size() - n, n, stop, 0, n) == 0) {
        keep = n;
        break;
      }
  std::string out = call.held.substr(0, call.held.size() - keep);
  call.held.erase(0, call.held.size() - keep);
  return out;
}

}  // namespace sala::router

// The router's logic, independent of the front ends: validation, admission, routing, the
// prefill/decode data path with retries before the first token, sessions, cancellation.
#pragma once

#include <atomic>
#include <map>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "sala/config.h"
#include "sala/tokenizer.h"
#include "sala/v1/generate.pb.h"
#include "session_store.h"
#include "worker_pool.h"

namespace sala::router {

struct RouterOptions {
  std::string model_name;
  int max_queue = 256;               // requests in flight before RESOURCE_EXHAUSTED
  double lease_seconds = 300;        // a prefill + transfer must finish within this
  double request_timeout_seconds = 3600;
  int max_attempts = 3;              // tries before the first token
  int64_t max_context_tokens = 0;    // 0: the model's max_position_embeddings
};

// Where a front end receives the answer.
class ResponseSink {
 public:
  virtual ~ResponseSink() = default;
  // New tokens and their text; returns false when the client has gone away.
  virtual bool OnDelta(const std::vector<int>& ids, const std::string& text) = 0;
};

class Router {
 public:
  Router(std::unique_ptr<Tokenizer> tokenizer, ModelConfig config, WorkerPool* pool, SessionStore* sessions,
         RouterOptions options);

  absl::StatusOr<sala::v1::GenerationFinal> Generate(const sala::v1::GenerateRequest& request,
                                                     absl::Time deadline, ResponseSink& sink);
  // False when no such request is running.
  bool Cancel(const std::string& request_id);
  absl::StatusOr<sala::v1::Session> GetSession(const std::string& session_id);
  sala::v1::ListModelsResponse ListModels() const;
  const std::string& model_name() const { return options_.model_name; }
  const Tokenizer& tokenizer() const { return *tokenizer_; }

  void Drain() { draining_ = true; }
  bool Draining() const { return draining_; }
  int InFlight() const { return in_flight_; }
  // At least one usable prefill and decode worker.
  bool Ready();

 private:
  struct Call;
  absl::StatusOr<std::vector<int>> Tokenize(const sala::v1::GenerateRequest& request, bool continuing) const;
  absl::Status Run(Call& call, ResponseSink& sink, sala::v1::GenerationFinal* final);
  // One attempt on a prefill/decode pair; `retryable` says whether another pair may be tried.
  absl::Status Attempt(Call& call, ResponseSink& sink, sala::v1::GenerationFinal* final, bool* retryable);
  absl::Status Relay(Call& call, ResponseSink& sink, sala::v1::GenerationFinal* final);
  void Record(Call& call, sala::v1::SessionStatus status, const std::string& error = "");
  // Text of the answer that can be sent now, given the request's stop strings; sets *stopped
  // (and drops the rest) when one appeared.
  static std::string ReleaseText(Call& call, const std::string& text, bool* stopped);

  std::unique_ptr<Tokenizer> tokenizer_;
  ModelConfig config_;
  WorkerPool* pool_;
  SessionStore* sessions_;
  RouterOptions options_;
  std::atomic<bool> draining_{false};
  std::atomic<int> in_flight_{0};
  std::mutex mu_;
  std::map<std::string, Call*> calls_;  // by request id
};

}  // namespace sala::router

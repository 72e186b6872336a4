#include "metrics.h"

#include <memory>

#include "prometheus/text_serializer.h"

namespace sala::service {
namespace {

using prometheus::BuildCounter;
using prometheus::BuildGauge;
using prometheus::BuildHistogram;
using prometheus::Histogram;

// Request-level latencies: from 10 ms to 4 hours (a queued 1M-token prompt takes long).
const Histogram::BucketBoundaries kRequestBuckets = {0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20,
                                                     40, 60, 120, 300, 600, 1200, 1800, 3600, 7200, 14400};
// Per-token and per-operation latencies: 100 µs to 10 s.
const Histogram::BucketBoundaries kFastBuckets = {0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025,
                                                  0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10};

std::unique_ptr<Metrics> instance;

template <typename T>
T& Unlabeled(prometheus::Family<T>& family) { return family.Add({}); }

Histogram& Hist(prometheus::Registry& r, const char* name, const char* help, const Histogram::BucketBoundaries& b) {
  return BuildHistogram().Name(name).Help(help).Register(r).Add({}, b);
}

}  // namespace

Metrics::Metrics(const std::string& service)
    : registry_(std::make_shared<prometheus::Registry>()),
      ttft(Hist(*registry_, "sala_time_to_first_token_seconds",
                "Request received to first token sent", kRequestBuckets)),
      inter_token(Hist(*registry_, "sala_inter_token_latency_seconds", "Time between consecutive tokens of a request",
                       kFastBuckets)),
      e2e(Hist(*registry_, "sala_e2e_request_latency_seconds", "Request received to final response", kRequestBuckets)),
      queue_time(Hist(*registry_, "sala_request_queue_time_seconds", "Time waiting for admission and a worker",
                      kRequestBuckets)),
      prefill_time(Hist(*registry_, "sala_request_prefill_time_seconds", "Prefill computation time", kRequestBuckets)),
      transfer_time(Hist(*registry_, "sala_state_transfer_seconds", "State transfer from first byte to commit",
                         kRequestBuckets)),
      transfer_exposed(Hist(*registry_, "sala_state_transfer_exposed_seconds",
                            "State transfer time not hidden behind prefill", kRequestBuckets)),
      transfer_bytes(Unlabeled(BuildCounter().Name("sala_state_transfer_bytes_total")
                                   .Help("Bytes of sequence state sent or received").Register(*registry_))),
      prompt_tokens(Unlabeled(BuildCounter().Name("sala_prompt_tokens_total").Help("Prompt tokens processed")
                                  .Register(*registry_))),
      generation_tokens(Unlabeled(BuildCounter().Name("sala_generation_tokens_total").Help("Tokens generated")
                                      .Register(*registry_))),
      running(Unlabeled(BuildGauge().Name("sala_num_requests_running").Help("Requests being served now")
                            .Register(*registry_))),
      waiting(Unlabeled(BuildGauge().Name("sala_num_requests_waiting").Help("Requests queued").Register(*registry_))),
      state_memory_ratio(Unlabeled(BuildGauge().Name("sala_state_memory_usage_ratio")
                                       .Help("Share of the state memory budget in use").Register(*registry_))),
      redis_up(Unlabeled(BuildGauge().Name("sala_redis_up").Help("1 when the last Redis command succeeded")
                             .Register(*registry_))) {
  requests_ = &BuildCounter().Name("sala_requests_total").Help("Finished requests by status code").Register(*registry_);
  redis_ = &BuildHistogram().Name("sala_redis_request_duration_seconds").Help("Redis command latency by operation")
                .Register(*registry_);
  transfer_failures_ = &BuildCounter().Name("sala_state_transfer_failures_total")
                            .Help("Failed state transfers by cause").Register(*registry_);
  workers_ = &BuildGauge().Name("sala_workers").Help("Workers known to the router by role and state")
                  .Register(*registry_);
  BuildGauge().Name("sala_build_info").Help("Build and service information").Register(*registry_)
      .Add({{"version", "0.1.0"}, {"service", service}}).Set(1);
}

void Metrics::Init(const std::string& service) { instance = std::make_unique<Metrics>(service); }
Metrics& Metrics::Get() { return *instance; }

std::string Metrics::Text() const {
  return prometheus::TextSerializer().Serialize(registry_->Collect());
}

prometheus::Counter& Metrics::Requests(const std::string& code) { return requests_->Add({{"code", code}}); }
prometheus::Histogram& Metrics::Redis(const std::string& op) { return redis_->Add({{"op", op}}, kFastBuckets); }
prometheus::Counter& Metrics::TransferFailures(const std::string& cause) {
  return transfer_failures_->Add({{"cause", cause}});
}
prometheus::Gauge& Metrics::Workers(const std::string& role, const std::string& state) {
  return workers_->Add({{"role", role}, {"state", state}});
}

}  // namespace sala::service

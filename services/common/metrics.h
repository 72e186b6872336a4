// The Prometheus metrics of every service (names from ARCHITECTURE.md: prefix sala_, base
// units). Each service updates the ones that concern it; all are exported.
#pragma once

#include <memory>
#include <string>

#include "prometheus/counter.h"
#include "prometheus/family.h"
#include "prometheus/gauge.h"
#include "prometheus/histogram.h"
#include "prometheus/registry.h"

namespace sala::service {

class Metrics {
  // First: the metric references below are initialised from it.
  std::shared_ptr<prometheus::Registry> registry_;

 public:
  // `service`: router, prefill or decode (a label of sala_build_info).
  explicit Metrics(const std::string& service);
  static Metrics& Get();  // the process's instance, created by Init
  static void Init(const std::string& service);

  // Prometheus text exposition format.
  std::string Text() const;

  prometheus::Histogram& ttft;
  prometheus::Histogram& inter_token;
  prometheus::Histogram& e2e;
  prometheus::Histogram& queue_time;
  prometheus::Histogram& prefill_time;
  prometheus::Histogram& transfer_time;
  prometheus::Histogram& transfer_exposed;
  prometheus::Counter& transfer_bytes;
  prometheus::Counter& prompt_tokens;
  prometheus::Counter& generation_tokens;
  prometheus::Gauge& running;
  prometheus::Gauge& waiting;
  prometheus::Gauge& state_memory_ratio;
  prometheus::Gauge& redis_up;
  prometheus::Counter& Requests(const std::string& code);
  prometheus::Histogram& Redis(const std::string& op);
  prometheus::Counter& TransferFailures(const std::string& cause);
  prometheus::Gauge& Workers(const std::string& role, const std::string& state);

 private:
  prometheus::Family<prometheus::Counter>* requests_;
  prometheus::Family<prometheus::Histogram>* redis_;
  prometheus::Family<prometheus::Counter>* transfer_failures_;
  prometheus::Family<prometheus::Gauge>* workers_;
};

}  // namespace sala::service

#include "process.h"

#include <signal.h>

#include <random>

#include "absl/strings/str_format.h"
#include "httplib.h"
#include "metrics.h"

namespace sala::service {

void BlockTerminationSignals() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  pthread_sigmask(SIG_BLOCK, &set, nullptr);
  signal(SIGPIPE, SIG_IGN);  // a peer that went away is an error return, not a crash
}

int WaitForTerminationSignal() {
  sigset_t set;
  sigemptyset(&set);
  sigaddset(&set, SIGTERM);
  sigaddset(&set, SIGINT);
  int sig = 0;
  sigwait(&set, &sig);
  return sig;
}

HttpEndpoint::HttpEndpoint() : server_(std::make_unique<httplib::Server>()) {}

absl::StatusOr<std::unique_ptr<HttpEndpoint>> HttpEndpoint::Start(const std::string& host, int port,
                                                                  std::function<bool()> healthy) {
  std::unique_ptr<HttpEndpoint> e(new HttpEndpoint());
  if (port <= 0) return e;
  e->server_->Get("/metrics", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(Metrics::Get().Text(), "text/plain; version=0.0.4");
  });
  e->server_->Get("/health", [healthy](const httplib::Request&, httplib::Response& res) {
    const bool ok = healthy();
    res.status = ok ? 200 : 503;
    res.set_content(ok ? "{\"status\":\"ok\"}" : "{\"status\":\"draining\"}", "application/json");
  });
  if (!e->server_->bind_to_port(host.c_str(), port))
    return absl::UnavailableError(absl::StrFormat("cannot listen on %s:%d for /metrics", host, port));
  e->thread_ = std::thread([s = e->server_.get()] { s->listen_after_bind(); });
  return e;
}

HttpEndpoint::~HttpEndpoint() {
  server_->stop();
  if (thread_.joinable()) thread_.join();
}

std::string RandomId(const std::string& prefix) {
  static thread_local std::mt19937_64 rng(std::random_device{}());
  return absl::StrFormat("%s%016x", prefix, rng());
}

}  // namespace sala::service

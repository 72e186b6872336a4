// Process plumbing shared by the services: termination signals, the small HTTP endpoint of the
// workers (/metrics, /health), worker ids.
#pragma once

#include <atomic>
#include <chrono>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"

namespace httplib { class Server; }

namespace sala::service {

// Call first in main, before any thread starts: SIGTERM/SIGINT are then only seen by
// WaitForTerminationSignal.
void BlockTerminationSignals();
// Blocks until SIGTERM or SIGINT; returns the signal.
int WaitForTerminationSignal();

// /metrics and /health on `port` (0: none), served from a thread of its own.
class HttpEndpoint {
 public:
  static absl::StatusOr<std::unique_ptr<HttpEndpoint>> Start(const std::string& host, int port,
                                                             std::function<bool()> healthy);
  ~HttpEndpoint();

 private:
  HttpEndpoint();
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

// Seconds of steady time since `t`.
inline double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

// A short random id, for workers and requests.
std::string RandomId(const std::string& prefix);

}  // namespace sala::service

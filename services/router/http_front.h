// The OpenAI-compatible HTTP front: /v1/completions, /v1/chat/completions (with SSE streaming),
// /v1/models, /health, /metrics. A thin adapter over the Router.
#pragma once

#include <memory>
#include <string>
#include <thread>

#include "absl/status/statusor.h"
#include "router.h"

namespace httplib { class Server; }

namespace sala::router {

class HttpFront {
 public:
  static absl::StatusOr<std::unique_ptr<HttpFront>> Start(Router& router, const std::string& host, int port,
                                                          int threads);
  ~HttpFront();

 private:
  explicit HttpFront(Router& router);
  void Routes();
  Router& router_;
  std::unique_ptr<httplib::Server> server_;
  std::thread thread_;
};

}  // namespace sala::router

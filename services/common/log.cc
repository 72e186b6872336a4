#include "log.h"

#include <chrono>
#include <cstdio>
#include <mutex>

#include "nlohmann/json.hpp"

namespace sala::service {
namespace {

std::mutex mu;
std::string service_name = "sala", worker = "";

}  // namespace

void SetLogService(const std::string& service, const std::string& worker_id) {
  std::lock_guard<std::mutex> lock(mu);
  service_name = service;
  worker = worker_id;
}

void Log(LogLevel level, const std::string& message, std::vector<std::pair<std::string, std::string>> fields) {
  static const char* kNames[] = {"debug", "info", "warning", "error"};
  const double ts = std::chrono::duration<double>(std::chrono::system_clock::now().time_since_epoch()).count();
  nlohmann::json j = {{"ts", ts}, {"level", kNames[int(level)]}, {"msg", message}};
  std::lock_guard<std::mutex> lock(mu);
  j["service"] = service_name;
  if (!worker.empty()) j["worker"] = worker;
  for (auto& [k, v] : fields) j[k] = std::move(v);
  const std::string line = j.dump(-1, ' ', false, nlohmann::json::error_handler_t::replace) + "\n";
  std::fwrite(line.data(), 1, line.size(), stderr);
  std::fflush(stderr);
}

}  // namespace sala::service

// Structured logs: one JSON object per line on stderr, with the service name and, where there
// is one, the request id.
#pragma once

#include <string>
#include <utility>
#include <vector>

namespace sala::service {

enum class LogLevel { kDebug, kInfo, kWarning, kError };

void SetLogService(const std::string& service, const std::string& worker_id);
void Log(LogLevel level, const std::string& message,
         std::vector<std::pair<std::string, std::string>> fields = {});
inline void LogInfo(const std::string& m, std::vector<std::pair<std::string, std::string>> f = {}) {
  Log(LogLevel::kInfo, m, std::move(f));
}
inline void LogWarning(const std::string& m, std::vector<std::pair<std::string, std::string>> f = {}) {
  Log(LogLevel::kWarning, m, std::move(f));
}
inline void LogError(const std::string& m, std::vector<std::pair<std::string, std::string>> f = {}) {
  Log(LogLevel::kError, m, std::move(f));
}

}  // namespace sala::service

// Early-return helpers for absl::Status / absl::StatusOr.
#pragma once

#include "absl/status/status.h"
#include "absl/status/statusor.h"

#define SALA_CONCAT_INNER(a, b) a##b
#define SALA_CONCAT(a, b) SALA_CONCAT_INNER(a, b)

#define SALA_RETURN_IF_ERROR(expr)                 \
  do {                                             \
    ::absl::Status sala_status_ = (expr);          \
    if (!sala_status_.ok()) return sala_status_;   \
  } while (0)

#define SALA_ASSIGN_OR_RETURN(lhs, expr) \
  SALA_ASSIGN_OR_RETURN_IMPL(SALA_CONCAT(sala_statusor_, __LINE__), lhs, expr)

#define SALA_ASSIGN_OR_RETURN_IMPL(tmp, lhs, expr) \
  auto tmp = (expr);                               \
  if (!tmp.ok()) return tmp.status();              \
  lhs = std::move(tmp).value()

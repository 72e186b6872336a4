// sala-client: command-line client of the router's gRPC API (sala.v1.Generation).
//   sala-client --address=127.0.0.1:50051 generate --prompt='Hello' [--json]
//   sala-client complete --token-ids=1,2,3 --greedy
//   sala-client cancel --request-id=ID | session --session-id=ID | models
// Errors print as {"error": {"code": ..., "message": ...}} on stderr, exit code 3.
#include <iostream>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "cli.h"
#include "google/protobuf/util/json_util.h"
#include "grpcpp/grpcpp.h"
#include "nlohmann/json.hpp"
#include "sala/v1/generate.grpc.pb.h"

ABSL_FLAG(std::string, address, "127.0.0.1:50051", "router gRPC address");
ABSL_FLAG(std::string, prompt, "", "prompt text");
ABSL_FLAG(std::string, chat, "", "one user message (ChatML)");
ABSL_FLAG(std::string, token_ids, "", "raw prompt token ids, comma-separated");
ABSL_FLAG(std::string, token_ids_file, "", "raw prompt token ids from this file, comma- or whitespace-separated ('-' = stdin)");
ABSL_FLAG(std::string, model, "", "model name (default: the cluster's)");
ABSL_FLAG(int, max_new_tokens, 128, "tokens to generate at most");
ABSL_FLAG(double, temperature, 0.9, "sampling temperature");
ABSL_FLAG(bool, greedy, false, "temperature 0");
ABSL_FLAG(int, top_k, 0, "top-k (0: off)");
ABSL_FLAG(double, top_p, 1.0, "top-p");
ABSL_FLAG(int64_t, seed, -1, "seed (-1: random)");
ABSL_FLAG(bool, ignore_eos, false, "do not stop at end-of-sequence tokens");
ABSL_FLAG(std::string, session_id, "", "continue this session");
ABSL_FLAG(bool, keep_session, false, "keep the session's state for a next turn");
ABSL_FLAG(std::string, request_id, "", "request id (for cancel)");
ABSL_FLAG(double, deadline, 0, "deadline in seconds (0: none)");
ABSL_FLAG(bool, json, false, "print every response message as a JSON line");

namespace {

using nlohmann::json;

int Fail(const grpc::Status& s) {
  static const char* kNames[] = {"OK", "CANCELLED", "UNKNOWN", "INVALID_ARGUMENT", "DEADLINE_EXCEEDED", "NOT_FOUND",
                                 "ALREADY_EXISTS", "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "FAILED_PRECONDITION",
                                 "ABORTED", "OUT_OF_RANGE", "UNIMPLEMENTED", "INTERNAL", "UNAVAILABLE", "DATA_LOSS",
                                 "UNAUTHENTICATED"};
  const int code = int(s.error_code());
  std::cerr << json{{"error", {{"code", code >= 0 && code <= 16 ? kNames[code] : "UNKNOWN"},
                               {"message", s.error_message()}}}}.dump() << "\n";
  return 3;
}

std::string ToJson(const google::protobuf::Message& m) {
  std::string out;
  google::protobuf::util::JsonPrintOptions o;
  o.preserve_proto_field_names = true;
  (void)google::protobuf::util::MessageToJsonString(m, &out, o);
  return out;
}

bool BuildRequest(sala::v1::GenerateRequest* r) {
  if (!absl::GetFlag(FLAGS_prompt).empty()) r->set_text(absl::GetFlag(FLAGS_prompt));
  else if (!absl::GetFlag(FLAGS_chat).empty()) {
    auto* m = r->mutable_chat()->add_messages();
    m->set_role("user");
    m->set_content(absl::GetFlag(FLAGS_chat));
  } else if (!absl::GetFlag(FLAGS_token_ids).empty() || !absl::GetFlag(FLAGS_token_ids_file).empty()) {
    auto text = absl::GetFlag(FLAGS_token_ids).empty() ? sala::tools::ReadFile(absl::GetFlag(FLAGS_token_ids_file))
                                                       : absl::StatusOr<std::string>(absl::GetFlag(FLAGS_token_ids));
    auto ids = text.ok() ? sala::tools::ParseIds(*text) : absl::StatusOr<std::vector<int>>(text.status());
    if (!ids.ok()) {
      std::cerr << ids.status().message() << "\n";
      return false;
    }
    for (int id : *ids) r->mutable_token_ids()->add_ids(id);
  } else {
    r->set_text("");  // the router answers INVALID_ARGUMENT
  }
  r->set_model(absl::GetFlag(FLAGS_model));
  auto* s = r->mutable_sampling();
  s->set_temperature(absl::GetFlag(FLAGS_greedy) ? 0.0 : absl::GetFlag(FLAGS_temperature));
  s->set_top_k(absl::GetFlag(FLAGS_top_k));
  s->set_top_p(absl::GetFlag(FLAGS_top_p));
  if (absl::GetFlag(FLAGS_seed) >= 0) s->set_seed(uint64_t(absl::GetFlag(FLAGS_seed)));
  s->set_max_new_tokens(absl::GetFlag(FLAGS_max_new_tokens));
  s->set_ignore_eos(absl::GetFlag(FLAGS_ignore_eos));
  r->set_session_id(absl::GetFlag(FLAGS_session_id));
  r->set_keep_session(absl::GetFlag(FLAGS_keep_session));
  r->set_request_id(absl::GetFlag(FLAGS_request_id));
  return true;
}

void SetDeadline(grpc::ClientContext* ctx) {
  if (absl::GetFlag(FLAGS_deadline) > 0)
    ctx->set_deadline(std::chrono::system_clock::now() +
                      std::chrono::milliseconds(int64_t(absl::GetFlag(FLAGS_deadline) * 1000)));
}

}  // namespace

int main(int argc, char** argv) {
  absl::SetProgramUsageMessage(
      "Client of the SALA router's gRPC API.\n"
      "  sala-client [flags] generate|complete|cancel|session|models\n"
      "  sala-client generate --prompt='Once upon a time' --max-new-tokens=32");
  sala::tools::AcceptDashedFlags(argc, argv);
  sala::tools::ListOwnFlagsInHelp();
  std::vector<char*> args = absl::ParseCommandLine(argc, argv);
  if (args.size() != 2) {
    std::cerr << "give one command: generate, complete, cancel, session, models (see --help)\n";
    return 2;
  }
  const std::string cmd = args[1];
  auto stub = sala::v1::Generation::NewStub(
      grpc::CreateChannel(absl::GetFlag(FLAGS_address), grpc::InsecureChannelCredentials()));
  grpc::ClientContext ctx;
  SetDeadline(&ctx);
  const bool as_json = absl::GetFlag(FLAGS_json);
  if (cmd == "generate") {
    sala::v1::GenerateRequest req;
    if (!BuildRequest(&req)) return 2;
    auto reader = stub->Generate(&ctx, req);
    sala::v1::GenerateResponse r;
    while (reader->Read(&r)) {
      if (as_json) std::cout << ToJson(r) << "\n" << std::flush;
      else if (r.has_delta()) std::cout << r.delta().text() << std::flush;
      else if (r.has_final())
        std::cerr << "\nprompt tokens: " << r.final().usage().prompt_tokens()
                  << " | generated: " << r.final().usage().generated_tokens()
                  << " | TTFT: " << r.final().timings().time_to_first_token_seconds() << " s\n";
    }
    grpc::Status s = reader->Finish();
    return s.ok() ? 0 : Fail(s);
  }
  if (cmd == "complete") {
    sala::v1::GenerateRequest req;
    if (!BuildRequest(&req)) return 2;
    sala::v1::CompleteResponse r;
    grpc::Status s = stub->Complete(&ctx, req, &r);
    if (!s.ok()) return Fail(s);
    std::cout << (as_json ? ToJson(r) : r.text()) << "\n";
    return 0;
  }
  if (cmd == "cancel") {
    sala::v1::CancelRequest req;
    req.set_request_id(absl::GetFlag(FLAGS_request_id));
    sala::v1::CancelResponse r;
    grpc::Status s = stub->Cancel(&ctx, req, &r);
    if (!s.ok()) return Fail(s);
    std::cout << ToJson(r) << "\n";
    return 0;
  }
  if (cmd == "session") {
    sala::v1::GetSessionRequest req;
    req.set_session_id(absl::GetFlag(FLAGS_session_id));
    sala::v1::Session r;
    grpc::Status s = stub->GetSession(&ctx, req, &r);
    if (!s.ok()) return Fail(s);
    std::cout << ToJson(r) << "\n";
    return 0;
  }
  if (cmd == "models") {
    sala::v1::ListModelsResponse r;
    grpc::Status s = stub->ListModels(&ctx, {}, &r);
    if (!s.ok()) return Fail(s);
    std::cout << ToJson(r) << "\n";
    return 0;
  }
  std::cerr << "unknown command '" << cmd << "'\n";
  return 2;
}

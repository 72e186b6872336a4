#include "http_front.h"

#include <condition_variable>
#include <deque>
#include <limits>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "httplib.h"
#include "metrics.h"
#include "nlohmann/json.hpp"
#include "process.h"
#include "status_map.h"

namespace sala::router {
namespace {

using nlohmann::json;

json ErrorBody(const absl::Status& s, const std::string& param = "") {
  return {{"error", {{"message", std::string(s.message())}, {"type", service::OpenAiErrorType(s.code())},
                     {"param", param.empty() ? json(nullptr) : json(param)},
                     {"code", service::CodeLabel(s.code())}}}};
}

void SendError(httplib::Response& res, const absl::Status& s, const std::string& param = "") {
  res.status = service::HttpStatusFor(s.code());
  res.set_content(ErrorBody(s, param).dump(), "application/json");
}

struct ParseError {
  absl::Status status;
  std::string param;
};

// A JSON integer that fits a token id's int32 (a larger one would wrap into some other id);
// whether the id is in the vocabulary is the engine's check.
bool IsTokenId(const json& j) {
  if (j.is_number_unsigned()) return j.get<uint64_t>() <= uint64_t(std::numeric_limits<int32_t>::max());
  return j.is_number_integer() && j.get<int64_t>() >= std::numeric_limits<int32_t>::min() &&
         j.get<int64_t>() <= std::numeric_limits<int32_t>::max();
}

// Reads an optional field of the wanted JSON type; a wrong type is a 400 naming the field.
template <typename T, typename Check>
std::optional<ParseError> Optional(const json& body, const char* key, Check is_type, const char* type_name,
                                   std::optional<T>* out) {
  auto it = body.find(key);
  if (it == body.end() || it->is_null()) return std::nullopt;
  if (!is_type(*it))
    return ParseError{absl::InvalidArgumentError(absl::StrCat("'", key, "' must be ", type_name)), key};
  *out = it->template get<T>();
  return std::nullopt;
}

struct OpenAiRequest {
  sala::v1::GenerateRequest request;
  bool stream = false;
  bool include_usage = false;
  bool chat = false;
};

// Fields shared by completions and chat completions.
std::optional<ParseError> ParseCommon(const json& body, OpenAiRequest* out) {
  auto is_num = [](const json& j) { return j.is_number(); };
  auto is_int = [](const json& j) { return j.is_number_integer(); };
  auto is_bool = [](const json& j) { return j.is_boolean(); };
  auto is_str = [](const json& j) { return j.is_string(); };
  sala::v1::GenerateRequest& r = out->request;
  std::optional<std::string> model, session_id;
  std::optional<double> temperature, top_p;
  std::optional<int64_t> max_tokens, max_completion_tokens, top_k, seed, n;
  std::optional<bool> stream, keep_session, ignore_eos;
  if (auto e = Optional(body, "model", is_str, "a string", &model)) return e;
  if (auto e = Optional(body, "temperature", is_num, "a number", &temperature)) return e;
  if (auto e = Optional(body, "top_p", is_num, "a number", &top_p)) return e;
  if (auto e = Optional(body, "top_k", is_int, "an integer", &top_k)) return e;
  if (auto e = Optional(body, "seed", is_int, "an integer", &seed)) return e;
  if (auto e = Optional(body, "n", is_int, "an integer", &n)) return e;
  if (auto e = Optional(body, "max_tokens", is_int, "an integer", &max_tokens)) return e;
  if (auto e = Optional(body, "max_completion_tokens", is_int, "an integer", &max_completion_tokens)) return e;
  if (auto e = Optional(body, "stream", is_bool, "true or false", &stream)) return e;
  if (auto e = Optional(body, "session_id", is_str, "a string", &session_id)) return e;
  if (auto e = Optional(body, "keep_session", is_bool, "true or false", &keep_session)) return e;
  if (auto e = Optional(body, "ignore_eos", is_bool, "true or false", &ignore_eos)) return e;
  if (n && *n != 1) return ParseError{absl::InvalidArgumentError("only n = 1 is supported"), "n"};
  if (body.contains("stop") && !body["stop"].is_null()) {
    const json& stop = body["stop"];
    auto bad = ParseError{absl::InvalidArgumentError("'stop' must be a string or a list of strings"), "stop"};
    if (stop.is_string()) {
      r.mutable_sampling()->add_stop_strings(stop.get<std::string>());
    } else if (stop.is_array()) {
      for (const json& s : stop) {
        if (!s.is_string()) return bad;
        r.mutable_sampling()->add_stop_strings(s.get<std::string>());
      }
    } else {
      return bad;
    }
  }
  if (body.contains("stop_token_ids")) {
    const json& ids = body["stop_token_ids"];
    if (!ids.is_array()) return ParseError{absl::InvalidArgumentError("'stop_token_ids' must be a list of token ids"), "stop_token_ids"};
    for (const json& id : ids) {
      if (!IsTokenId(id)) return ParseError{absl::InvalidArgumentError("'stop_token_ids' must be a list of token ids"), "stop_token_ids"};
      r.mutable_sampling()->add_stop_token_ids(id.get<int>());
    }
  }
  if (body.contains("stream_options") && !body["stream_options"].is_null()) {
    const json& so = body["stream_options"];
    if (!so.is_object()) return ParseError{absl::InvalidArgumentError("'stream_options' must be an object"), "stream_options"};
    std::optional<bool> usage;
    if (auto e = Optional(so, "include_usage", is_bool, "true or false", &usage)) return e;
    out->include_usage = usage.value_or(false);
  }
  if (model) r.set_model(*model);
  if (temperature) r.mutable_sampling()->set_temperature(*temperature);
  if (top_p) r.mutable_sampling()->set_top_p(*top_p);
  if (top_k) {
    if (*top_k < 0 || *top_k > (1 << 30)) return ParseError{absl::InvalidArgumentError("'top_k' must be >= 0"), "top_k"};
    r.mutable_sampling()->set_top_k(int(*top_k));
  }
  if (seed) r.mutable_sampling()->set_seed(uint64_t(*seed));
  const std::optional<int64_t> max_new = max_completion_tokens ? max_completion_tokens : max_tokens;
  if (max_new) {
    if (*max_new < 1 || *max_new > (1 << 30))
      return ParseError{absl::InvalidArgumentError("'max_tokens' must be at least 1"), "max_tokens"};
    r.mutable_sampling()->set_max_new_tokens(int(*max_new));
  } else {
    r.mutable_sampling()->set_max_new_tokens(out->chat ? 256 : 16);  // OpenAI's defaults
  }
  if (session_id) r.set_session_id(*session_id);
  if (keep_session) r.set_keep_session(*keep_session);
  if (ignore_eos) r.mutable_sampling()->set_ignore_eos(*ignore_eos);
  out->stream = stream.value_or(false);
  return std::nullopt;
}

std::optional<ParseError> ParseCompletion(const json& body, OpenAiRequest* out) {
  if (auto e = ParseCommon(body, out)) return e;
  if (!body.contains("prompt")) return ParseError{absl::InvalidArgumentError("'prompt' is required"), "prompt"};
  const json& p = body["prompt"];
  if (p.is_string()) {
    out->request.set_text(p.get<std::string>());
  } else if (p.is_array() && p.size() == 1 && p[0].is_string()) {
    out->request.set_text(p[0].get<std::string>());
  } else if (p.is_array() && !p.empty() && std::all_of(p.begin(), p.end(), IsTokenId)) {
    for (const json& x : p) out->request.mutable_token_ids()->add_ids(x.get<int>());
  } else {
    return ParseError{absl::InvalidArgumentError("'prompt' must be a string or a list of token ids"), "prompt"};
  }
  return std::nullopt;
}

std::optional<ParseError> ParseChat(const json& body, OpenAiRequest* out) {
  out->chat = true;
  if (auto e = ParseCommon(body, out)) return e;
  if (!body.contains("messages") || !body["messages"].is_array() || body["messages"].empty())
    return ParseError{absl::InvalidArgumentError("'messages' must be a non-empty list"), "messages"};
  auto* chat = out->request.mutable_chat();
  for (const json& m : body["messages"]) {
    if (!m.is_object() || !m.contains("role") || !m["role"].is_string() || !m.contains("content") ||
        !m["content"].is_string())
      return ParseError{absl::InvalidArgumentError("each message needs string 'role' and 'content'"), "messages"};
    auto* msg = chat->add_messages();
    msg->set_role(m["role"].get<std::string>());
    msg->set_content(m["content"].get<std::string>());
  }
  return std::nullopt;
}

const char* FinishName(sala::v1::FinishReason r) { return r == sala::v1::FINISH_REASON_STOP ? "stop" : "length"; }

json UsageJson(const sala::v1::GenerationFinal& f) {
  json u = {{"prompt_tokens", f.usage().prompt_tokens()},
            {"completion_tokens", f.usage().generated_tokens()},
            {"total_tokens", f.usage().prompt_tokens() + f.usage().generated_tokens()}};
  return u;
}

// Hands tokens from the generating thread to the HTTP response.
struct Exchange : ResponseSink {
  std::mutex mu;
  std::condition_variable cv;
  std::deque<std::string> texts;
  bool done = false, client_gone = false;
  absl::StatusOr<sala::v1::GenerationFinal> result = absl::UnknownError("not finished");
  bool OnDelta(const std::vector<int>&, const std::string& text) override {
    std::lock_guard<std::mutex> lock(mu);
    texts.push_back(text);
    cv.notify_all();
    return !client_gone;
  }
};

}  // namespace

HttpFront::HttpFront(Router& router) : router_(router), server_(std::make_unique<httplib::Server>()) {}

HttpFront::~HttpFront() {
  server_->stop();
  if (thread_.joinable()) thread_.join();
}

absl::StatusOr<std::unique_ptr<HttpFront>> HttpFront::Start(Router& router, const std::string& host, int port,
                                                            int threads) {
  std::unique_ptr<HttpFront> f(new HttpFront(router));
  f->server_->new_task_queue = [threads] { return new httplib::ThreadPool(size_t(threads)); };
  f->Routes();
  if (!f->server_->bind_to_port(host.c_str(), port))
    return absl::UnavailableError(absl::StrCat("cannot listen on ", host, ":", port, " (HTTP)"));
  f->thread_ = std::thread([s = f->server_.get()] { s->listen_after_bind(); });
  return f;
}

void HttpFront::Routes() {
  server_->Get("/health", [this](const httplib::Request&, httplib::Response& res) {
    const bool ready = !router_.Draining() && router_.Ready();
    res.status = ready ? 200 : 503;
    res.set_content(json{{"status", router_.Draining() ? "draining" : ready ? "ok" : "no workers"}}.dump(),
                    "application/json");
  });
  server_->Get("/metrics", [](const httplib::Request&, httplib::Response& res) {
    res.set_content(service::Metrics::Get().Text(), "text/plain; version=0.0.4");
  });
  server_->Get("/v1/models", [this](const httplib::Request&, httplib::Response& res) {
    json data = json::array();
    const sala::v1::ListModelsResponse models = router_.ListModels();
    for (const auto& m : models.models())
      data.push_back({{"id", m.name()}, {"object", "model"}, {"created", 0}, {"owned_by", "sala"},
                      {"max_model_len", m.max_context_tokens()}});
    res.set_content(json{{"object", "list"}, {"data", data}}.dump(), "application/json");
  });
  auto generate = [this](bool chat) {
    return [this, chat](const httplib::Request& req, httplib::Response& res) {
      json body = json::parse(req.body, nullptr, false);
      if (body.is_discarded() || !body.is_object())
        return SendError(res, absl::InvalidArgumentError("request body is not a JSON object"));
      OpenAiRequest r;
      if (auto e = chat ? ParseChat(body, &r) : ParseCompletion(body, &r)) return SendError(res, e->status, e->param);
      // Random, not the clock: the router refuses a second request with a running request's id,
      // and concurrent requests can arrive within one microsecond.
      const std::string id = service::RandomId(chat ? "chatcmpl-" : "cmpl-");
      r.request.set_request_id(id);
      const int64_t created = absl::ToUnixSeconds(absl::Now());
      const std::string model = router_.model_name();
      const char* object = chat ? "chat.completion" : "text_completion";

      if (!r.stream) {
        Exchange ex;
        auto final = router_.Generate(r.request, absl::InfiniteFuture(), ex);
        if (!final.ok()) return SendError(res, final.status());
        std::string text;
        for (auto& t : ex.texts) text += t;
        json choice = {{"index", 0}, {"finish_reason", FinishName(final->finish_reason())}, {"logprobs", nullptr}};
        if (chat) choice["message"] = {{"role", "assistant"}, {"content", text}};
        else choice["text"] = text;
        json out = {{"id", id}, {"object", object}, {"created", created}, {"model", model},
                    {"choices", json::array({choice})}, {"usage", UsageJson(*final)}};
        if (!final->session_id().empty()) out["session_id"] = final->session_id();
        return res.set_content(out.dump(), "application/json");
      }

      // Streaming: generate on a thread of its own; answer with an error status if the request
      // fails before its first token, else stream server-sent events.
      auto ex = std::make_shared<Exchange>();
      std::thread([this, ex, request = r.request] {
        auto result = router_.Generate(request, absl::InfiniteFuture(), *ex);
        std::lock_guard<std::mutex> lock(ex->mu);
        ex->result = std::move(result);
        ex->done = true;
        ex->cv.notify_all();
      }).detach();
      {
        std::unique_lock<std::mutex> lock(ex->mu);
        ex->cv.wait(lock, [&] { return ex->done || !ex->texts.empty(); });
        if (ex->done && !ex->result.ok()) return SendError(res, ex->result.status());
      }
      const std::string chunk_object = chat ? "chat.completion.chunk" : "text_completion";
      auto event = [=](json choice_delta, json finish) {
        json choice = {{"index", 0}, {"finish_reason", finish}, {"logprobs", nullptr}};
        if (chat) choice["delta"] = std::move(choice_delta);
        else choice["text"] = choice_delta;
        return json{{"id", id}, {"object", chunk_object}, {"created", created}, {"model", model},
                    {"choices", json::array({choice})}};
      };
      res.set_chunked_content_provider(
          "text/event-stream", [=, include_usage = r.include_usage](size_t, httplib::DataSink& sink) {
            auto send = [&](const json& j) {
              const std::string line = "data: " + j.dump(-1, ' ', false, json::error_handler_t::replace) + "\n\n";
              return sink.write(line.data(), line.size());
            };
            bool ok = true;
            if (chat) ok = send(event(json{{"role", "assistant"}, {"content", ""}}, nullptr));
            std::unique_lock<std::mutex> lock(ex->mu);
            for (;;) {
              ex->cv.wait(lock, [&] { return ex->done || !ex->texts.empty(); });
              while (!ex->texts.empty() && ok) {
                std::string text = std::move(ex->texts.front());
                ex->texts.pop_front();
                lock.unlock();
                if (!text.empty()) ok = send(chat ? event(json{{"content", text}}, nullptr) : event(text, nullptr));
                lock.lock();
              }
              if (!ok) {
                ex->client_gone = true;  // the router cancels at its next token
                return false;
              }
              if (ex->done && ex->texts.empty()) break;
            }
            if (!ex->result.ok()) {
              const std::string line = "data: " + ErrorBody(ex->result.status()).dump() + "\n\n";
              sink.write(line.data(), line.size());
            } else {
              const auto& f = *ex->result;
              send(chat ? event(json::object(), FinishName(f.finish_reason())) : event("", FinishName(f.finish_reason())));
              if (include_usage)
                send({{"id", id}, {"object", chunk_object}, {"created", created}, {"model", model},
                      {"choices", json::array()}, {"usage", UsageJson(f)}});
            }
            const std::string done = "data: [DONE]\n\n";
            sink.write(done.data(), done.size());
            sink.done();
            return true;
          });
    };
  };
  server_->Post("/v1/completions", generate(false));
  server_->Post("/v1/chat/completions", generate(true));
  server_->set_error_handler([](const httplib::Request&, httplib::Response& res) {
    if (!res.body.empty()) return;
    const absl::Status s = res.status == 404 ? absl::NotFoundError("no such endpoint")
                                             : absl::InvalidArgumentError("bad request");
    res.set_content(ErrorBody(s).dump(), "application/json");
  });
}

}  // namespace sala::router

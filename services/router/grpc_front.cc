#include "grpc_front.h"

#include "absl/time/clock.h"
#include "status_map.h"

namespace sala::router {
namespace {

absl::Time DeadlineOf(const grpc::ServerContext* context) { return absl::FromChrono(context->deadline()); }

class StreamSink final : public ResponseSink {
 public:
  StreamSink(grpc::ServerContext* context, grpc::ServerWriter<sala::v1::GenerateResponse>* writer)
      : context_(context), writer_(writer) {}
  bool OnDelta(const std::vector<int>& ids, const std::string& text) override {
    if (context_->IsCancelled()) return false;
    sala::v1::GenerateResponse r;
    r.mutable_delta()->mutable_token_ids()->Add(ids.begin(), ids.end());
    r.mutable_delta()->set_text(text);
    return writer_->Write(r);
  }

 private:
  grpc::ServerContext* context_;
  grpc::ServerWriter<sala::v1::GenerateResponse>* writer_;
};

class CollectSink final : public ResponseSink {
 public:
  explicit CollectSink(grpc::ServerContext* context, sala::v1::CompleteResponse* response)
      : context_(context), response_(response) {}
  bool OnDelta(const std::vector<int>& ids, const std::string& text) override {
    response_->mutable_token_ids()->Add(ids.begin(), ids.end());
    response_->mutable_text()->append(text);
    return !context_->IsCancelled();
  }

 private:
  grpc::ServerContext* context_;
  sala::v1::CompleteResponse* response_;
};

}  // namespace

grpc::Status GrpcFront::Generate(grpc::ServerContext* context, const sala::v1::GenerateRequest* request,
                                 grpc::ServerWriter<sala::v1::GenerateResponse>* writer) {
  StreamSink sink(context, writer);
  auto final = router_.Generate(*request, DeadlineOf(context), sink);
  if (!final.ok()) return service::ToGrpcStatus(final.status());
  sala::v1::GenerateResponse r;
  *r.mutable_final() = *final;
  writer->Write(r);
  return grpc::Status::OK;
}

grpc::Status GrpcFront::Complete(grpc::ServerContext* context, const sala::v1::GenerateRequest* request,
                                 sala::v1::CompleteResponse* response) {
  CollectSink sink(context, response);
  auto final = router_.Generate(*request, DeadlineOf(context), sink);
  if (!final.ok()) return service::ToGrpcStatus(final.status());
  *response->mutable_final() = *final;
  return grpc::Status::OK;
}

grpc::Status GrpcFront::Cancel(grpc::ServerContext*, const sala::v1::CancelRequest* request,
                               sala::v1::CancelResponse* response) {
  if (request->request_id().empty()) return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "request_id is empty");
  response->set_cancelled(router_.Cancel(request->request_id()));
  return grpc::Status::OK;
}

grpc::Status GrpcFront::GetSession(grpc::ServerContext*, const sala::v1::GetSessionRequest* request,
                                   sala::v1::Session* session) {
  auto s = router_.GetSession(request->session_id());
  if (!s.ok()) return service::ToGrpcStatus(s.status());
  *session = *s;
  return grpc::Status::OK;
}

grpc::Status GrpcFront::ListModels(grpc::ServerContext*, const sala::v1::ListModelsRequest*,
                                   sala::v1::ListModelsResponse* response) {
  *response = router_.ListModels();
  return grpc::Status::OK;
}

}  // namespace sala::router

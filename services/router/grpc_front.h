// The public gRPC service: a thin adapter from sala.v1.Generation to the Router.
#pragma once

#include "router.h"
#include "sala/v1/generate.grpc.pb.h"

namespace sala::router {

class GrpcFront final : public sala::v1::Generation::Service {
 public:
  explicit GrpcFront(Router& router) : router_(router) {}

  grpc::Status Generate(grpc::ServerContext* context, const sala::v1::GenerateRequest* request,
                        grpc::ServerWriter<sala::v1::GenerateResponse>* writer) override;
  grpc::Status Complete(grpc::ServerContext* context, const sala::v1::GenerateRequest* request,
                        sala::v1::CompleteResponse* response) override;
  grpc::Status Cancel(grpc::ServerContext* context, const sala::v1::CancelRequest* request,
                      sala::v1::CancelResponse* response) override;
  grpc::Status GetSession(grpc::ServerContext* context, const sala::v1::GetSessionRequest* request,
                          sala::v1::Session* session) override;
  grpc::Status ListModels(grpc::ServerContext* context, const sala::v1::ListModelsRequest* request,
                          sala::v1::ListModelsResponse* response) override;

 private:
  Router& router_;
};

}  // namespace sala::router

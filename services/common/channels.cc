#include "channels.h"

#include <map>
#include <mutex>

#include "grpcpp/create_channel.h"
#include "grpcpp/security/credentials.h"
#include "grpcpp/support/channel_arguments.h"

namespace sala::service {
namespace {

std::mutex mu;
std::map<std::string, std::shared_ptr<grpc::Channel>>& Channels() {
  static auto* channels = new std::map<std::string, std::shared_ptr<grpc::Channel>>();
  return *channels;
}

}  // namespace

std::shared_ptr<grpc::Channel> SharedChannel(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu);
  auto& c = Channels()[address];
  if (!c) {
    grpc::ChannelArguments args;
    args.SetMaxReceiveMessageSize(64 << 20);
    // Notice a dead peer quickly (kill -9 leaves no FIN on some paths).
    args.SetInt(GRPC_ARG_KEEPALIVE_TIME_MS, 2000);
    args.SetInt(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 2000);
    args.SetInt(GRPC_ARG_KEEPALIVE_PERMIT_WITHOUT_CALLS, 1);
    args.SetInt(GRPC_ARG_INITIAL_RECONNECT_BACKOFF_MS, 100);
    args.SetInt(GRPC_ARG_MAX_RECONNECT_BACKOFF_MS, 1000);
    c = grpc::CreateCustomChannel(address, grpc::InsecureChannelCredentials(), args);
  }
  return c;
}

void DropChannel(const std::string& address) {
  std::lock_guard<std::mutex> lock(mu);
  Channels().erase(address);
}

}  // namespace sala::service

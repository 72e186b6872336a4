#include "grpc_state_transport.h"

#include <condition_variable>
#include <deque>
#include <mutex>
#include <thread>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "channels.h"
#include "sala/status_macros.h"
#include "grpcpp/grpcpp.h"
#include "sala/v1/worker.grpc.pb.h"
#include "status_map.h"

namespace sala::service {
namespace {

// gRPC messages stay well below the default 4 MiB limit.
constexpr size_t kMaxChunkBytes = 1 << 20;

class GrpcStateSender final : public StateSender {
 public:
  GrpcStateSender(const std::string& target, const std::string& session_id, absl::Time deadline)
      : session_id_(session_id) {
    context_.set_deadline(absl::ToChronoTime(deadline));
    stub_ = sala::v1::DecodeWorker::NewStub(SharedChannel(target));
    writer_ = stub_->TransferState(&context_, &ack_);
    thread_ = std::thread([this] { WriteLoop(); });
  }

  ~GrpcStateSender() override {
    {
      std::lock_guard<std::mutex> lock(mu_);
      if (!finished_) {
        context_.TryCancel();
        failed_ = true;
      }
      closing_ = true;
    }
    cv_.notify_all();
    thread_.join();
  }

  absl::Status Send(std::string_view bytes) override { return Enqueue(bytes, false, 0); }

  absl::Status Finish(std::string_view last_bytes, int first_token) override {
    SALA_RETURN_IF_ERROR(Enqueue(last_bytes, true, first_token));
    std::unique_lock<std::mutex> lock(mu_);
    cv_.wait(lock, [this] { return (queue_.empty() && !writing_) || failed_; });
    if (failed_) return error_;
    lock.unlock();
    writer_->WritesDone();
    grpc::Status status = writer_->Finish();
    lock.lock();
    finished_ = true;
    if (!status.ok()) return FromGrpcStatus(status);
    return absl::OkStatus();
  }

  void Abort(const std::string& reason) override {
    std::lock_guard<std::mutex> lock(mu_);
    if (!failed_) error_ = absl::CancelledError(reason);
    failed_ = true;
    context_.TryCancel();
    cv_.notify_all();
  }

  int64_t bytes_sent() const override { return bytes_; }

 private:
  absl::Status Enqueue(std::string_view bytes, bool last, int first_token) {
    std::lock_guard<std::mutex> lock(mu_);
    if (failed_) return error_;
    // Split into messages; the first carries the session id, the last the commit.
    size_t pos = 0;
    do {
      sala::v1::StateChunk chunk;
      if (!sent_first_) chunk.set_session_id(session_id_);
      sent_first_ = true;
      const size_t n = std::min(kMaxChunkBytes, bytes.size() - pos);
      chunk.set_data(std::string(bytes.substr(pos, n)));
      pos += n;
      if (last && pos == bytes.size()) {
        chunk.set_last(true);
        chunk.set_first_token(first_token);
      }
      queue_.push_back(std::move(chunk));
    } while (pos < bytes.size());
    bytes_ += int64_t(bytes.size());
    cv_.notify_all();
    return absl::OkStatus();
  }

  void WriteLoop() {
    std::unique_lock<std::mutex> lock(mu_);
    for (;;) {
      cv_.wait(lock, [this] { return !queue_.empty() || closing_ || failed_; });
      if (failed_ || (closing_ && queue_.empty())) break;
      sala::v1::StateChunk chunk = std::move(queue_.front());
      queue_.pop_front();
      writing_ = true;
      lock.unlock();
      const bool ok = writer_->Write(chunk);
      lock.lock();
      writing_ = false;
      if (!ok) {
        // The stream broke: learn why from Finish.
        lock.unlock();
        grpc::Status status = writer_->Finish();
        lock.lock();
        finished_ = true;
        failed_ = true;
        error_ = status.ok() ? absl::UnavailableError("state stream closed by the decode worker")
                             : absl::Status(FromGrpcStatus(status).code(),
                                            absl::StrCat("state transfer: ", status.error_message()));
      }
      cv_.notify_all();
    }
  }

  std::string session_id_;
  grpc::ClientContext context_;
  sala::v1::TransferAck ack_;
  std::unique_ptr<sala::v1::DecodeWorker::Stub> stub_;
  std::unique_ptr<grpc::ClientWriter<sala::v1::StateChunk>> writer_;
  std::mutex mu_;
  std::condition_variable cv_;
  std::deque<sala::v1::StateChunk> queue_;
  bool sent_first_ = false, writing_ = false, closing_ = false, failed_ = false, finished_ = false;
  absl::Status error_ = absl::UnavailableError("state transfer failed");
  std::atomic<int64_t> bytes_{0};
  std::thread thread_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<StateSender>> GrpcStateTransport::Open(const std::string& target,
                                                                     const std::string& session_id,
                                                                     absl::Time deadline) {
  return std::unique_ptr<StateSender>(new GrpcStateSender(target, session_id, deadline));
}

}  // namespace sala::service

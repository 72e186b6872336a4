#include "grpc_state_transport.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "channels.h"
#include "sala/state_serialization.h"
#include "sala/status_macros.h"
#include "status_map.h"

namespace sala::service {

StateStream::StateStream(const std::string& target, absl::Time deadline) {
  context_.set_deadline(absl::ToChronoTime(deadline));
  stub_ = sala::v1::DecodeWorker::NewStub(SharedChannel(target));
  writer_ = stub_->TransferState(&context_, &ack_);
  thread_ = std::thread([this] { WriteLoop(); });
}

StateStream::~StateStream() {
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

absl::Status StateStream::Write(sala::v1::StateChunk chunk) {
  std::lock_guard<std::mutex> lock(mu_);
  if (failed_) return error_;
  queue_.push_back(std::move(chunk));
  cv_.notify_all();
  return absl::OkStatus();
}

absl::Status StateStream::Finish() {
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

void StateStream::Cancel(const std::string& reason) {
  std::lock_guard<std::mutex> lock(mu_);
  if (!failed_) error_ = absl::CancelledError(reason);
  failed_ = true;
  context_.TryCancel();
  cv_.notify_all();
}

bool StateStream::failed() const {
  std::lock_guard<std::mutex> lock(mu_);
  return failed_;
}

void StateStream::WriteLoop() {
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

namespace {

// gRPC messages stay well below the default 4 MiB limit.
constexpr size_t kMaxChunkBytes = 1 << 20;

class GrpcStateSender final : public StateSender {
 public:
  GrpcStateSender(Engine& engine, const std::string& target, const std::string& session_id,
                  int64_t expected_tokens, absl::Time deadline)
      : engine_(engine),
        session_id_(session_id),
        // K/V travel in the type the backend keeps them: bf16 from the GPU, fp32 from the CPU.
        writer_(engine.config(), expected_tokens, engine.backend().name() == "cuda" ? DType::kBF16 : DType::kF32),
        header_(writer_.Header()),
        stream_(target, deadline) {}

  absl::Status SendProgress(SequenceState& state) override {
    SALA_RETURN_IF_ERROR(engine_.SyncToHost(state, /*linear=*/false));
    // Separate statements: the stream's checksum covers the pieces in the order they are made.
    std::string bytes = std::exchange(header_, {});
    bytes += writer_.SparseDelta(state, /*final=*/false);
    return Enqueue(bytes, false, 0);
  }

  absl::Status Finish(SequenceState& state, int first_token) override {
    if (absl::Status s = engine_.SyncToHost(state, /*linear=*/true); !s.ok()) {
      Abort(std::string(s.message()));
      return s;
    }
    std::string last = std::exchange(header_, {});
    last += writer_.SparseDelta(state, /*final=*/true);
    last += writer_.LinearStates(state);
    last += writer_.Commit(state);
    SALA_RETURN_IF_ERROR(Enqueue(last, true, first_token));
    return stream_.Finish();
  }

  void Abort(const std::string& reason) override { stream_.Cancel(reason); }
  int64_t bytes_sent() const override { return bytes_; }
  const char* kind() const override { return "grpc"; }

 private:
  absl::Status Enqueue(std::string_view bytes, bool last, int first_token) {
    // Split into messages; the first carries the session id, the last the commit.
    size_t pos = 0;
    do {
      sala::v1::StateChunk chunk;
      if (bytes_ == 0 && pos == 0) chunk.set_session_id(session_id_);
      const size_t n = std::min(kMaxChunkBytes, bytes.size() - pos);
      chunk.set_data(std::string(bytes.substr(pos, n)));
      pos += n;
      if (last && pos == bytes.size()) {
        chunk.set_last(true);
        chunk.set_first_token(first_token);
      }
      SALA_RETURN_IF_ERROR(stream_.Write(std::move(chunk)));
    } while (pos < bytes.size());
    bytes_ += int64_t(bytes.size());
    return absl::OkStatus();
  }

  Engine& engine_;
  const std::string session_id_;
  StateWriter writer_;
  std::string header_;  // goes out with the first rows
  int64_t bytes_ = 0;
  StateStream stream_;  // last: its writer thread stops before the rest goes
};

}  // namespace

absl::StatusOr<std::unique_ptr<StateSender>> GrpcStateTransport::Open(const std::string& target,
                                                                     const std::string& session_id,
                                                                     int64_t expected_tokens, absl::Time deadline) {
  return std::unique_ptr<StateSender>(new GrpcStateSender(engine_, target, session_id, expected_tokens, deadline));
}

}  // namespace sala::service

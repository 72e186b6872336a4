// sala-nccl-bandwidth: the floor for state transfers between two GPUs of this host. Measures
// NCCL's own send/recv (one process, ncclCommInitAll over GPUs 0 and 1) at the sizes a state
// transfer uses, and the same bytes through the transport's two links: sala::NcclLink (two
// ranks joined through a unique id) and sala::CopyLink (copy engines through the decode GPU's
// staging ring, as a decode worker offers it), so that each link's overhead shows separately
// from the cluster's. Then, through each link, a prefill chunk's shape (its sparse KV as 4 MiB
// spans or as one message), alone and while bf16 GEMMs of the prefill's size keep GPU 0 busy:
// the transfer runs beside prefill in the cluster, and this separates the two costs.
// Prints JSON.
//
//   sala-nccl-bandwidth --total_gib=8 --out=nccl.json
#include <cuda_runtime.h>
#include <nccl.h>

#include <algorithm>
#include <atomic>
#include <fstream>
#include <functional>
#include <future>
#include <iostream>
#include <vector>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/time/clock.h"
#include "bench_timing.h"
#include "cli.h"
#include "cuda/gemm.h"
#include "nlohmann/json.hpp"
#include "sala/copy_link.h"
#include "sala/nccl_link.h"

ABSL_FLAG(double, total_gib, 8, "bytes moved per measurement, GiB (a 1M-token state is 8 GiB)");
ABSL_FLAG(int, repeats, 3, "measurements per size; the median is reported");
ABSL_FLAG(std::string, out, "", "write the JSON here as well");

namespace {

#define CHECK_CUDA(x)                                                                  \
  do {                                                                                 \
    if (cudaError_t e = (x); e != cudaSuccess) {                                       \
      std::cerr << #x << ": " << cudaGetErrorString(e) << "\n";                        \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)
#define CHECK_NCCL(x)                                                                  \
  do {                                                                                 \
    if (ncclResult_t r = (x); r != ncclSuccess) {                                      \
      std::cerr << #x << ": " << ncclGetErrorString(r) << "\n";                        \
      std::exit(1);                                                                    \
    }                                                                                  \
  } while (0)

using sala::bench::Median;

}  // namespace

int main(int argc, char** argv) {
  sala::tools::ListOwnFlagsInHelp();
  absl::SetProgramUsageMessage("NCCL send/recv bandwidth between GPUs 0 and 1, raw and through the transport's links");
  absl::ParseCommandLine(argc, argv);
  int n = 0;
  CHECK_CUDA(cudaGetDeviceCount(&n));
  if (n < 2) {
    std::cerr << "needs two GPUs, found " << n << "\n";
    return 2;
  }
  const size_t total = size_t(absl::GetFlag(FLAGS_total_gib) * double(1ull << 30));
  // 64 MiB is one 8K-token chunk of the 9B shape's sparse KV; 1 GiB a whole layer's K at 1M.
  const std::vector<size_t> sizes = {size_t(64) << 20, size_t(256) << 20, size_t(1) << 30};
  const size_t biggest = sizes.back();
  void *src = nullptr, *dst = nullptr;
  CHECK_CUDA(cudaSetDevice(0));
  CHECK_CUDA(cudaMalloc(&src, biggest));
  CHECK_CUDA(cudaMemset(src, 1, biggest));
  CHECK_CUDA(cudaSetDevice(1));
  CHECK_CUDA(cudaMalloc(&dst, biggest));

  nlohmann::json out;
  cudaDeviceProp prop;
  CHECK_CUDA(cudaGetDeviceProperties(&prop, 0));
  out["gpu"] = prop.name;
  int version = 0;
  ncclGetVersion(&version);
  out["nccl_version"] = version;
  out["total_bytes"] = total;

  // Raw NCCL: both ranks driven from this thread inside one group per message.
  ncclComm_t comms[2];
  const int devs[2] = {0, 1};
  CHECK_NCCL(ncclCommInitAll(comms, 2, devs));
  cudaStream_t streams[2];
  for (int d = 0; d < 2; ++d) {
    CHECK_CUDA(cudaSetDevice(d));
    CHECK_CUDA(cudaStreamCreateWithFlags(&streams[d], cudaStreamNonBlocking));
  }
  auto raw_pass = [&](size_t message) {
    CHECK_NCCL(ncclGroupStart());
    for (size_t done = 0; done < total; done += message) {
      CHECK_NCCL(ncclSend(src, message, ncclInt8, 1, comms[0], streams[0]));
      CHECK_NCCL(ncclRecv(dst, message, ncclInt8, 0, comms[1], streams[1]));
    }
    CHECK_NCCL(ncclGroupEnd());
    for (int d = 0; d < 2; ++d) {
      CHECK_CUDA(cudaSetDevice(d));
      CHECK_CUDA(cudaStreamSynchronize(streams[d]));
    }
  };
  // Through the transport's link: rank 0 on GPU 0, rank 1 on GPU 1, joined like two workers.
  auto id = sala::NcclLink::NewUniqueId();
  if (!id.ok()) {
    std::cerr << id.status() << "\n";
    return 1;
  }
  auto join = [&](int rank) {
    CHECK_CUDA(cudaSetDevice(rank));
    auto link = sala::NcclLink::Join(*id, rank);
    if (!link.ok() || !(*link)->WaitReady(absl::Now() + absl::Seconds(60)).ok()) {
      std::cerr << "NcclLink join failed\n";
      std::exit(1);
    }
    return std::move(*link);
  };
  struct Pair {
    const char* name;
    std::unique_ptr<sala::DeviceLink> sender, receiver;
  };
  std::vector<Pair> links;
  {
    auto receiver_future = std::async(std::launch::async, join, 1);
    auto sender = join(0);
    links.push_back({"nccl_link", std::move(sender), receiver_future.get()});
  }
  {
    // The decode worker's default ring: 8 slots of 16 MiB.
    CHECK_CUDA(cudaSetDevice(1));
    auto listening = sala::CopyLink::Listen(int64_t(16) << 20, 8);
    CHECK_CUDA(cudaSetDevice(0));
    auto sender = listening.ok() ? sala::CopyLink::Connect(listening->second)
                                 : absl::StatusOr<std::unique_ptr<sala::DeviceLink>>(listening.status());
    if (!sender.ok()) {
      std::cerr << "CopyLink: " << sender.status() << "\n";
      return 1;
    }
    links.push_back({"copy_link", std::move(*sender), std::move(listening->first)});
  }
  auto link_pass = [&](Pair& link, size_t message) {
    // Receives first, as a decode worker posts them when the descriptor arrives.
    for (size_t done = 0; done < total; done += message) {
      const sala::DeviceSpan in{dst, message}, out_span{src, message};
      CHECK_CUDA(cudaSetDevice(1));
      if (!link.receiver->Recv({&in, 1}).ok()) std::exit(1);
      CHECK_CUDA(cudaSetDevice(0));
      if (!link.sender->Send({&out_span, 1}).ok()) std::exit(1);
    }
    const absl::Time deadline = absl::Now() + absl::Seconds(120);
    if (!link.sender->Wait(deadline).ok() || !link.receiver->Wait(deadline).ok()) std::exit(1);
  };

  for (size_t message : sizes) {
    raw_pass(message);  // warm-up
    for (Pair& link : links) link_pass(link, message);
    std::vector<double> raw, nccl_link, copy_link;
    for (int r = 0; r < absl::GetFlag(FLAGS_repeats); ++r) {
      absl::Time t0 = absl::Now();
      raw_pass(message);
      raw.push_back(double(total) / absl::ToDoubleSeconds(absl::Now() - t0) / 1e9);
      for (Pair& link : links) {
        t0 = absl::Now();
        link_pass(link, message);
        (&link == &links[0] ? nccl_link : copy_link).push_back(double(total) / absl::ToDoubleSeconds(absl::Now() - t0) / 1e9);
      }
    }
    out["sizes"].push_back({{"message_bytes", message},
                            {"nccl_send_recv_gb_per_s", Median(raw)},
                            {"sala_nccl_link_gb_per_s", Median(nccl_link)},
                            {"sala_copy_link_gb_per_s", Median(copy_link)}});
  }
  // A chunk of the 9B shape: 8 sparse layers' K and V rows of 8192 tokens, 4 MiB each.
  const size_t chunk_bytes = size_t(64) << 20, span_bytes = size_t(4) << 20;
  auto chunk_pass = [&](Pair& link, size_t pieces) {
    const size_t piece = chunk_bytes / pieces;
    for (size_t done = 0; done < total; done += chunk_bytes) {
      std::vector<sala::DeviceSpan> in, out_spans;
      for (size_t p = 0; p < pieces; ++p) {
        in.push_back({static_cast<char*>(dst) + p * piece, piece});
        out_spans.push_back({static_cast<char*>(src) + p * piece, piece});
      }
      CHECK_CUDA(cudaSetDevice(1));
      if (!link.receiver->Recv(in).ok()) std::exit(1);
      CHECK_CUDA(cudaSetDevice(0));
      if (!link.sender->Send(out_spans).ok()) std::exit(1);
    }
    const absl::Time deadline = absl::Now() + absl::Seconds(300);
    if (!link.sender->Wait(deadline).ok() || !link.receiver->Wait(deadline).ok()) std::exit(1);
  };
  auto rate = [&](const std::function<void()>& pass) {
    std::vector<double> r;
    for (int i = 0; i < absl::GetFlag(FLAGS_repeats); ++i) {
      const absl::Time t0 = absl::Now();
      pass();
      r.push_back(double(total) / absl::ToDoubleSeconds(absl::Now() - t0) / 1e9);
    }
    return Median(r);
  };
  // GPU 0 busy with the prefill's largest GEMM (8192 x 4096 -> 16384, bf16) until stopped, on a
  // stream of its own: the link orders its sends after the default stream's work, as a prefill
  // worker sends a chunk once it is computed, and must not wait for these.
  std::atomic<bool> stop_gemms{false};
  auto gemm_load = [&] {
    CHECK_CUDA(cudaSetDevice(0));
    sala::cuda::Gemm gemm;
    if (!gemm.Init().ok()) std::exit(1);
    const int64_t rows = 8192, in = 4096, out_cols = 16384;
    __nv_bfloat16 *x = nullptr, *w = nullptr;
    float* y = nullptr;
    CHECK_CUDA(cudaMalloc(&x, rows * in * 2));
    CHECK_CUDA(cudaMalloc(&w, out_cols * in * 2));
    CHECK_CUDA(cudaMalloc(&y, rows * out_cols * 4));
    CHECK_CUDA(cudaMemset(x, 0, rows * in * 2));
    CHECK_CUDA(cudaMemset(w, 0, out_cols * in * 2));
    cudaStream_t stream;
    CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
    while (!stop_gemms) {
      for (int i = 0; i < 8; ++i)
        if (!gemm.Run(x, rows, in, w, out_cols, y, stream).ok()) std::exit(1);
      CHECK_CUDA(cudaStreamSynchronize(stream));
    }
    cudaStreamDestroy(stream);
    cudaFree(x);
    cudaFree(w);
    cudaFree(y);
  };
  nlohmann::json chunk;
  chunk["chunk_bytes"] = chunk_bytes;
  chunk["span_bytes"] = span_bytes;
  const size_t spans = chunk_bytes / span_bytes;
  for (Pair& link : links) {
    chunk_pass(link, spans);  // warm-up
    chunk[link.name]["spans_gb_per_s"] = rate([&] { chunk_pass(link, spans); });
    chunk[link.name]["one_message_gb_per_s"] = rate([&] { chunk_pass(link, 1); });
  }
  {
    auto load = std::async(std::launch::async, gemm_load);
    absl::SleepFor(absl::Milliseconds(200));
    for (Pair& link : links) {
      chunk[link.name]["spans_during_gemms_gb_per_s"] = rate([&] { chunk_pass(link, spans); });
      chunk[link.name]["one_message_during_gemms_gb_per_s"] = rate([&] { chunk_pass(link, 1); });
    }
    stop_gemms = true;
    load.get();
  }
  out["prefill_chunk"] = chunk;

  for (int d = 0; d < 2; ++d) ncclCommDestroy(comms[d]);
  const std::string text = out.dump(2);
  std::cout << text << "\n";
  if (const std::string path = absl::GetFlag(FLAGS_out); !path.empty()) std::ofstream(path) << text << "\n";
  return 0;
}

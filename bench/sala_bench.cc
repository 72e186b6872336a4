// sala-bench: the CUDA engine on a model shape (random weights drawn on the GPU), with the
// floors measured in the same run: the cuBLASLt bf16 GEMM rate at the model's shapes bounds
// prefill (measured twice: in short timings at the boost clock, and sustained, at the power
// limit where a long prefill runs), the device-copy bandwidth bounds decode.
//   sala-mkmodel --out=models/9b --preset=9b --config_only
//   sala-bench --model=models/9b --lengths=8192,32768 --out=bench/results/h100.json
#include <cuda_profiler_api.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <chrono>
#include <fstream>
#include <iostream>
#include <random>
#include <tuple>

#include "absl/flags/flag.h"
#include "absl/flags/parse.h"
#include "absl/flags/usage.h"
#include "absl/strings/match.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_split.h"
#include "bench_timing.h"
#include "cli.h"
#include "cuda/gemm.h"
#include "cuda/gemm_swiglu.h"
#include "cuda/lightning.h"
#include "cuda/ops.h"
#include "cuda/sparse.h"
#include "nlohmann/json.hpp"
#include "sala/engine.h"
#include "sala/safetensors.h"
#include "sala/weights.h"

ABSL_FLAG(std::string, model, "", "model directory (config.json is enough)");
ABSL_FLAG(uint64_t, seed, 1, "seed of the random weights");
ABSL_FLAG(std::string, lengths, "8192", "prompt lengths, comma-separated");
ABSL_FLAG(int, chunk_size, 0, "prefill chunk, tokens (0: the engine's choice, 8448 on an H100/H200)");
ABSL_FLAG(std::string, decode_batches, "1,8", "decode batch sizes");
ABSL_FLAG(bool, profile, true, "repeat each prefill with device-synchronised sections for the time split by kind");
ABSL_FLAG(int, decode_steps, 16, "timed decode steps per batch size");
ABSL_FLAG(bool, cuda_graphs, true, "replay decode steps from CUDA graphs (false: launch their kernels one by one)");
ABSL_FLAG(std::string, projection_rows, "1,2,4,8,16", "rows at which to time a layer's decode projections");
ABSL_FLAG(std::string, sparse_contexts, "131072",
          "contexts at which to time one sparse layer's prefill attention for the last chunk alone (empty: none)");
ABSL_FLAG(std::string, profiler_range, "decode",
          "what runs inside a profiler range for `ncu --profile-from-start off`: one decode step a "
          "batch size (decode) or the timed prefill of each length (prefill)");
ABSL_FLAG(double, sustained_gemm_seconds, 10,
          "how long to run the model's GEMMs back to back for the sustained (power-limited) GEMM rate (0: skip)");
ABSL_FLAG(double, mlp_seconds, 0,
          "how long to run the MLP's gate/up each way (cuBLASLt and a SwiGLU pass, or the fused kernel), "
          "alternating, at the power limit (0: skip)");
ABSL_FLAG(std::string, out, "", "write the results here as JSON");

namespace {

using Clock = std::chrono::steady_clock;
double Since(Clock::time_point t) { return std::chrono::duration<double>(Clock::now() - t).count(); }

using sala::bench::Median;
using sala::bench::MedianDeviceSeconds;

std::vector<int> Ints(const std::string& s) {
  std::vector<int> out;
  for (absl::string_view p : absl::StrSplit(s, ',', absl::SkipEmpty())) {
    int v;
    if (absl::SimpleAtoi(p, &v)) out.push_back(v);
  }
  return out;
}

// cuBLASLt bf16 GEMM rates over the layer shapes of the model at `rows` rows, TFLOP/s.
struct GemmRates {
  double burst = 0;      // each shape's median of ten calls: the GPU at its boost clock
  double sustained = 0;  // the shapes back to back for `hold_seconds`, over the second half
};

// A long prefill holds the GPU at its power limit, where the SM clock (and the GEMM rate) sits
// well below the boost clock that short timings see; `sustained` measures the GEMMs there.
GemmRates GemmRate(const sala::ModelConfig& c, int rows, double hold_seconds) {
  sala::cuda::Gemm gemm;
  if (!gemm.Init().ok()) return {};
  const int64_t d = c.hidden_size, ff = c.intermediate_size, qd = int64_t(c.num_heads) * c.head_dim;
  // (in, out, bf16 output): gate/up come out in bf16, as in the engine.
  const std::vector<std::tuple<int64_t, int64_t, bool>> shapes = {
      {d, qd, false}, {qd, d, false}, {d, ff, true}, {ff, d, false}};
  int64_t max_in = 0, max_out = 0;
  for (auto [in, out, bf16_out] : shapes) max_in = std::max(max_in, in), max_out = std::max(max_out, out);
  __nv_bfloat16 *x, *w;
  float* y;
  cudaMalloc(&x, rows * max_in * 2);
  cudaMalloc(&w, max_in * max_out * 2);
  cudaMalloc(&y, rows * max_out * 4);
  // Random operands: a GEMM over zeros runs faster than over real data.
  (void)sala::cuda::FillRandom(x, rows * max_in, 1, 1.0f, 0.0f, nullptr);
  (void)sala::cuda::FillRandom(w, max_in * max_out, 2, 0.02f, 0.0f, nullptr);
  double flops = 0, seconds = 0;
  auto weight_of = [&](int64_t out, bool bf16_out) {
    return sala::cuda::GemvWeight{w, out, bf16_out ? nullptr : y, false, 1.0f,
                                  bf16_out ? reinterpret_cast<__nv_bfloat16*>(y) : nullptr};
  };
  for (auto [in, out, bf16_out] : shapes) {
    flops += 2.0 * rows * in * out;
    const sala::cuda::GemvWeight weight = weight_of(out, bf16_out);
    seconds += MedianDeviceSeconds([&] { (void)gemm.RunLt(x, rows, in, weight, nullptr); }, /*warmup=*/3);
  }
  GemmRates rates{flops / seconds / 1e12, 0};
  if (hold_seconds > 0) {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    double held = 0, timed_flops = 0, timed = 0;
    while (held < hold_seconds) {
      cudaEventRecord(a);
      for (int rep = 0; rep < 16; ++rep)
        for (auto [in, out, bf16_out] : shapes) (void)gemm.RunLt(x, rows, in, weight_of(out, bf16_out), nullptr);
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      float ms = 0;
      cudaEventElapsedTime(&ms, a, b);
      held += ms / 1e3;
      if (held >= hold_seconds / 2) {
        timed += ms / 1e3;
        timed_flops += 16 * flops;
      }
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    rates.sustained = timed > 0 ? timed_flops / timed / 1e12 : 0;
  }
  cudaFree(x);
  cudaFree(w);
  cudaFree(y);
  return rates;
}

// The MLP's gate/up at `rows` rows two ways: two cuBLASLt GEMMs to bf16 and the SwiGLU pass
// (the engine's path off Hopper), and the fused kernel. Short timings, then, where `hold_seconds`
// > 0, the two alternating in rounds of about a second for that long each after as long a
// warm-up, so that both see the same power-limited clock. Seconds per call.
struct MlpGateUpTimes {
  double split = 0, fused = 0, split_sustained = 0, fused_sustained = 0;
};
MlpGateUpTimes MlpGateUp(const sala::ModelConfig& c, int rows, double hold_seconds) {
  const int64_t d = c.hidden_size, ff = c.intermediate_size;
  if (!sala::cuda::GemmSwiGluApplies(d, ff)) return {};
  sala::cuda::Gemm gemm;
  if (!gemm.Init().ok()) return {};
  __nv_bfloat16 *x, *wg, *wu, *g, *u, *y;
  cudaMalloc(&x, rows * d * 2);
  cudaMalloc(&wg, ff * d * 2);
  cudaMalloc(&wu, ff * d * 2);
  cudaMalloc(&g, rows * ff * 2);
  cudaMalloc(&u, rows * ff * 2);
  cudaMalloc(&y, rows * ff * 2);
  (void)sala::cuda::FillRandom(x, rows * d, 1, 1.0f, 0.0f, nullptr);
  (void)sala::cuda::FillRandom(wg, ff * d, 2, 0.02f, 0.0f, nullptr);
  (void)sala::cuda::FillRandom(wu, ff * d, 3, 0.02f, 0.0f, nullptr);
  auto split = [&] {
    (void)gemm.RunLt(x, rows, d, {wg, ff, nullptr, false, 1.0f, g}, nullptr);
    (void)gemm.RunLt(x, rows, d, {wu, ff, nullptr, false, 1.0f, u}, nullptr);
    (void)sala::cuda::SwiGluToBf16(g, u, rows * ff, y, nullptr);
  };
  auto fused = [&] { (void)sala::cuda::GemmSwiGlu(x, rows, d, wg, wu, ff, y, nullptr); };
  MlpGateUpTimes t{MedianDeviceSeconds(split, 3), MedianDeviceSeconds(fused, 3)};
  if (hold_seconds > 0) {
    cudaEvent_t a, b;
    cudaEventCreate(&a);
    cudaEventCreate(&b);
    // Seconds for `reps` calls of `run`.
    auto timed = [&](auto& run, int reps) {
      cudaEventRecord(a);
      for (int i = 0; i < reps; ++i) run();
      cudaEventRecord(b);
      cudaEventSynchronize(b);
      float ms = 0;
      cudaEventElapsedTime(&ms, a, b);
      return ms / 1e3;
    };
    const int reps = std::max(1, int(1.0 / std::max(t.split, 1e-6)));
    double held = 0, split_s = 0, fused_s = 0;
    int rounds = 0;
    while (held < 2 * hold_seconds) {
      const double s1 = timed(split, reps), s2 = timed(fused, reps);
      held += s1 + s2;
      if (held >= hold_seconds) {  // the first half warms the board up to its power limit
        split_s += s1;
        fused_s += s2;
        ++rounds;
      }
    }
    cudaEventDestroy(a);
    cudaEventDestroy(b);
    t.split_sustained = rounds ? split_s / (rounds * reps) : 0;
    t.fused_sustained = rounds ? fused_s / (rounds * reps) : 0;
  }
  for (void* ptr : {(void*)x, (void*)wg, (void*)wu, (void*)g, (void*)u, (void*)y}) cudaFree(ptr);
  return t;
}

// A decode step's projections of one layer at `rows` rows, grouped as the engine groups them
// (q/k/v/gate, o, gate/up, down), in bytes of weights read per second: through Gemm::RunMany
// (the GEMV where it applies) and through cuBLASLt alone. The layer's weights (about 0.5 GB)
// do not fit in L2.
std::pair<double, double> DecodeProjectionRates(const sala::ModelConfig& c, int rows) {
  sala::cuda::Gemm gemm;
  if (!gemm.Init().ok()) return {0, 0};
  const int64_t d = c.hidden_size, ff = c.intermediate_size, qd = int64_t(c.num_heads) * c.head_dim;
  const int64_t kvd = int64_t(c.num_kv_heads) * c.sparse_head_dim();
  struct Group {
    int64_t in;
    std::vector<int64_t> outs;
  };
  const std::vector<Group> groups = {{d, {qd, kvd, kvd, qd}}, {qd, {d}}, {d, {ff, ff}}, {ff, {d}}};
  int64_t weight_elems = 0, max_in = 0, max_out = 0;
  for (const Group& g : groups)
    for (int64_t o : g.outs) weight_elems += g.in * o, max_in = std::max(max_in, g.in), max_out = std::max(max_out, o);
  __nv_bfloat16 *x, *w;
  float* y;
  cudaMalloc(&x, rows * max_in * 2);
  cudaMalloc(&w, weight_elems * 2);
  cudaMalloc(&y, 4 * rows * max_out * 4);
  (void)sala::cuda::FillRandom(x, rows * max_in, 3, 1.0f, 0.0f, nullptr);
  (void)sala::cuda::FillRandom(w, weight_elems, 4, 0.02f, 0.0f, nullptr);
  auto layer = [&](bool lt) {
    int64_t at = 0;
    for (const Group& g : groups) {
      std::vector<sala::cuda::GemvWeight> ws;
      for (size_t i = 0; i < g.outs.size(); ++i) {
        ws.push_back({w + at, g.outs[i], y + i * rows * max_out});
        at += g.in * g.outs[i];
      }
      if (!lt) (void)gemm.RunMany(x, rows, g.in, ws, nullptr);
      else for (const auto& one : ws) (void)gemm.RunLt(x, rows, g.in, one, nullptr);
    }
  };
  auto rate = [&](bool lt) { return 2.0 * weight_elems / MedianDeviceSeconds([&] { layer(lt); }); };
  const std::pair<double, double> r{rate(false), rate(true)};
  cudaFree(x);
  cudaFree(w);
  cudaFree(y);
  return r;
}

// The lightning layers' chunked prefill kernel alone at the model's shapes: seconds for one
// prefill chunk of `tokens` (random f16 q/k and bf16 v as the engine passes them, the state
// carried in and out, the output in bf16), median of 10. bench/fla_compare.py times flash-linear-attention's
// chunk_simple_gla at the same shape.
double LightningChunkSeconds(const sala::ModelConfig& c, int64_t tokens) {
  const int H = c.num_heads, Hk = c.lightning_nkv, D = c.head_dim;
  const int64_t nq = tokens * H * D, nkv = tokens * Hk * D, ns = int64_t(H) * D * D;
  uint64_t x = 88172645463325252ull;
  auto next = [&](float scale) {  // xorshift: fast enough for 10^8 values
    x ^= x << 13, x ^= x >> 7, x ^= x << 17;
    return scale * (float(x >> 40) * 0x1.0p-24f - 0.5f);
  };
  auto upload_half = [&](__half* dst, int64_t n, float scale) {
    std::vector<__half> host(n);
    for (auto& e : host) e = __float2half_rn(next(scale));
    cudaMemcpy(dst, host.data(), n * 2, cudaMemcpyHostToDevice);
  };
  __half *q, *k;
  __nv_bfloat16 *v, *o;
  float *state, *slopes, *scratch = nullptr;
  cudaMalloc(&q, nq * 2);
  cudaMalloc(&k, nkv * 2);
  cudaMalloc(&v, nkv * 2);
  cudaMalloc(&o, nq * 2);
  cudaMalloc(&state, ns * 4);
  cudaMalloc(&slopes, H * 4);
  upload_half(q, nq, 2.0f);
  upload_half(k, nkv, 2.0f);
  {
    std::vector<__nv_bfloat16> host(nkv);
    for (auto& e : host) e = __float2bfloat16(next(2.0f));
    cudaMemcpy(v, host.data(), nkv * 2, cudaMemcpyHostToDevice);
  }
  {
    std::vector<float> host(ns);
    for (float& e : host) e = next(0.1f);
    cudaMemcpy(state, host.data(), ns * 4, cudaMemcpyHostToDevice);
  }
  std::vector<float> sl;
  for (double d : sala::LinearDecaySlopes(H)) sl.push_back(float(d));
  cudaMemcpy(slopes, sl.data(), H * 4, cudaMemcpyHostToDevice);
  const absl::StatusOr<int64_t> scratch_floats = sala::cuda::LinearAttentionScratchFloats(tokens, H, D);
  if (!scratch_floats.ok()) return 0;
  cudaMalloc(&scratch, std::max<int64_t>(*scratch_floats, 1) * 4);
  const float scale = float(c.linear_query_scale());
  auto run = [&] {
    return sala::cuda::LinearAttentionChunked(q, k, v, tokens, H, Hk, D, scale, slopes, state, o, scratch, nullptr);
  };
  double seconds = 0;
  if (run().ok() && run().ok())  // checked, and warm
    seconds = MedianDeviceSeconds([&] { (void)run(); }, /*warmup=*/0);
  for (void* p : std::initializer_list<void*>{q, k, v, o, state, slopes, scratch}) cudaFree(p);
  return seconds;
}

// One sparse layer's attention for the last prefill chunk of a `context`-token prompt, alone:
// stage 1 (block scores and top-k) and stage 2 (attention over the chosen blocks), seconds and
// the FLOPs each does on tensor cores (stage 1: q·k2 and q·k1 of the scored entries; stage 2:
// q·k and p·v over every selected key), medians of 10. K/V and q are random, so the chosen
// blocks are spread as with random weights.
struct SparseChunkTimes {
  double stage1_seconds = 0, stage1_flops = 0, stage2_seconds = 0, stage2_flops = 0;
};
SparseChunkTimes SparseChunk(const sala::ModelConfig& c, int64_t context, int64_t chunk) {
  namespace cu = sala::cuda;
  const sala::SparseConfig& sc = c.sparse;
  const int H = c.num_heads, Hk = c.num_kv_heads, D = c.sparse_head_dim(), G = H / Hk;
  const cu::SparseShape shape{H, Hk, D, sc.block_size, sc.kernel_size, sc.kernel_stride, sc.init_blocks,
                              sc.window_blocks(), sc.selected_blocks()};
  const int64_t L = (context + cu::kKvPageTokens - 1) / cu::kKvPageTokens * cu::kKvPageTokens;
  const int64_t T = std::min(chunk, context), first = context - T, row = int64_t(Hk) * D;
  const int64_t n1 = sala::SequenceState::NumK1(sc, context), n2 = sala::SequenceState::NumK2(sc, context);
  __nv_bfloat16 *k, *v, *k1, *k2, *q, *gate, *o;  // stage 2 writes o times sigmoid(gate), as in the engine
  int *pages, *blocks, *counts;
  cudaMalloc(&k, L * row * 2);
  cudaMalloc(&v, L * row * 2);
  cudaMalloc(&k1, std::max<int64_t>(n1, 1) * row * 2);
  cudaMalloc(&k2, std::max<int64_t>(n2, 1) * row * 2);
  cudaMalloc(&q, T * H * D * 2);
  cudaMalloc(&gate, T * H * D * 2);
  cudaMalloc(&o, T * H * D * 2);
  cudaMalloc(&pages, L / cu::kKvPageTokens * 4);
  cudaMalloc(&blocks, T * Hk * shape.selected_blocks * 4);
  cudaMalloc(&counts, T * Hk * 4);
  std::vector<int> table(L / cu::kKvPageTokens);
  for (size_t i = 0; i < table.size(); ++i) table[i] = int(i);  // one contiguous range per K and V
  cudaMemcpy(pages, table.data(), table.size() * 4, cudaMemcpyHostToDevice);
  std::vector<uint16_t> hq(T * H * D);  // bf16, as the projection gives q
  std::mt19937 rng(7);
  std::normal_distribution<float> normal;
  for (uint16_t& x : hq) x = sala::F32ToBf16(normal(rng));
  cudaMemcpy(q, hq.data(), hq.size() * 2, cudaMemcpyHostToDevice);
  const cu::SparseCacheView view{k, v, pages, cu::kKvPageTokens * row, k1, k2, int(table.size())};
  SparseChunkTimes r;
  cu::SparseScratch scratch;
  if (cu::FillRandom(k, L * row, 11, 1.0f, 0.0f, nullptr).ok() && cu::FillRandom(v, L * row, 12, 1.0f, 0.0f, nullptr).ok() &&
      cu::FillRandom(gate, T * H * D, 13, 1.0f, 0.0f, nullptr).ok() &&
      cu::CompressKeys(view, Hk, D, 0, n1, sc.kernel_size, sc.kernel_stride, k1, nullptr).ok() &&
      cu::CompressKeys(view, Hk, D, 0, n2, sc.k2_kernel(), sc.k2_stride(), k2, nullptr).ok() &&
      cu::SelectSparseBlocks(q, first, T, view, shape, blocks, counts, scratch, nullptr).ok() &&
      cu::BlockSparseAttention(q, first, T, view, shape, blocks, gate, o, scratch, nullptr).ok() &&
      cudaDeviceSynchronize() == cudaSuccess) {
    r.stage1_seconds = MedianDeviceSeconds(
        [&] { (void)cu::SelectSparseBlocks(q, first, T, view, shape, blocks, counts, scratch, nullptr); });
    r.stage2_seconds =
        MedianDeviceSeconds([&] { (void)cu::BlockSparseAttention(q, first, T, view, shape, blocks, gate, o, scratch, nullptr); });
    std::vector<int> n(T * Hk);
    cudaMemcpy(n.data(), counts, n.size() * 4, cudaMemcpyDeviceToHost);
    const int window = sc.window_blocks(), keep = sc.selected_blocks() - sc.init_blocks - window - 1;
    for (int64_t t = 0; t < T; ++t) {
      const int64_t pos = first + t, bq = pos / sc.block_size;
      // Scored: the visible k2 entries and the k1 entries of candidate blocks (one before the first).
      if (bq - window - sc.init_blocks > keep)
        r.stage1_flops += 2.0 * H * D *
                          (double(sala::SequenceState::NumK2(sc, pos + 1)) + 4.0 * (bq - window - std::max(sc.init_blocks - 1, 0)));
      for (int g = 0; g < Hk; ++g) {
        const int64_t keys = std::min<int64_t>(int64_t(n[t * Hk + g]) * sc.block_size, pos + 1);
        r.stage2_flops += 4.0 * G * D * double(keys);
      }
    }
  }
  for (void* p : {(void*)k, (void*)v, (void*)k1, (void*)k2, (void*)q, (void*)gate, (void*)o, (void*)pages, (void*)blocks,
                  (void*)counts})
    cudaFree(p);
  return r;
}

// Device-to-device copy, bytes read + written per second.
double CopyBandwidth() {
  const size_t n = size_t(1) << 30;
  void *a, *b;
  cudaMalloc(&a, n);
  cudaMalloc(&b, n);
  cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
  std::vector<double> t;
  for (int i = 0; i < 5; ++i) {
    cudaDeviceSynchronize();
    const auto s = Clock::now();
    cudaMemcpy(b, a, n, cudaMemcpyDeviceToDevice);
    cudaDeviceSynchronize();
    t.push_back(Since(s));
  }
  cudaFree(a);
  cudaFree(b);
  return 2.0 * n / Median(t);
}

}  // namespace

int main(int argc, char** argv) {
  sala::tools::ListOwnFlagsInHelp();
  absl::SetProgramUsageMessage("Benchmarks the CUDA engine on a model shape with random weights; see the file header.");
  absl::ParseCommandLine(argc, argv);
  const std::string range = absl::GetFlag(FLAGS_profiler_range);
  if (range != "decode" && range != "prefill") {
    std::cerr << "sala-bench: --profiler_range: decode or prefill, not " << range << "\n";
    return 2;
  }
  const bool range_prefill = range == "prefill";
  sala::EngineOptions o;
  o.backend = "cuda";
  o.chunk_size = absl::GetFlag(FLAGS_chunk_size);
  o.random_weights_seed = absl::GetFlag(FLAGS_seed);
  o.max_context_tokens = int64_t(1) << 22;
  o.cuda_graphs = absl::GetFlag(FLAGS_cuda_graphs);
  auto engine = sala::Engine::Load(absl::GetFlag(FLAGS_model), o);
  if (!engine.ok()) {
    std::cerr << "sala-bench: " << engine.status().message() << "\n";
    return 2;
  }
  sala::Engine& e = **engine;
  const sala::ModelConfig& c = e.config();
  const int chunk = e.options().chunk_size;  // the engine's choice where the flag left it 0
  cudaDeviceProp prop;
  cudaGetDeviceProperties(&prop, 0);
  nlohmann::json out = {{"gpu", prop.name}, {"model_layers", c.num_layers}, {"hidden_size", c.hidden_size},
                        {"chunk_size", chunk}, {"cuda_graphs", o.cuda_graphs}};
  // The sustained rate matters only for prefill floors.
  const bool prefills = !Ints(absl::GetFlag(FLAGS_lengths)).empty();
  const GemmRates gemm_rates = GemmRate(c, chunk, prefills ? absl::GetFlag(FLAGS_sustained_gemm_seconds) : 0);
  const double gemm_tflops = gemm_rates.burst, sustained_tflops = gemm_rates.sustained;
  const double copy_bps = CopyBandwidth();
  out["gemm_bf16_tflops_at_model_shapes"] = gemm_tflops;
  if (sustained_tflops > 0) out["gemm_bf16_tflops_sustained"] = sustained_tflops;
  out["device_copy_gbps"] = copy_bps / 1e9;
  std::printf("%s | cuBLASLt bf16 GEMM %.0f TFLOP/s", prop.name, gemm_tflops);
  if (sustained_tflops > 0) std::printf(" (sustained %.0f)", sustained_tflops);
  std::printf(" | device copy %.0f GB/s\n", copy_bps / 1e9);
  if (const double hold = absl::GetFlag(FLAGS_mlp_seconds); hold > 0) {
    const MlpGateUpTimes m = MlpGateUp(c, chunk, hold);
    const double flops = 4.0 * chunk * c.hidden_size * c.intermediate_size;
    auto rate = [&](double sec) { return sec > 0 ? flops / sec / 1e12 : 0.0; };
    std::printf("  MLP gate/up (%d rows): cuBLASLt + SwiGLU %.3f ms (%.0f TFLOP/s), fused %.3f ms (%.0f); "
                "sustained %.3f ms (%.0f), fused %.3f ms (%.0f)\n",
                chunk, 1e3 * m.split, rate(m.split), 1e3 * m.fused, rate(m.fused), 1e3 * m.split_sustained,
                rate(m.split_sustained), 1e3 * m.fused_sustained, rate(m.fused_sustained));
    out["mlp_gate_up"] = {{"rows", chunk},         {"split_seconds", m.split},
                          {"fused_seconds", m.fused},     {"split_sustained_seconds", m.split_sustained},
                          {"fused_sustained_seconds", m.fused_sustained}, {"hold_seconds", hold}};
  }
  if (const int64_t T = chunk; c.num_linear_layers() > 0) {
    const double sec = LightningChunkSeconds(c, T);
    std::printf("  lightning prefill chunk (%lld tokens, %d heads, dim %d): %.3f ms | %.2f M tokens/s\n", (long long)T,
                c.num_heads, c.head_dim, 1e3 * sec, sec > 0 ? T / sec / 1e6 : 0.0);
    out["lightning_chunk"] = {{"tokens", T}, {"heads", c.num_heads}, {"kv_heads", c.lightning_nkv},
                              {"dim", c.head_dim}, {"scale", c.linear_query_scale()}, {"seconds", sec}};
  }
  for (int rows : Ints(absl::GetFlag(FLAGS_projection_rows))) {
    const auto [engine_bps, lt_bps] = DecodeProjectionRates(c, rows);
    std::printf("  decode projections at %2d rows: engine %.0f GB/s (%.1f%% of copy) | cuBLASLt alone %.0f GB/s\n", rows,
                engine_bps / 1e9, 100 * engine_bps / copy_bps, lt_bps / 1e9);
    out["decode_projections"].push_back({{"rows", rows}, {"engine_gbps", engine_bps / 1e9}, {"cublaslt_gbps", lt_bps / 1e9}});
  }
  for (int context : Ints(absl::GetFlag(FLAGS_sparse_contexts))) {
    if (c.num_sparse_layers() == 0) break;
    const SparseChunkTimes st = SparseChunk(c, context, chunk);
    std::printf("  sparse layer, last %d-token chunk at %d: stage 1 %.2f ms (%.0f TFLOP/s) | stage 2 %.2f ms (%.0f TFLOP/s)\n",
                std::min(chunk, context), context, 1e3 * st.stage1_seconds,
                st.stage1_seconds > 0 ? st.stage1_flops / st.stage1_seconds / 1e12 : 0.0, 1e3 * st.stage2_seconds,
                st.stage2_seconds > 0 ? st.stage2_flops / st.stage2_seconds / 1e12 : 0.0);
    out["sparse_chunk"].push_back({{"context", context}, {"chunk", std::min(chunk, context)},
                                   {"stage1_seconds", st.stage1_seconds}, {"stage1_flops", st.stage1_flops},
                                   {"stage2_seconds", st.stage2_seconds}, {"stage2_flops", st.stage2_flops}});
  }
  // GEMM work per token: every layer weight (the norms are a rounding error), but of the last
  // layer only k and v: past them, only the last token's row is read (its logits), and the
  // engine forms nothing else there for the others.
  const int64_t embed = int64_t(c.vocab_size) * c.hidden_size;
  const double layer_params = double(c.parameter_count() - embed * (c.tie_word_embeddings ? 1 : 2));
  const double weight_bytes = 2.0 * (layer_params + embed);
  double last_layer_rest = 0;  // the last layer's weights other than k and v
  const std::string last_layer = sala::LayerTensorName(c.num_layers - 1, "");
  for (const sala::TensorSpec& t : sala::ExpectedTensors(c)) {
    if (!absl::StartsWith(t.name, last_layer) || absl::StrContains(t.name, "k_proj") ||
        absl::StrContains(t.name, "v_proj"))
      continue;
    double n = 1;
    for (int64_t dim : t.shape) n *= double(dim);
    last_layer_rest += n;
  }
  auto prefill_gemm_flops = [&](int tokens) { return 2.0 * (layer_params * tokens - last_layer_rest * (tokens - 1)); };
  std::mt19937 rng(1);
  for (int L : Ints(absl::GetFlag(FLAGS_lengths))) {
    std::vector<int> ids(L);
    for (int& t : ids) t = 3 + int(rng() % (c.vocab_size - 3));
    sala::SequenceState s = e.NewSequence();
    cudaDeviceSynchronize();
    if (range_prefill) cudaProfilerStart();
    const auto start = Clock::now();
    auto logits = e.Prefill(s, ids);
    const double ttft = Since(start);
    if (range_prefill) cudaProfilerStop();
    // The split by kind comes from a second, profiled (device-synchronised) run.
    nlohmann::json split;
    if (logits.ok() && absl::GetFlag(FLAGS_profile)) {
      sala::SequenceState again = e.NewSequence();
      e.backend().SetProfiling(true);
      const auto ps = Clock::now();
      (void)e.Prefill(again, ids);
      const double total = Since(ps);
      e.backend().SetProfiling(false);
      double known = 0;
      for (const auto& [kind, sec] : e.backend().TakeProfile()) {
        split[kind] = sec;
        known += sec;
      }
      split["other"] = total - known;
      std::printf("  prefill split (profiled run, %.3f s):", total);
      for (auto it = split.begin(); it != split.end(); ++it)
        std::printf(" %s %.1f%%", it.key().c_str(), 100 * it.value().get<double>() / total);
      std::printf("\n");
    }
    if (!logits.ok()) {
      std::cerr << L << " tokens: " << logits.status().message() << "\n";
      out["prefill"].push_back({{"tokens", L}, {"error", std::string(logits.status().message())}});
      continue;
    }
    const double floor = prefill_gemm_flops(L) / (gemm_tflops * 1e12);
    size_t free_b, total_b;
    cudaMemGetInfo(&free_b, &total_b);
    std::printf("prefill %7d tokens: TTFT %8.3f s | %8.0f tok/s | GEMM floor %.3f s (%.1f%% of floor) | GPU memory used %.1f GiB\n",
                L, ttft, L / ttft, floor, 100 * floor / ttft, (total_b - free_b) / double(1 << 30));
    nlohmann::json p = {{"tokens", L}, {"ttft_seconds", ttft}, {"tokens_per_second", L / ttft},
                        {"gemm_floor_seconds", floor}, {"fraction_of_floor", floor / ttft},
                        {"gpu_memory_used_gib", (total_b - free_b) / double(1 << 30)},
                        {"profiled_split_seconds", split}};
    if (sustained_tflops > 0) {
      const double sustained_floor = prefill_gemm_flops(L) / (sustained_tflops * 1e12);
      std::printf("  at the sustained GEMM rate: floor %.3f s (%.1f%% of it)\n", sustained_floor,
                  100 * sustained_floor / ttft);
      p["gemm_floor_sustained_seconds"] = sustained_floor;
      p["fraction_of_sustained_floor"] = sustained_floor / ttft;
    }
    for (int B : Ints(absl::GetFlag(FLAGS_decode_batches))) {
      cudaMemGetInfo(&free_b, &total_b);
      if (double(B) * s.device->bytes() > 0.9 * double(free_b)) {
        std::printf("  decode batch %3d at %7d: does not fit (%.1f GiB of states, %.1f GiB free)\n", B, L,
                    B * double(s.device->bytes()) / (1 << 30), free_b / double(1 << 30));
        continue;
      }
      std::vector<sala::SequenceState> seqs(B, s);
      std::vector<sala::SequenceState*> ptrs;
      for (auto& q : seqs) ptrs.push_back(&q);
      const std::vector<int> next(B, 5);
      // As served: the default sampling parameters, tokens drawn on the device.
      sala::SamplingParams sampling;
      sampling.seed = 1;
      sala::Sampler sampler(sampling);
      std::vector<double> t;
      for (int step = 0; step < absl::GetFlag(FLAGS_decode_steps) + 2; ++step) {
        std::vector<sala::TokenDraw> draws;
        for (int b = 0; b < B; ++b) draws.push_back(sampler.Next());
        const auto st = Clock::now();
        auto r = e.DecodeAndDraw(ptrs, next, draws);
        if (!r.ok()) break;
        if (step >= 2) t.push_back(Since(st));
      }
      if (t.empty()) continue;
      // One more step inside a profiler range, for `ncu --profile-from-start off` (a no-op otherwise).
      {
        std::vector<sala::TokenDraw> draws;
        for (int b = 0; b < B; ++b) draws.push_back(sampler.Next());
        if (!range_prefill) cudaProfilerStart();
        (void)e.DecodeAndDraw(ptrs, next, draws);
        if (!range_prefill) cudaProfilerStop();
      }
      e.backend().SetProfiling(true);
      (void)e.Decode(ptrs, next);
      e.backend().SetProfiling(false);
      nlohmann::json dsplit = e.backend().TakeProfile();
      // Bytes a step must read at least: weights, each sequence's linear states (read and
      // written) and the sparse KV of the blocks it attends to, plus its compressed keys (bf16).
      const double per_seq = 2.0 * 4 * c.num_linear_layers() * double(c.num_heads) * c.head_dim * c.head_dim +
                             double(c.num_sparse_layers()) * c.num_kv_heads * c.sparse_head_dim() *
                                 (2.0 * 2 * std::min<int64_t>(L, int64_t(c.sparse.selected_blocks()) * c.sparse.block_size) +
                                  2.0 * (L / c.sparse.kernel_stride + L / c.sparse.k2_stride()));
      const double floor_ms = 1e3 * (weight_bytes + B * per_seq) / copy_bps;
      std::printf("  decode batch %3d at %7d: %8.2f ms/step | floor %.2f ms (%.1f%% of floor)\n", B, L, 1e3 * Median(t),
                  floor_ms, 100 * floor_ms / (1e3 * Median(t)));
      std::printf("    decode split (profiled step): %s\n", dsplit.dump().c_str());
      p["decode"].push_back({{"batch", B}, {"ms_per_step", 1e3 * Median(t)}, {"floor_ms", floor_ms},
                             {"fraction_of_floor", floor_ms / (1e3 * Median(t))}, {"profiled_split_seconds", dsplit}});
    }
    out["prefill"].push_back(p);
  }
  if (const std::string path = absl::GetFlag(FLAGS_out); !path.empty()) std::ofstream(path) << out.dump(2) << "\n";
  return 0;
}

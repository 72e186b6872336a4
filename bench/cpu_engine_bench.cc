// CPU engine throughput on a model directory (default: the small built-in model):
// prefill tokens/s by prompt length and decode step time by batch size.
//   SALA_BENCH_MODEL=models/small ./build/bench/sala-cpu-bench
#include <benchmark/benchmark.h>

#include <cstdlib>
#include <random>

#include "sala/engine.h"

namespace {

sala::Engine& GetEngine() {
  static std::unique_ptr<sala::Engine> engine = [] {
    const char* dir = std::getenv("SALA_BENCH_MODEL");
    auto e = sala::Engine::Load(dir ? dir : "models/small", {});
    if (!e.ok()) {
      std::fprintf(stderr, "%s\n", std::string(e.status().message()).c_str());
      std::exit(1);
    }
    return std::move(*e);
  }();
  return *engine;
}

std::vector<int> Tokens(int n) {
  std::mt19937 rng(n);
  std::vector<int> ids(n);
  for (int& t : ids) t = 3 + int(rng() % 1000);
  return ids;
}

void BM_Prefill(benchmark::State& state) {
  sala::Engine& e = GetEngine();
  const auto ids = Tokens(int(state.range(0)));
  for (auto _ : state) {
    sala::SequenceState s = e.NewSequence();
    benchmark::DoNotOptimize(e.Prefill(s, ids));
  }
  state.counters["tokens/s"] = benchmark::Counter(double(ids.size()) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Prefill)->Arg(512)->Arg(2048)->Arg(4096)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_DecodeStep(benchmark::State& state) {
  sala::Engine& e = GetEngine();
  const int batch = int(state.range(0)), context = int(state.range(1));
  std::vector<sala::SequenceState> seqs;
  for (int i = 0; i < batch; ++i) {
    seqs.push_back(e.NewSequence());
    if (!e.Prefill(seqs.back(), Tokens(context)).ok()) state.SkipWithError("prefill failed");
  }
  std::vector<sala::SequenceState*> ptrs;
  for (auto& s : seqs) ptrs.push_back(&s);
  const std::vector<int> next(batch, 7);
  for (auto _ : state) benchmark::DoNotOptimize(e.Decode(ptrs, next));
  state.counters["tokens/s"] = benchmark::Counter(double(batch) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_DecodeStep)->Args({1, 2048})->Args({8, 2048})->Unit(benchmark::kMillisecond)->UseRealTime();

}  // namespace

BENCHMARK_MAIN();

// The CUDA backend: MODEL_SPEC §2–4 with bf16 weights and GEMM inputs, fp32 accumulation,
// fp32 residual stream and linear states. Structure mirrors the CPU backend: one pass over row
// segments (a prefill chunk, or one row per sequence in a decode step).
#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <utility>
#include <functional>
#include <map>
#include <tuple>
#include <vector>

#include "absl/strings/str_cat.h"
#include "cuda_common.h"
#include "gemm.h"
#include "gemm_swiglu.h"
#include "kv_pool.h"
#include "lightning.h"
#include "ops.h"
#include "sala/backend.h"
#include "sala/safetensors.h"
#include "sala/status_macros.h"
#include "sala/weights.h"
#include "sampling.h"
#include "sparse.h"

namespace sala {
namespace {

using cuda::DeviceBuffer;
using Bf16 = __nv_bfloat16;

constexpr int64_t kContextBucket = 16384;  // decode graphs: one per batch size and bucket of context
constexpr size_t kMaxDecodeGraphs = 256;    // captured decode steps kept (each holds its ~450 nodes)

struct LayerWeights {
  DeviceBuffer<Bf16> input_norm, post_norm, q, k, v, o, gate, q_norm, k_norm, o_norm, mlp_gate, mlp_up, mlp_down;
};

// A sparse layer's compressed keys (its K/V rows are in the sequence's pages), bf16: stage 1
// multiplies them in bf16 on tensor cores, so rounding them once when written loses nothing.
struct CompressedKeys {
  DeviceBuffer<Bf16> k1, k2;
  int64_t n1 = 0, n2 = 0;
};

// Grows a buffer by at least an eighth so that appending rows is amortised O(1), while a long
// context that starts decoding overshoots its size by 12.5% rather than doubling.
template <typename T>
absl::Status Grow(DeviceBuffer<T>& b, size_t need, size_t keep) {
  if (need <= b.size()) return absl::OkStatus();
  return b.Reserve(std::max(need, b.size() + b.size() / 8), keep);
}

// A sequence's state in device memory: its pages of the KV pool, the compressed keys and the
// linear states.
class CudaSequence final : public DeviceState {
 public:
  std::shared_ptr<cuda::KvPool> pool;  // null without sparse layers
  std::vector<int> pages;              // the page table, in token order
  DeviceBuffer<int> page_table;        // its device copy, which kernels read
  std::vector<CompressedKeys> sparse;
  std::vector<DeviceBuffer<float>> linear;
  size_t row_elems = 0, state_elems = 0;
  int64_t tokens = 0;
  int page_end = 0;  // above every page id in `pages`

  explicit CudaSequence(std::shared_ptr<cuda::KvPool> p) : pool(std::move(p)) {}
  ~CudaSequence() override {
    if (pool) pool->Free(pages.data(), pages.size());
  }

  // Pages for `n` tokens.
  absl::Status ReservePages(int64_t n) {
    const size_t need = size_t((n + cuda::kKvPageTokens - 1) / cuda::kKvPageTokens), have = pages.size();
    if (!pool || need <= have) return absl::OkStatus();
    SALA_RETURN_IF_ERROR(pool->Allocate(need - have, pages));
    for (size_t i = have; i < need; ++i) page_end = std::max(page_end, pages[i] + 1);
    absl::Status s = Grow(page_table, need, have);
    if (s.ok())
      s = cuda::CudaStatus(cudaMemcpy(page_table.get() + have, pages.data() + have, (need - have) * sizeof(int),
                                      cudaMemcpyHostToDevice),
                           "page table upload");
    if (!s.ok()) {
      pool->Free(pages.data() + have, pages.size() - have);
      pages.resize(have);
    }
    return s;
  }

  // Layer slot's K (or V) rows of page i.
  Bf16* PageRows(size_t i, int slot, bool v) const {
    return pool->base() + size_t(pages[i]) * pool->page_elems() + size_t(slot) * pool->slot_elems() +
           (v ? pool->v_offset() : 0);
  }

  cuda::SparseCacheView View(int slot) const {
    Bf16* k = pool->base() + size_t(slot) * pool->slot_elems();
    return {k, k + pool->v_offset(), page_table.get(), int64_t(pool->page_elems()), sparse[slot].k1.get(),
            sparse[slot].k2.get(), page_end};
  }

  // Copies layer slot's K (or V) rows [from, to) between its pages and `host` (bf16 bits).
  absl::Status CopyRows(int slot, bool v, int64_t from, int64_t to, uint16_t* host, bool to_device) const {
    for (int64_t t = from; t < to;) {
      const int64_t page = t / cuda::kKvPageTokens, end = std::min(to, (page + 1) * cuda::kKvPageTokens);
      Bf16* rows = PageRows(size_t(page), slot, v) + (t % cuda::kKvPageTokens) * row_elems;
      const size_t n = size_t(end - t) * row_elems;
      SALA_CUDA_RETURN_IF_ERROR(to_device ? cudaMemcpy(rows, host, n * 2, cudaMemcpyHostToDevice)
                                          : cudaMemcpy(host, rows, n * 2, cudaMemcpyDeviceToHost));
      host += n;
      t = end;
    }
    return absl::OkStatus();
  }

  // A copy with pages of its own; null when the pool or the device has no room for it.
  std::unique_ptr<DeviceState> Clone() const override {
    auto c = std::make_unique<CudaSequence>(pool);
    c->row_elems = row_elems;
    c->state_elems = state_elems;
    c->tokens = tokens;
    if (!c->ReservePages(tokens).ok()) return nullptr;
    for (size_t i = 0; i < c->pages.size(); ++i)
      if (cudaMemcpy(c->PageRows(i, 0, false), PageRows(i, 0, false), pool->page_bytes(), cudaMemcpyDeviceToDevice) !=
          cudaSuccess)
        return nullptr;
    auto copy = [](auto& dst, const auto& src, size_t n) {
      if (n == 0) return true;
      return dst.Reserve(n).ok() &&
             cudaMemcpy(dst.get(), src.get(), n * sizeof(*src.get()), cudaMemcpyDeviceToDevice) == cudaSuccess;
    };
    for (const auto& s : sparse) {
      CompressedKeys& d = c->sparse.emplace_back();
      if (!copy(d.k1, s.k1, s.n1 * row_elems) || !copy(d.k2, s.k2, s.n2 * row_elems)) return nullptr;
      d.n1 = s.n1;
      d.n2 = s.n2;
    }
    for (const auto& l : linear)
      if (!copy(c->linear.emplace_back(), l, state_elems)) return nullptr;
    return c;
  }
  size_t bytes() const override {
    size_t b = pool ? pages.size() * pool->page_bytes() : 0;
    for (const auto& s : sparse) b += (s.k1.size() + s.k2.size()) * sizeof(Bf16);
    return b + linear.size() * state_elems * 4;
  }
};

struct Segment {
  SequenceState* state;
  CudaSequence* dev;
  int64_t row0, rows;
  bool sparse;
};

template <typename T>
absl::Status Upload(DeviceBuffer<T>& dst, const T* src, size_t n) {
  SALA_RETURN_IF_ERROR(dst.Reserve(n));
  SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(dst.get(), src, n * sizeof(T), cudaMemcpyHostToDevice));
  return absl::OkStatus();
}

absl::Status UploadAsBf16(DeviceBuffer<Bf16>& dst, const std::vector<float>& src) {
  std::vector<uint16_t> h(src.size());
  for (size_t i = 0; i < h.size(); ++i) h[i] = F32ToBf16(src[i]);
  return Upload(dst, reinterpret_cast<const Bf16*>(h.data()), h.size());
}

class CudaBackend final : public Backend {
 public:
  CudaBackend(const ModelConfig& c, bool decode_graphs) : config_(c), decode_graphs_(decode_graphs) {}
  ~CudaBackend() override {
    for (auto& [key, g] : graphs_) cudaGraphExecDestroy(g.exec);
    if (graph_stream_) cudaStreamDestroy(graph_stream_);
    if (graph_ready_) cudaEventDestroy(graph_ready_);
    if (graph_done_) cudaEventDestroy(graph_done_);
  }

  // Loads every weight from the checkpoint, converted to bf16.
  absl::Status Init(const Checkpoint& ckpt) {
    return InitWith([&](const TensorSpec& spec, DeviceBuffer<Bf16>& out) -> absl::Status {
      const TensorView& t = ckpt.tensors().at(spec.name);
      std::vector<float> f(t.numel());
      ConvertToF32(t, f.data());
      return UploadAsBf16(out, f);
    });
  }

  // Draws every weight on the device: N(0, std²) by tensor (norms 1 + 0.1 N(0, 1)).
  absl::Status InitRandom(uint64_t seed) {
    return InitWith([&](const TensorSpec& spec, DeviceBuffer<Bf16>& out) -> absl::Status {
      int64_t n = 1;
      for (int64_t d : spec.shape) n *= d;
      SALA_RETURN_IF_ERROR(out.Reserve(n));
      uint64_t h = 1469598103934665603ull ^ seed;
      for (unsigned char ch : spec.name) h = (h ^ ch) * 1099511628211ull;
      double std = 1.0 / std::sqrt(double(spec.shape.back()));
      if (spec.name == "model.embed_tokens.weight") std = 0.1;
      if (spec.name == "lm_head.weight") std = 16.0 / std::sqrt(double(config_.hidden_size));
      const bool norm = spec.shape.size() == 1;
      return cuda::FillRandom(out.get(), n, h, norm ? 0.1f : float(std), norm ? 1.0f : 0.0f, nullptr);
    });
  }

  std::string name() const override { return "cuda"; }

  // Backend's default (8192 tokens) rounded to a multiple of 64 rows per multiprocessor, so that
  // a chunk's big launches end on whole waves: 128-row GEMM tiles across 4096 columns in
  // 256-column tiles take 8 rows an SM a wave, the 9B shape's stage-1 scorer 16. On an H100 or H200 (132 SMs)
  // that is 8448: a 1M-token prompt took 40.35 / 40.41 s against 40.92 / 40.95 s in chunks of
  // 8192, alternating in one call (8 and 3.88 waves of a chunk's GEMM tiles and scorer blocks).
  int PreferredChunkTokens() const override {
    const absl::StatusOr<int> sms = cuda::MultiprocessorCount();
    if (!sms.ok() || *sms <= 0) return Backend::PreferredChunkTokens();
    const int rows = 64 * *sms, target = Backend::PreferredChunkTokens();
    return rows * std::max(1, (target + rows / 2) / rows);
  }

  void SetProfiling(bool on) override { profiling_ = on; }
  std::map<std::string, double> TakeProfile() override { return std::exchange(profile_, {}); }

 private:
  using Fill = std::function<absl::Status(const TensorSpec&, DeviceBuffer<Bf16>&)>;
  absl::Status InitWith(const Fill& fill) {
    if (cuda::DeviceCount() == 0) return absl::FailedPreconditionError("no CUDA device is available");
    SALA_RETURN_IF_ERROR(gemm_.Init());
    // Graphs run on a stream of their own that does not synchronise with the legacy stream, so
    // that a capture is not broken by another thread's copies (a transfer); events order it.
    SALA_CUDA_RETURN_IF_ERROR(cudaStreamCreateWithFlags(&graph_stream_, cudaStreamNonBlocking));
    SALA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&graph_ready_, cudaEventDisableTiming));
    SALA_CUDA_RETURN_IF_ERROR(cudaEventCreateWithFlags(&graph_done_, cudaEventDisableTiming));
    if (config_.num_sparse_layers() > 0) {
      SALA_ASSIGN_OR_RETURN(pool_, cuda::KvPool::Create(config_.num_sparse_layers(), SparseRow()));
    }
    std::map<std::string, TensorSpec> specs;
    for (const TensorSpec& t : ExpectedTensors(config_)) specs[t.name] = t;
    auto get = [&](const std::string& name, DeviceBuffer<Bf16>& out) { return fill(specs.at(name), out); };
    SALA_RETURN_IF_ERROR(get("model.embed_tokens.weight", embed_));
    SALA_RETURN_IF_ERROR(get("model.norm.weight", final_norm_));
    SALA_RETURN_IF_ERROR(get(config_.tie_word_embeddings ? "model.embed_tokens.weight" : "lm_head.weight", lm_head_));
    layers_.resize(config_.num_layers);
    for (int i = 0; i < config_.num_layers; ++i) {
      LayerWeights& w = layers_[i];
      auto n = [i](const char* s) { return LayerTensorName(i, s); };
      for (auto [name, buf] : {std::pair{"input_layernorm.weight", &w.input_norm},
                               {"post_attention_layernorm.weight", &w.post_norm}, {"self_attn.q_proj.weight", &w.q},
                               {"self_attn.k_proj.weight", &w.k}, {"self_attn.v_proj.weight", &w.v},
                               {"self_attn.o_proj.weight", &w.o}, {"mlp.gate_proj.weight", &w.mlp_gate},
                               {"mlp.up_proj.weight", &w.mlp_up}, {"mlp.down_proj.weight", &w.mlp_down}})
        SALA_RETURN_IF_ERROR(get(n(name), *buf));
      if (config_.layers[i] == LayerKind::kSparse) {
        if (config_.attn_use_output_gate) SALA_RETURN_IF_ERROR(get(n("self_attn.o_gate.weight"), w.gate));
      } else {
        if (config_.use_output_gate) SALA_RETURN_IF_ERROR(get(n("self_attn.z_proj.weight"), w.gate));
        if (config_.qk_norm) {
          SALA_RETURN_IF_ERROR(get(n("self_attn.q_norm.weight"), w.q_norm));
          SALA_RETURN_IF_ERROR(get(n("self_attn.k_norm.weight"), w.k_norm));
        }
        if (config_.use_output_norm) SALA_RETURN_IF_ERROR(get(n("self_attn.o_norm.weight"), w.o_norm));
      }
    }
    std::vector<float> slopes;
    for (double s : LinearDecaySlopes(config_.num_heads)) slopes.push_back(float(s));
    SALA_RETURN_IF_ERROR(Upload(slopes_, slopes.data(), slopes.size()));
    return absl::OkStatus();
  }

 public:

  absl::StatusOr<std::vector<float>> Forward(SequenceState& state, std::span<const int> tokens, bool sparse) override {
    SALA_ASSIGN_OR_RETURN(CudaSequence * dev, Device(state));
    std::vector<Segment> segs{{&state, dev, 0, int64_t(tokens.size()), sparse}};
    SALA_RETURN_IF_ERROR(Run(segs, tokens));
    SALA_ASSIGN_OR_RETURN(auto logits, HostLogits(1));
    return std::move(logits[0]);
  }

  absl::Status Append(SequenceState& state, std::span<const int> tokens, bool sparse) override {
    SALA_ASSIGN_OR_RETURN(CudaSequence * dev, Device(state));
    std::vector<Segment> segs{{&state, dev, 0, int64_t(tokens.size()), sparse}};
    return Run(segs, tokens, {}, /*logits=*/false);
  }

  absl::Status SyncToHost(SequenceState& state, bool linear) override {
    if (!state.device) return absl::OkStatus();
    auto* dev = static_cast<CudaSequence*>(state.device.get());
    const size_t row = SparseRow();
    state.sparse.resize(dev->sparse.size());
    for (size_t slot = 0; slot < dev->sparse.size(); ++slot) {
      const CompressedKeys& c = dev->sparse[slot];
      SparseLayerCache& h = state.sparse[slot];
      // Only what the host lacks: rows and entries are append-only.
      auto rows_bf16 = [&](bool v, std::vector<float>& dst, int64_t upto) -> absl::Status {
        const size_t have = dst.size() / row;
        if (int64_t(have) >= upto) return absl::OkStatus();
        std::vector<uint16_t> tmp((upto - have) * row);
        SALA_RETURN_IF_ERROR(dev->CopyRows(int(slot), v, int64_t(have), upto, tmp.data(), /*to_device=*/false));
        for (uint16_t b : tmp) dst.push_back(Bf16ToF32(b));
        return absl::OkStatus();
      };
      auto entries = [&](const DeviceBuffer<Bf16>& src, std::vector<float>& dst, int64_t upto) -> absl::Status {
        const size_t have = dst.size() / row;
        if (int64_t(have) >= upto) return absl::OkStatus();
        std::vector<uint16_t> tmp((upto - have) * row);
        SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(tmp.data(), src.get() + have * row, tmp.size() * sizeof(Bf16),
                                             cudaMemcpyDeviceToHost));
        for (uint16_t b : tmp) dst.push_back(Bf16ToF32(b));
        return absl::OkStatus();
      };
      SALA_RETURN_IF_ERROR(rows_bf16(false, h.k, dev->tokens));
      SALA_RETURN_IF_ERROR(rows_bf16(true, h.v, dev->tokens));
      SALA_RETURN_IF_ERROR(entries(c.k1, h.k1, c.n1));
      SALA_RETURN_IF_ERROR(entries(c.k2, h.k2, c.n2));
    }
    if (linear) {
      state.linear.resize(dev->linear.size());
      for (size_t slot = 0; slot < dev->linear.size(); ++slot) {
        state.linear[slot].s.resize(StateElems());
        SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(state.linear[slot].s.data(), dev->linear[slot].get(), StateElems() * 4,
                                             cudaMemcpyDeviceToHost));
      }
    }
    return absl::OkStatus();
  }

  absl::Status Reserve(SequenceState& state, int64_t tokens) override {
    SALA_ASSIGN_OR_RETURN(CudaSequence * dev, Device(state));
    const size_t row = SparseRow();
    const SparseConfig& sc = config_.sparse;
    const int64_t n1 = std::max<int64_t>(SequenceState::NumK1(sc, tokens), 1);
    const int64_t n2 = std::max<int64_t>(SequenceState::NumK2(sc, tokens), 1);
    SALA_RETURN_IF_ERROR(dev->ReservePages(tokens));
    for (CompressedKeys& c : dev->sparse) {
      SALA_RETURN_IF_ERROR(c.k1.Reserve(n1 * row, c.n1 * row));
      SALA_RETURN_IF_ERROR(c.k2.Reserve(n2 * row, c.n2 * row));
    }
    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<DeviceSpan>> StateSpans(SequenceState& state, int64_t from, int64_t to, bool linear,
                                                     bool receive) override {
    if (from < 0 || to < from) return absl::InvalidArgumentError(absl::StrCat("bad token range [", from, ", ", to, ")"));
    SALA_ASSIGN_OR_RETURN(CudaSequence * dev, Device(state));
    const SparseConfig& sc = config_.sparse;
    if (receive) {
      if (from != dev->tokens)
        return absl::FailedPreconditionError(absl::StrCat("received rows start at ", from, " but the state holds ",
                                                          dev->tokens, " tokens"));
      SALA_RETURN_IF_ERROR(Reserve(state, to));
      for (CompressedKeys& c : dev->sparse) {
        c.n1 = SequenceState::NumK1(sc, to);
        c.n2 = SequenceState::NumK2(sc, to);
      }
      dev->tokens = state.tokens = to;
    } else if (to > dev->tokens) {
      return absl::OutOfRangeError(absl::StrCat("the state holds ", dev->tokens, " tokens, not ", to));
    }
    const size_t row = SparseRow();
    std::vector<DeviceSpan> spans;
    // K/V rows page by page: a page the range covers whole is one span (every layer's rows),
    // the rows of a page it covers in part one span per layer and K or V.
    for (int64_t t = from; t < to;) {
      const int64_t page = t / cuda::kKvPageTokens, begin = page * cuda::kKvPageTokens;
      const int64_t end = std::min(to, begin + cuda::kKvPageTokens);
      if (t == begin && end == begin + cuda::kKvPageTokens) {
        spans.push_back({dev->PageRows(size_t(page), 0, false), pool_->page_bytes()});
      } else {
        for (int slot = 0; slot < int(dev->sparse.size()); ++slot)
          for (bool v : {false, true})
            spans.push_back({dev->PageRows(size_t(page), slot, v) + (t - begin) * row, size_t(end - t) * row * 2});
      }
      t = end;
    }
    auto add = [&](Bf16* base, int64_t a, int64_t b) {
      if (b > a) spans.push_back({base + a * row, size_t(b - a) * row * sizeof(Bf16)});
    };
    const int64_t k1a = SequenceState::NumK1(sc, from), k1b = SequenceState::NumK1(sc, to);
    const int64_t k2a = SequenceState::NumK2(sc, from), k2b = SequenceState::NumK2(sc, to);
    for (CompressedKeys& c : dev->sparse) {
      add(c.k1.get(), k1a, k1b);
      add(c.k2.get(), k2a, k2b);
    }
    if (linear)
      for (DeviceBuffer<float>& l : dev->linear) spans.push_back({l.get(), StateElems() * sizeof(float)});
    return spans;
  }

  absl::StatusOr<std::vector<std::vector<float>>> DecodeStep(std::span<SequenceState* const> states,
                                                             std::span<const int> tokens,
                                                             std::span<const bool> sparse) override {
    SALA_RETURN_IF_ERROR(RunDecodeStep(states, tokens, sparse, {}));
    return HostLogits(int64_t(states.size()));
  }

  absl::StatusOr<std::vector<int>> DecodeStepAndDraw(std::span<SequenceState* const> states,
                                                     std::span<const int> tokens, std::span<const bool> sparse,
                                                     std::span<const TokenDraw> draws) override {
    if (draws.size() != states.size()) return absl::InvalidArgumentError("one draw per sequence is needed");
    const int B = int(states.size());
    SALA_RETURN_IF_ERROR(drawn_.Reserve(B));
    // The draws travel with the step's tables, before the step is queued.
    SALA_RETURN_IF_ERROR(RunDecodeStep(states, tokens, sparse, draws));
    SALA_RETURN_IF_ERROR(
        cuda::DrawTokens(logits_.get(), B, config_.vocab_size, decode_tables_.draws, drawn_.get(), nullptr));
    std::vector<int> out(B);
    SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(out.data(), drawn_.get(), B * sizeof(int), cudaMemcpyDeviceToHost));
    return out;
  }

 private:
  size_t SparseRow() const { return size_t(config_.num_kv_heads) * config_.sparse_head_dim(); }
  size_t StateElems() const { return size_t(config_.num_heads) * config_.head_dim * config_.head_dim; }

  // The sequence's device state, created (from the host state, e.g. a transferred one) on first use.
  absl::StatusOr<CudaSequence*> Device(SequenceState& state) {
    if (state.device) return static_cast<CudaSequence*>(state.device.get());
    const size_t row = SparseRow();
    const int slots = config_.num_sparse_layers();
    if (state.tokens > 0 && slots > 0 &&
        (int(state.sparse.size()) != slots || state.sparse[0].k.size() != size_t(state.tokens) * row))
      return absl::FailedPreconditionError(absl::StrCat("a state of ", state.tokens,
                                                        " tokens without their rows (a copy the device had no room for?)"));
    auto dev = std::make_unique<CudaSequence>(pool_);
    dev->row_elems = row;
    dev->state_elems = StateElems();
    dev->tokens = state.tokens;
    SALA_RETURN_IF_ERROR(dev->ReservePages(state.tokens));
    for (int slot = 0; slot < slots; ++slot) {
      CompressedKeys& c = dev->sparse.emplace_back();
      if (state.tokens > 0) {
        const SparseLayerCache& h = state.sparse[slot];
        std::vector<uint16_t> kb(h.k.size()), vb(h.v.size());
        for (size_t i = 0; i < kb.size(); ++i) kb[i] = F32ToBf16(h.k[i]);
        for (size_t i = 0; i < vb.size(); ++i) vb[i] = F32ToBf16(h.v[i]);
        SALA_RETURN_IF_ERROR(dev->CopyRows(slot, false, 0, state.tokens, kb.data(), /*to_device=*/true));
        SALA_RETURN_IF_ERROR(dev->CopyRows(slot, true, 0, state.tokens, vb.data(), /*to_device=*/true));
        SALA_RETURN_IF_ERROR(UploadAsBf16(c.k1, h.k1));
        SALA_RETURN_IF_ERROR(UploadAsBf16(c.k2, h.k2));
        c.n1 = int64_t(h.k1.size() / row);
        c.n2 = int64_t(h.k2.size() / row);
      }
    }
    for (int slot = 0; slot < config_.num_linear_layers(); ++slot) {
      DeviceBuffer<float>& s = dev->linear.emplace_back();
      SALA_RETURN_IF_ERROR(s.Reserve(StateElems()));
      if (slot < int(state.linear.size()) && state.linear[slot].s.size() == StateElems())
        SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(s.get(), state.linear[slot].s.data(), StateElems() * 4, cudaMemcpyHostToDevice));
      else
        SALA_CUDA_RETURN_IF_ERROR(cudaMemset(s.get(), 0, StateElems() * 4));
    }
    // Initialised before anyone else sees it: a transfer writes into it from a stream of its own.
    SALA_CUDA_RETURN_IF_ERROR(cudaStreamSynchronize(nullptr));
    // The device copy is now the state.
    state.sparse.clear();
    state.linear.clear();
    state.device = std::move(dev);
    return static_cast<CudaSequence*>(state.device.get());
  }

  absl::Status Scratch(int64_t R) {
    const int64_t d = config_.hidden_size, ff = config_.intermediate_size;
    const int64_t qd = int64_t(config_.num_heads) * std::max(config_.head_dim, config_.sparse_head_dim());
    const int64_t kvd = int64_t(std::max(config_.num_kv_heads * config_.sparse_head_dim(), config_.lightning_nkv * config_.head_dim));
    for (auto [buf, n] : {std::pair{&h_, R * d}, {&q_, R * qd}, {&z_, R * qd}, {&o_, R * qd},
                          {&k_, R * kvd}, {&v_, R * kvd}})
      SALA_RETURN_IF_ERROR(buf->Reserve(n));
    for (auto [buf, n] : {std::pair{&xb_, R * d}, {&ob_, R * qd}, {&g_, R * ff}, {&u_, R * ff}, {&gb_, R * ff}})
      SALA_RETURN_IF_ERROR(buf->Reserve(n));
    return ids_.Reserve(R);
  }

  absl::Status RunDecodeStep(std::span<SequenceState* const> states, std::span<const int> tokens,
                             std::span<const bool> sparse, std::span<const TokenDraw> draws) {
    std::vector<Segment> segs;
    for (size_t i = 0; i < states.size(); ++i) {
      SALA_ASSIGN_OR_RETURN(CudaSequence * dev, Device(*states[i]));
      segs.push_back({states[i], dev, int64_t(i), 1, sparse[i]});
    }
    return Run(segs, tokens, draws);
  }

  // The logits of the last Run, one row per segment.
  absl::StatusOr<std::vector<std::vector<float>>> HostLogits(int64_t rows) {
    const int64_t V = config_.vocab_size;
    std::vector<float> host(rows * V);
    SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(host.data(), logits_.get(), host.size() * sizeof(float), cudaMemcpyDeviceToHost));
    std::vector<std::vector<float>> out;
    for (int64_t b = 0; b < rows; ++b) out.emplace_back(host.begin() + b * V, host.begin() + (b + 1) * V);
    return out;
  }

  // A decode step's inputs, uploaded in one copy (see DecodeTables). The sparse caches grow
  // here, before any layer runs, so that their pointers hold all step.
  absl::Status PrepareDecodeTables(std::span<const Segment> segs, std::span<const int> tokens,
                                   std::span<const TokenDraw> draws) {
    const size_t B = segs.size(), row = SparseRow();
    const SparseConfig& sc = config_.sparse;
    const size_t linear_slots = size_t(config_.num_linear_layers());
    const size_t sparse_slots = size_t(config_.num_sparse_layers());
    std::vector<float*> linear(linear_slots * B);
    std::vector<cuda::SparseCacheView> views(sparse_slots * B);
    std::vector<int64_t> positions(B);
    std::vector<unsigned char> sparse(B);
    decode_tables_.max_position = 0;
    decode_tables_.any_sparse = false;
    for (size_t b = 0; b < B; ++b) {
      CudaSequence* dev = segs[b].dev;
      const int64_t before = segs[b].state->tokens, after = before + 1;
      for (size_t slot = 0; slot < linear_slots; ++slot) linear[slot * B + b] = dev->linear[slot].get();
      SALA_RETURN_IF_ERROR(dev->ReservePages(after));
      for (size_t slot = 0; slot < sparse_slots; ++slot) {
        CompressedKeys& c = dev->sparse[slot];
        SALA_RETURN_IF_ERROR(Grow(c.k1, std::max<int64_t>(SequenceState::NumK1(sc, after), 1) * row, c.n1 * row));
        SALA_RETURN_IF_ERROR(Grow(c.k2, std::max<int64_t>(SequenceState::NumK2(sc, after), 1) * row, c.n2 * row));
        views[slot * B + b] = dev->View(int(slot));
      }
      positions[b] = before;
      sparse[b] = segs[b].sparse;
      decode_tables_.max_position = std::max(decode_tables_.max_position, before);
      decode_tables_.any_sparse = decode_tables_.any_sparse || segs[b].sparse;
    }
    // Rounded up to a bucket: stage 1's launch shape follows it, and a decode graph is captured
    // per bucket rather than per step.
    decode_tables_.max_position = (decode_tables_.max_position / kContextBucket + 1) * kContextBucket - 1;
    // One host image, 16-byte aligned pieces at offsets that follow from B alone.
    std::vector<unsigned char>& host = decode_tables_.host;
    host.clear();
    auto place = [&](const void* data, size_t bytes) {
      const size_t at = (host.size() + 15) / 16 * 16;
      host.resize(at + bytes);
      if (data) std::memcpy(host.data() + at, data, bytes);
      return at;
    };
    const size_t at_linear = place(linear.data(), linear.size() * sizeof(float*));
    const size_t at_views = place(views.data(), views.size() * sizeof(cuda::SparseCacheView));
    const size_t at_positions = place(positions.data(), B * sizeof(int64_t));
    const size_t at_sparse = place(sparse.data(), B);
    const size_t at_ids = place(tokens.data(), B * sizeof(int));
    const size_t at_draws = place(draws.empty() ? nullptr : draws.data(), B * sizeof(TokenDraw));
    SALA_RETURN_IF_ERROR(decode_tables_.device.Reserve(host.size()));
    SALA_CUDA_RETURN_IF_ERROR(
        cudaMemcpy(decode_tables_.device.get(), host.data(), host.size(), cudaMemcpyHostToDevice));
    unsigned char* base = decode_tables_.device.get();
    decode_tables_.linear_states = reinterpret_cast<float* const*>(base + at_linear);
    decode_tables_.views = reinterpret_cast<const cuda::SparseCacheView*>(base + at_views);
    decode_tables_.positions = reinterpret_cast<const int64_t*>(base + at_positions);
    decode_tables_.sparse_rows = base + at_sparse;
    decode_tables_.ids = reinterpret_cast<const int*>(base + at_ids);
    decode_tables_.draws = reinterpret_cast<const TokenDraw*>(base + at_draws);
    return absl::OkStatus();
  }

  // The forward pass of every segment (rows of `tokens` in segment order); leaves the logits of
  // each segment's last row in logits_, where `logits` is set (a prefill chunk may go without).
  // `draws` (a decode step's, or none) go up with the step's other inputs.
  absl::Status Run(std::span<Segment> segs, std::span<const int> tokens, std::span<const TokenDraw> draws = {},
                   bool logits = true) {
    const int64_t R = int64_t(tokens.size());
    SALA_RETURN_IF_ERROR(Scratch(R));
    decode_step_ = std::all_of(segs.begin(), segs.end(), [](const Segment& seg) { return seg.rows == 1; });
    if (decode_step_) {
      SALA_RETURN_IF_ERROR(PrepareDecodeTables(segs, tokens, draws));
      step_ids_ = decode_tables_.ids;
    } else {
      for (const Segment& seg : segs) SALA_RETURN_IF_ERROR(seg.dev->ReservePages(seg.state->tokens + seg.rows));
      SALA_CUDA_RETURN_IF_ERROR(cudaMemcpy(ids_.get(), tokens.data(), R * sizeof(int), cudaMemcpyHostToDevice));
      step_ids_ = ids_.get();
    }
    if (decode_step_ && decode_graphs_ && !profiling_) SALA_RETURN_IF_ERROR(ReplayDecodeGraph(segs));
    else SALA_RETURN_IF_ERROR(Enqueue(segs, R, logits));
    const SparseConfig& sc = config_.sparse;
    for (Segment& seg : segs) {
      seg.state->tokens += seg.rows;
      seg.dev->tokens = seg.state->tokens;
      if (decode_step_)
        for (CompressedKeys& c : seg.dev->sparse) {
          c.n1 = SequenceState::NumK1(sc, seg.state->tokens);
          c.n2 = SequenceState::NumK2(sc, seg.state->tokens);
        }
    }
    return absl::OkStatus();
  }

  // The kernels of Run, queued on stream_; host state is left to Run.
  absl::Status Enqueue(std::span<Segment> segs, int64_t R, bool logits = true) {
    const int64_t d = config_.hidden_size, ff = config_.intermediate_size;
    const float eps = float(config_.rms_norm_eps);
    cudaStream_t s = stream_;
    SALA_RETURN_IF_ERROR(cuda::Embed(step_ids_, int(R), embed_.get(), int(d), float(config_.scale_emb), h_.get(), s));
    // Residual adds happen in the epilogues of the output projections (o, down), the RMSNorms
    // after them in the input projections (in the GEMV) or just before them (NormedMm).
    for (int i = 0; i < config_.num_layers; ++i) {
      LayerWeights& w = layers_[i];
      // Nothing reads the last layer's output but the logits of the pass's last row (a prefill
      // is one segment), so a prefill's last layer carries only that row past its attention, or
      // none without logits: every row still adds its K and V or its linear state to the
      // sequence, but the output projection and the MLP (and a sparse layer's q, gate and
      // attention) are formed for the rows carried alone.
      const int64_t out_first = (!decode_step_ && i == config_.num_layers - 1) ? (logits ? R - 1 : R) : 0;
      const int64_t out_rows = R - out_first;
      if (config_.layers[i] == LayerKind::kSparse) SALA_RETURN_IF_ERROR(SparseMixer(i, segs, R, out_first));
      else SALA_RETURN_IF_ERROR(LinearMixer(i, segs, R, out_first));
      if (out_rows == 0) break;
      SALA_RETURN_IF_ERROR(MlpGateUp(w, out_first, out_rows));
      SALA_RETURN_IF_ERROR(MmAddResidual(gb_.get(), out_first, out_rows, ff, w.mlp_down.get()));
    }
    if (!logits) return absl::OkStatus();
    // Logits of each segment's last row, in one GEMM.
    const int64_t B = int64_t(segs.size()), V = config_.vocab_size;
    SALA_RETURN_IF_ERROR(last_.Reserve(B * d));
    SALA_RETURN_IF_ERROR(logits_.Reserve(B * V));
    const float inv_div = float(1.0 / config_.logit_divisor());
    const cuda::GemvWeight lm_head[] = {{lm_head_.get(), V, logits_.get()}};
    if (decode_step_)  // the last rows are rows 0 .. B - 1
      return NormedMm(final_norm_.get(), inv_div, 0, B, lm_head);
    for (int64_t b = 0; b < B; ++b)
      SALA_RETURN_IF_ERROR(cuda::RmsNormToBf16(h_.get() + (segs[b].row0 + segs[b].rows - 1) * d, 1, int(d),
                                               final_norm_.get(), eps, inv_div, last_.get() + b * d, s));
    return MmMany(last_.get(), B, d, lm_head);
  }

  // Every device pointer a captured decode step has baked in: a graph is replayed only while
  // they all still hold (a buffer that grew since has moved).
  std::vector<const void*> GraphPointers() const {
    const cuda::SparseScratch& sc = sparse_scratch_;
    return {h_.get(), q_.get(), k_.get(), v_.get(), z_.get(), o_.get(), g_.get(), u_.get(), logits_.get(),
            xb_.get(), ob_.get(), gb_.get(), last_.get(), decode_tables_.device.get(),
            sc.partial.get(), sc.scores.get(), sc.lse.get(), sc.blocks.get(), sc.counts.get()};
  }

  // A decode step from the graph of its batch size and context bucket, captured on first use.
  // The step's inputs are all in device tables (PrepareDecodeTables), so one graph serves
  // every step of its key.
  absl::Status ReplayDecodeGraph(std::span<Segment> segs) {
    const auto key = std::make_tuple(int64_t(segs.size()), decode_tables_.max_position, decode_tables_.any_sparse);
    auto it = graphs_.find(key);
    if (it != graphs_.end() && it->second.pointers != GraphPointers()) {
      cudaGraphExecDestroy(it->second.exec);
      graphs_.erase(it);
      it = graphs_.end();
    }
    SALA_CUDA_RETURN_IF_ERROR(cudaEventRecord(graph_ready_, nullptr));
    SALA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(graph_stream_, graph_ready_));
    if (it == graphs_.end()) {
      // Relaxed: scratch buffers may be allocated while the step is captured.
      SALA_CUDA_RETURN_IF_ERROR(cudaStreamBeginCapture(graph_stream_, cudaStreamCaptureModeRelaxed));
      stream_ = graph_stream_;
      const absl::Status queued = Enqueue(segs, int64_t(segs.size()));
      stream_ = nullptr;
      cudaGraph_t graph = nullptr;
      cudaError_t made = cudaStreamEndCapture(graph_stream_, &graph);
      cudaGraphExec_t exec = nullptr;
      if (made == cudaSuccess && queued.ok()) made = cudaGraphInstantiate(&exec, graph, 0);
      if (graph) cudaGraphDestroy(graph);
      SALA_RETURN_IF_ERROR(queued);
      if (made != cudaSuccess) {
        // A step that cannot be captured still runs (nothing ran while capturing): launched one
        // by one, from now on.
        cudaGetLastError();
        decode_graphs_ = false;
        return Enqueue(segs, int64_t(segs.size()));
      }
      if (graphs_.size() >= kMaxDecodeGraphs) {  // the least recently used one goes
        auto lru = std::min_element(graphs_.begin(), graphs_.end(),
                                    [](const auto& a, const auto& b) { return a.second.used < b.second.used; });
        cudaGraphExecDestroy(lru->second.exec);
        graphs_.erase(lru);
      }
      it = graphs_.emplace(key, DecodeGraph{exec, GraphPointers()}).first;
    }
    it->second.used = ++graph_clock_;
    SALA_CUDA_RETURN_IF_ERROR(cudaGraphLaunch(it->second.exec, graph_stream_));
    SALA_CUDA_RETURN_IF_ERROR(cudaEventRecord(graph_done_, graph_stream_));
    SALA_CUDA_RETURN_IF_ERROR(cudaStreamWaitEvent(nullptr, graph_done_));
    return absl::OkStatus();
  }

  // The attention mixers of a layer over R rows, whose outputs are added to h_ from row
  // `out_first` on (see Enqueue).
  absl::Status LinearMixer(int layer, std::span<Segment> segs, int64_t R, int64_t out_first) {
    LayerWeights& w = layers_[layer];
    const int H = config_.num_heads, Hk = config_.lightning_nkv, D = config_.head_dim;
    const float eps = float(config_.rms_norm_eps), scale = float(config_.linear_query_scale());
    cudaStream_t s = stream_;
    // Prefill projects q, k and v in bf16 (the chunked kernel's operands are 16-bit), into the
    // first half of the fp32 buffers, and the kernel's bf16 output goes to o_'s first half; a
    // decode step keeps fp32 for its GEMV and step kernel.
    auto* q16 = reinterpret_cast<Bf16*>(q_.get());
    auto* k16 = reinterpret_cast<Bf16*>(k_.get());
    auto* v16 = reinterpret_cast<Bf16*>(v_.get());
    auto* o16 = reinterpret_cast<Bf16*>(o_.get());
    if (decode_step_) SALA_RETURN_IF_ERROR(ProjectQkvGate(R, w, H, Hk, D, config_.use_output_gate));
    else SALA_RETURN_IF_ERROR(ProjectQkvGate(R, w, H, Hk, D, config_.use_output_gate, {q16, k16, v16}));
    const int slot = config_.slot_of(layer);
    const __nv_bfloat16* q_norm = config_.qk_norm ? w.q_norm.get() : nullptr;
    const __nv_bfloat16* k_norm = config_.qk_norm ? w.k_norm.get() : nullptr;
    if (decode_step_) {
      // Every segment is one row, in order from row 0: one launch per kernel for the batch.
      const int B = int(segs.size());
      // q/k norm and RoPE happen inside the step.
      const cuda::StepHeadPrep prep{q_norm, k_norm, eps, decode_tables_.positions, config_.rope_theta,
                                    config_.lightning_use_rope};
      Section section(this, "linear_attention");
      SALA_RETURN_IF_ERROR(cuda::LinearAttentionStep(q_.get(), k_.get(), v_.get(), B, H, Hk, D, scale, slopes_.get(),
                                                     decode_tables_.linear_states + size_t(slot) * B, o_.get(),
                                                     prep, s));
    } else {
      // A prefill chunk: one segment.
      const Segment& seg = segs[0];
      // q and k become f16 in place.
      auto* qh = reinterpret_cast<__half*>(q16);
      auto* kh = reinterpret_cast<__half*>(k16);
      SALA_RETURN_IF_ERROR(cuda::HeadNormRope({q16, qh, H, q_norm}, {k16, kh, Hk, k_norm}, int(seg.rows), D, eps,
                                              seg.state->tokens, config_.rope_theta, config_.lightning_use_rope, s));
      SALA_ASSIGN_OR_RETURN(const int64_t scratch, cuda::LinearAttentionScratchFloats(seg.rows, H, D));
      SALA_RETURN_IF_ERROR(linear_scratch_.Reserve(scratch));
      Section section(this, "linear_attention");
      SALA_RETURN_IF_ERROR(cuda::LinearAttentionChunked(qh, kh, v16, seg.rows, H, Hk, D, scale, slopes_.get(),
                                                        seg.dev->linear[slot].get(), o16, linear_scratch_.get(),
                                                        s));
    }
    return OutputProjection(config_.use_output_norm ? w.o_norm.get() : nullptr, config_.use_output_gate, out_first,
                            R, H * D, w.o.get(), decode_step_ ? nullptr : o16);
  }

  absl::Status SparseMixer(int layer, std::span<Segment> segs, int64_t R, int64_t out_first) {
    LayerWeights& w = layers_[layer];
    const int H = config_.num_heads, Hk = config_.num_kv_heads, D = config_.sparse_head_dim();
    const SparseConfig& sc = config_.sparse;
    cudaStream_t s = stream_;
    // Prefill's q in bf16 (the operand type of both stages' MMAs), in the first half of q_.
    auto* q16 = reinterpret_cast<Bf16*>(q_.get());
    SALA_RETURN_IF_ERROR(ProjectQkvGate(R, w, H, Hk, D, config_.attn_use_output_gate,
                                        {decode_step_ ? nullptr : q16, nullptr, nullptr}, out_first));
    const cuda::SparseShape shape{H, Hk, D, sc.block_size, sc.kernel_size, sc.kernel_stride, sc.init_blocks,
                                  sc.window_blocks(), sc.selected_blocks()};
    const size_t row = SparseRow();
    const int slot = config_.slot_of(layer);
    if (decode_step_) {
      // Every segment one row, any batch size: one launch per kernel for the whole batch (an
      // fp32 attention, so that a sequence decodes the same alone or batched).
      const int B = int(segs.size());
      const cuda::SparseCacheView* views = decode_tables_.views + size_t(slot) * B;
      const int64_t* positions = decode_tables_.positions;
      SALA_RETURN_IF_ERROR(cuda::AppendRows(k_.get(), v_.get(), B, views, positions, shape, s));
      cuda::SparseScratch& scratch = sparse_scratch_;
      SALA_RETURN_IF_ERROR(scratch.blocks.Reserve(size_t(B) * Hk * shape.selected_blocks));
      SALA_RETURN_IF_ERROR(scratch.counts.Reserve(size_t(B) * Hk));
      if (decode_tables_.any_sparse) {
        Section section(this, "sparse_stage1");
        SALA_RETURN_IF_ERROR(cuda::SelectSparseBlocksRows(q_.get(), B, views, positions, decode_tables_.max_position,
                                                          shape, scratch.blocks.get(), scratch.counts.get(), scratch,
                                                          s));
      }
      Section section(this, "sparse_decode_attention");
      SALA_RETURN_IF_ERROR(cuda::SparseAttentionRows(q_.get(), B, views, positions, decode_tables_.sparse_rows,
                                                     scratch.blocks.get(), scratch.counts.get(), shape, o_.get(),
                                                     scratch, s));
    } else {
      // A prefill chunk: one segment.
      const Segment& seg = segs[0];
      CompressedKeys& c = seg.dev->sparse[slot];
      const int64_t before = seg.state->tokens, after = before + seg.rows;
      const int64_t n1 = SequenceState::NumK1(sc, after), n2 = SequenceState::NumK2(sc, after);
      SALA_RETURN_IF_ERROR(Grow(c.k1, std::max<int64_t>(n1, 1) * row, c.n1 * row));
      SALA_RETURN_IF_ERROR(Grow(c.k2, std::max<int64_t>(n2, 1) * row, c.n2 * row));
      const cuda::SparseCacheView view = seg.dev->View(slot);  // pages reserved by Run
      SALA_RETURN_IF_ERROR(cuda::StoreRows(k_.get(), v_.get(), before, seg.rows, view, Hk, D, s));
      SALA_RETURN_IF_ERROR(cuda::CompressKeys(view, Hk, D, c.n1, n1, sc.kernel_size, sc.kernel_stride, c.k1.get(), s));
      SALA_RETURN_IF_ERROR(cuda::CompressKeys(view, Hk, D, c.n2, n2, sc.k2_kernel(), sc.k2_stride(), c.k2.get(), s));
      c.n1 = n1;
      c.n2 = n2;
      // Queries from row out_first on only; the chunk's every row is in the cache by now. The
      // attention writes the output projection's input itself (gated, bf16) into ob_.
      const int64_t qd = int64_t(H) * D, rows = seg.rows - out_first;
      const Bf16* gate = config_.attn_use_output_gate ? Z16() + out_first * qd : nullptr;
      SALA_RETURN_IF_ERROR(
          SparsePrefill(q16 + out_first * qd, before + out_first, rows, view, shape, seg.sparse, gate, ob_.get()));
      return MmAddResidual(ob_.get(), out_first, rows, qd, w.o.get());
    }
    return OutputProjection(nullptr, config_.attn_use_output_gate, 0, R, H * D, w.o.get());
  }

  // A prefill chunk's sparse-layer attention: stage 1 picks each row's blocks (sparse rows only),
  // stage 2 attends to them and writes o, times sigmoid(gate) where given, in bf16.
  absl::Status SparsePrefill(const Bf16* q, int64_t first, int64_t T, const cuda::SparseCacheView& view,
                             const cuda::SparseShape& shape, bool sparse, const Bf16* gate, Bf16* o) {
    cuda::SparseScratch& sc = sparse_scratch_;
    if (sparse) {
      Section section(this, "sparse_stage1");
      SALA_RETURN_IF_ERROR(sc.blocks.Reserve(size_t(T) * shape.kv_heads * shape.selected_blocks));
      SALA_RETURN_IF_ERROR(sc.counts.Reserve(size_t(T) * shape.kv_heads));
      SALA_RETURN_IF_ERROR(
          cuda::SelectSparseBlocks(q, first, T, view, shape, sc.blocks.get(), sc.counts.get(), sc, stream_));
    }
    Section section(this, "sparse_stage2");
    return cuda::BlockSparseAttention(q, first, T, view, shape, sparse ? sc.blocks.get() : nullptr, gate, o, sc,
                                      stream_);
  }

  // Adds the device time of the enclosing scope to profile_[kind] when profiling.
  class Section {
   public:
    Section(CudaBackend* b, const char* kind) : b_(b), kind_(kind) {
      if (b_->profiling_) {
        cudaDeviceSynchronize();
        start_ = std::chrono::steady_clock::now();
      }
    }
    ~Section() {
      if (!b_->profiling_) return;
      cudaDeviceSynchronize();
      b_->profile_[kind_] += std::chrono::duration<double>(std::chrono::steady_clock::now() - start_).count();
    }

   private:
    CudaBackend* b_;
    const char* kind_;
    std::chrono::steady_clock::time_point start_;
  };
  absl::Status MmMany(const Bf16* x, int64_t rows, int64_t in, std::span<const cuda::GemvWeight> weights) {
    Section section(this, "gemm");
    return gemm_.RunMany(x, rows, in, weights, stream_);
  }
  // h_'s `rows` rows from row `first` on += residual scale · x · wᵀ.
  absl::Status MmAddResidual(const Bf16* x, int64_t first, int64_t rows, int64_t in, const Bf16* w) {
    Section section(this, "gemm");
    const int64_t d = config_.hidden_size;
    return gemm_.RunAdd(x, rows, in, w, d, float(config_.residual_scale()), h_.get() + first * d, stream_);
  }
  // The RMSNorm of h_'s `rows` rows from row `first` on (times post_scale) through `weights`:
  // formed inside the GEMV where it takes the shape (a decode step), else normed into xb_ first.
  absl::Status NormedMm(const Bf16* norm, float post_scale, int64_t first, int64_t rows,
                        std::span<const cuda::GemvWeight> weights) {
    const int64_t d = config_.hidden_size;
    const float* h = h_.get() + first * d;
    const cuda::GemvFormedInput input{h, norm, nullptr, float(config_.rms_norm_eps), post_scale};
    if (cuda::GemvFormedApplies(rows, d, input, weights.data(), int(weights.size()))) {
      Section section(this, "gemm");
      return cuda::GemvFormed(input, int(rows), d, weights.data(), int(weights.size()), stream_);
    }
    SALA_RETURN_IF_ERROR(cuda::RmsNormToBf16(h, int(rows), int(d), norm, input.eps, post_scale, xb_.get(), stream_));
    return MmMany(xb_.get(), rows, d, weights);
  }
  // gb_ = silu(gate) * up of the RMSNorm of h_'s `rows` rows from row `first` on: for prefill
  // rows past the GEMV's on Hopper, in one kernel with SwiGLU in its epilogue (no bf16 gate and
  // up to write and read back: 8% of a chunk's gate/up time at the power limit); else bf16 gate
  // and up, as the reference model's projections give them, and a SwiGLU pass. A decode step
  // keeps the latter: at its few rows the weights' bytes set the pace either way.
  absl::Status MlpGateUp(const LayerWeights& w, int64_t first, int64_t rows) {
    const int64_t d = config_.hidden_size, ff = config_.intermediate_size;
    if (!decode_step_ && rows > cuda::kGemvMaxRows && cuda::GemmSwiGluApplies(d, ff)) {
      SALA_RETURN_IF_ERROR(cuda::RmsNormToBf16(h_.get() + first * d, int(rows), int(d), w.post_norm.get(),
                                               float(config_.rms_norm_eps), 1.0f, xb_.get(), stream_));
      Section section(this, "gemm");
      return cuda::GemmSwiGlu(xb_.get(), rows, d, w.mlp_gate.get(), w.mlp_up.get(), ff, gb_.get(), stream_);
    }
    const cuda::GemvWeight gate_up[] = {{w.mlp_gate.get(), ff, nullptr, false, 1.0f, g_.get()},
                                        {w.mlp_up.get(), ff, nullptr, false, 1.0f, u_.get()}};
    SALA_RETURN_IF_ERROR(NormedMm(w.post_norm.get(), 1.0f, first, rows, gate_up));
    return cuda::SwiGluToBf16(g_.get(), u_.get(), rows * ff, gb_.get(), stream_);
  }
  // h_ += residual scale · x · w_oᵀ for an attention output from row `first` on of R, x its
  // norm (where given) times sigmoid(z) (with `gate`), formed into ob_ first. In prefill the
  // output (o16) and the gate (Z16()) are bf16; a decode step's fp32 rows (o_, all of them) are
  // formed inside the GEMV where it takes the shape.
  absl::Status OutputProjection(const Bf16* norm, bool gate, int64_t first, int64_t R, int64_t width,
                                const Bf16* w_o, const Bf16* o16 = nullptr) {
    const float eps = float(config_.rms_norm_eps);
    if (!decode_step_) {
      if (o16 == nullptr) return absl::InternalError("a prefill's attention output comes in bf16");
      const int64_t rows = R - first, at = first * width;
      if (rows == 0) return absl::OkStatus();
      const Bf16* z = gate ? Z16() + at : nullptr;
      SALA_RETURN_IF_ERROR(cuda::NormGateToBf16(o16 + at, z, int(rows), int(width), norm, eps, ob_.get(), stream_));
      return MmAddResidual(ob_.get(), first, rows, width, w_o);
    }
    if (first != 0) return absl::InternalError("a decode step carries every row");
    const cuda::GemvWeight out{w_o, config_.hidden_size, h_.get(), /*add=*/true, float(config_.residual_scale())};
    const cuda::GemvFormedInput input{o_.get(), norm, gate ? z_.get() : nullptr, eps};
    if (cuda::GemvFormedApplies(R, width, input, &out, 1)) {
      Section section(this, "gemm");
      return cuda::GemvFormed(input, int(R), width, &out, 1, stream_);
    }
    SALA_RETURN_IF_ERROR(cuda::NormGateToBf16(o_.get(), input.gate, int(R), int(width), norm, eps, ob_.get(), stream_));
    return MmAddResidual(ob_.get(), 0, R, width, w_o);
  }
  // Prefill's gate projection, in bf16 in the first half of z_.
  Bf16* Z16() const { return reinterpret_cast<Bf16*>(z_.get()); }
  // The attention input projections of a layer from the normed h_ into q_, k_, v_ (and the gate
  // into z_, or Z16() in prefill); those of q, k and v that `qkv16` names go there, rounded to
  // bf16, instead. k and v for all R rows, q and the gate for the rows from `out_first` on.
  struct Bf16Qkv {
    Bf16 *q, *k, *v;
  };
  absl::Status ProjectQkvGate(int64_t R, const LayerWeights& w, int H, int Hk, int D, bool gate,
                              Bf16Qkv qkv16 = {nullptr, nullptr, nullptr}, int64_t out_first = 0) {
    // `out` columns into the rows from `first` on of bf16 where given, else of f32.
    auto into = [](const Bf16* weight, int64_t out, int64_t first, float* f32, Bf16* bf16) {
      return bf16 ? cuda::GemvWeight{weight, out, nullptr, false, 1.0f, bf16 + first * out}
                  : cuda::GemvWeight{weight, out, f32 + first * out};
    };
    const int64_t qd = int64_t(H) * D, kvd = int64_t(Hk) * D;
    const cuda::GemvWeight q = into(w.q.get(), qd, out_first, q_.get(), qkv16.q);
    const cuda::GemvWeight k = into(w.k.get(), kvd, 0, k_.get(), qkv16.k);
    const cuda::GemvWeight v = into(w.v.get(), kvd, 0, v_.get(), qkv16.v);
    const cuda::GemvWeight g = into(w.gate.get(), qd, out_first, z_.get(), decode_step_ ? nullptr : Z16());
    const Bf16* norm = w.input_norm.get();
    if (out_first == 0) {
      const cuda::GemvWeight all[] = {q, k, v, g};
      return NormedMm(norm, 1.0f, 0, R, std::span(all, gate ? 4 : 3));
    }
    const cuda::GemvWeight kv[] = {k, v}, q_gate[] = {q, g};
    SALA_RETURN_IF_ERROR(NormedMm(norm, 1.0f, 0, R, kv));
    if (out_first == R) return absl::OkStatus();
    return NormedMm(norm, 1.0f, out_first, R - out_first, std::span(q_gate, gate ? 2 : 1));
  }

  bool profiling_ = false;
  std::map<std::string, double> profile_;
  ModelConfig config_;
  bool decode_graphs_;  // cleared if a step cannot be captured
  // Where kernels go: the legacy stream, or graph_stream_ while a decode step is captured.
  cudaStream_t stream_ = nullptr;
  cudaStream_t graph_stream_ = nullptr;
  cudaEvent_t graph_ready_ = nullptr, graph_done_ = nullptr;
  struct DecodeGraph {
    cudaGraphExec_t exec;
    std::vector<const void*> pointers;
    uint64_t used = 0;  // graph_clock_ at its last replay
  };
  std::map<std::tuple<int64_t, int64_t, bool>, DecodeGraph> graphs_;  // by (batch, context bucket, any sparse row)
  uint64_t graph_clock_ = 0;
  cuda::Gemm gemm_;
  DeviceBuffer<Bf16> embed_, final_norm_, lm_head_;
  std::vector<LayerWeights> layers_;
  DeviceBuffer<float> slopes_;
  DeviceBuffer<float> linear_scratch_;  // the chunked linear attention's segment states
  DeviceBuffer<float> h_, q_, k_, v_, z_, o_, logits_;
  DeviceBuffer<Bf16> xb_, ob_, g_, u_, gb_, last_;
  DeviceBuffer<int> ids_;  // a prefill chunk's tokens
  DeviceBuffer<int> drawn_;
  // Set by Run: every segment is one row (a decode step), the step's tables, and where the
  // pass's token ids are.
  bool decode_step_ = false;
  const int* step_ids_ = nullptr;
  // A decode step's inputs in one device buffer, uploaded with one copy (each host-to-device
  // copy waits for the device, idle between steps). Offsets follow from the batch size alone, so
  // a graph captured for a batch size finds its inputs where it read them while the buffer stays.
  struct DecodeTables {
    DeviceBuffer<unsigned char> device;
    std::vector<unsigned char> host;
    float* const* linear_states = nullptr;         // [linear slots, B]
    const cuda::SparseCacheView* views = nullptr;  // [sparse slots, B]
    const int64_t* positions = nullptr;            // [B]: the new token's position
    const unsigned char* sparse_rows = nullptr;    // [B]
    const int* ids = nullptr;                      // [B]: the step's tokens
    const TokenDraw* draws = nullptr;              // [B]: when the step draws
    int64_t max_position = 0;
    bool any_sparse = false;
  } decode_tables_;
  cuda::SparseScratch sparse_scratch_;
  std::shared_ptr<cuda::KvPool> pool_;  // the sparse layers' K/V pages; sequences share it
};

}  // namespace

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackendWithRandomWeights(const ModelConfig& config, uint64_t seed,
                                                                          bool decode_graphs) {
  auto backend = std::make_unique<CudaBackend>(config, decode_graphs);
  SALA_RETURN_IF_ERROR(backend->InitRandom(seed));
  return backend;
}

absl::StatusOr<std::unique_ptr<Backend>> MakeCudaBackend(const ModelConfig& config, const Checkpoint& checkpoint,
                                                         bool decode_graphs) {
  SALA_RETURN_IF_ERROR(ValidateCheckpoint(config, checkpoint));
  auto backend = std::make_unique<CudaBackend>(config, decode_graphs);
  SALA_RETURN_IF_ERROR(backend->Init(checkpoint));
  return backend;
}

}  // namespace sala

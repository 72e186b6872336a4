// Every CUDA kernel against the CPU backend's op on fresh random inputs; device outputs are
// poisoned (NaN) before each run so that an unwritten element cannot pass.
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <memory>
#include <random>
#include <string>

#include "cpu/cpu_ops.h"
#include "cuda/cuda_common.h"
#include "cuda/gemm.h"
#include "cuda/gemm_swiglu.h"
#include "cuda/gemv.h"
#include "cuda/lightning.h"
#include "cuda/ops.h"
#include "cuda/sampling.h"
#include "cuda/sparse.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "sala/safetensors.h"
#include "sala/sampling.h"

namespace sala {
namespace {

class GpuTest : public ::testing::Test {
 protected:
  void SetUp() override {
    if (cuda::DeviceCount() == 0) GTEST_SKIP() << "no CUDA device";
  }
};

std::vector<float> Random(size_t n, uint32_t seed, float scale = 1.0f, bool bf16 = false) {
  std::mt19937 rng(seed);
  std::normal_distribution<float> d(0.0f, scale);
  std::vector<float> v(n);
  for (float& x : v) x = bf16 ? Bf16ToF32(F32ToBf16(d(rng))) : d(rng);
  return v;
}

template <typename T>
T* ToDevice(const std::vector<T>& v) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(v.size(), 1) * sizeof(T)), cudaSuccess);
  cudaMemcpy(p, v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice);
  return p;
}

__nv_bfloat16* Bf16ToDevice(const std::vector<float>& v) {
  std::vector<uint16_t> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = F32ToBf16(v[i]);
  return reinterpret_cast<__nv_bfloat16*>(ToDevice(h));
}

template <typename T>
T* Poisoned(size_t n) {
  T* p = nullptr;
  EXPECT_EQ(cudaMalloc(&p, std::max<size_t>(n, 1) * sizeof(T)), cudaSuccess);
  cudaMemset(p, 0xFF, n * sizeof(T));  // NaN in fp32 and bf16
  return p;
}

std::vector<float> FromDevice(const float* p, size_t n) {
  std::vector<float> v(n);
  EXPECT_EQ(cudaMemcpy(v.data(), p, n * 4, cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

// n 16-bit values from the device, each widened to fp32 by `widen`.
template <typename T, typename Widen>
std::vector<float> FromDevice16(const T* p, size_t n, Widen widen) {
  std::vector<T> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = widen(h[i]);
  return v;
}

std::vector<float> FromDeviceBf16(const __nv_bfloat16* p, size_t n) {
  return FromDevice16(reinterpret_cast<const uint16_t*>(p), n, [](uint16_t x) { return Bf16ToF32(x); });
}

// Compressed keys are the CPU's fp32 means rounded to bf16: every entry within one bf16 step of
// the rounded CPU value (the sums may round differently in their last fp32 bit).
void ExpectBf16Of(const __nv_bfloat16* device, const std::vector<float>& want, const std::string& what) {
  const std::vector<float> got = FromDeviceBf16(device, want.size());
  for (size_t i = 0; i < want.size(); ++i) {
    const float rounded = Bf16ToF32(F32ToBf16(want[i]));
    ASSERT_LE(std::abs(got[i] - rounded), std::abs(rounded) * 0x1p-7f) << what << " entry " << i;
  }
}

// Widths a multiple of 4 take four values an access (520 ends in a partial warp of them);
// 1002 takes one value at a time.
TEST_F(GpuTest, RmsNormAndNormGateMatchCpu) {
  for (int width : {256, 520, 1000, 1002, 4096, 16384}) {
    const int rows = 7;
    auto x = Random(rows * width, 1, 3.0f), w = Random(width, 2, 1.0f, true);
    std::vector<float> ref(x.size());
    cpu::RmsNorm(x.data(), rows, width, w.data(), 1e-6, ref.data());
    for (float& v : ref) v *= 0.5f;
    auto* out = Poisoned<__nv_bfloat16>(x.size());
    ASSERT_TRUE(cuda::RmsNormToBf16(ToDevice(x), rows, width, Bf16ToDevice(w), 1e-6f, 0.5f, out, nullptr).ok());
    EXPECT_LT(testing::RelativeError(FromDeviceBf16(out, x.size()), ref), 1e-2) << width;
    // The attention output's form: the norm (or none) times a sigmoid gate, from fp32 rows (a
    // decode step) or bf16 ones (prefill: o from the linear kernel, z from the gate projection),
    // the bf16 inputs rounded on the way in.
    auto z = Random(x.size(), 3, 2.0f);
    for (bool norm : {true, false}) {
      std::vector<float> gated = x;
      if (norm) cpu::RmsNorm(x.data(), rows, width, w.data(), 1e-6, gated.data());
      for (size_t i = 0; i < gated.size(); ++i) gated[i] /= 1.0f + std::exp(-z[i]);
      const __nv_bfloat16* dw = norm ? Bf16ToDevice(w) : nullptr;
      for (int form = 0; form < 4; ++form) {
        const bool o16 = form & 1, z16 = form & 2;
        out = Poisoned<__nv_bfloat16>(x.size());
        absl::Status st;
        if (o16 && z16) st = cuda::NormGateToBf16(Bf16ToDevice(x), Bf16ToDevice(z), rows, width, dw, 1e-6f, out, nullptr);
        else if (o16) st = cuda::NormGateToBf16(Bf16ToDevice(x), ToDevice(z), rows, width, dw, 1e-6f, out, nullptr);
        else if (z16) st = cuda::NormGateToBf16(ToDevice(x), Bf16ToDevice(z), rows, width, dw, 1e-6f, out, nullptr);
        else st = cuda::NormGateToBf16(ToDevice(x), ToDevice(z), rows, width, dw, 1e-6f, out, nullptr);
        ASSERT_TRUE(st.ok()) << st;
        EXPECT_LT(testing::RelativeError(FromDeviceBf16(out, x.size()), gated), 1e-2)
            << width << " norm " << norm << " bf16 o " << o16 << " bf16 z " << z16;
      }
    }
  }
}

// f16 values to and from the device (the linear attention's prefill operands).
std::vector<float> RoundedToHalf(std::vector<float> v) {
  for (float& x : v) x = __half2float(__float2half_rn(x));
  return v;
}
__half* HalfToDevice(const std::vector<float>& v) {
  std::vector<__half> h(v.size());
  for (size_t i = 0; i < v.size(); ++i) h[i] = __float2half_rn(v[i]);
  return ToDevice(h);
}
std::vector<float> FromDeviceHalf(const __half* p, size_t n) {
  return FromDevice16(p, n, [](__half x) { return __half2float(x); });
}

// q and k in one launch: different head counts, k without a norm weight in one case; bf16 in,
// f16 out, q in place and k into another buffer.
TEST_F(GpuTest, HeadNormRopeMatchesCpuAtLargePositions) {
  for (int dim : {64, 128}) {
    const int rows = 5, hq = 3, hk = 2;
    const bool k_norm = dim == 64;
    const int64_t pos0 = 1000000;
    auto q = Random(rows * hq * dim, 3, 2.0f, true), k = Random(rows * hk * dim, 5, 2.0f, true);
    auto wq = Random(dim, 4, 1.0f, true), wk = Random(dim, 6, 1.0f, true);
    // CPU: norm, then RoPE with row r at pos0 + r.
    auto reference = [&](const std::vector<float>& x, int heads, const float* w) {
      std::vector<float> ref = x;
      if (w) cpu::RmsNorm(x.data(), rows * heads, dim, w, 1e-6, ref.data());
      for (int r = 0; r < rows; ++r) cpu::Rope(ref.data() + r * heads * dim, 1, heads, dim, pos0 + r, 10000.0);
      return ref;
    };
    __nv_bfloat16* dq = Bf16ToDevice(q);
    __half* dk = Poisoned<__half>(k.size());
    ASSERT_TRUE(cuda::HeadNormRope({dq, reinterpret_cast<__half*>(dq), hq, Bf16ToDevice(wq)},
                                   {Bf16ToDevice(k), dk, hk, k_norm ? Bf16ToDevice(wk) : nullptr}, rows, dim, 1e-6f,
                                   pos0, 10000.0, true, nullptr)
                    .ok());
    // Within f16 rounding (2^-11 of each value).
    EXPECT_LT(testing::RelativeError(FromDeviceHalf(reinterpret_cast<__half*>(dq), q.size()),
                                     reference(q, hq, wq.data())),
              1e-3)
        << "q, dim " << dim;
    EXPECT_LT(testing::RelativeError(FromDeviceHalf(dk, k.size()), reference(k, hk, k_norm ? wk.data() : nullptr)),
              1e-3)
        << "k, dim " << dim;
  }
}

// Plain, and with the residual add in the epilogue (y += scale · x·wᵀ), at GEMV and GEMM row counts.
TEST_F(GpuTest, GemmMatchesCpu) {
  for (auto [rows, in, out] : {std::tuple{1, 256, 1032}, {77, 512, 256}, {300, 256, 768}}) {
    auto x = Random(rows * in, 5, 1.0f, true), w = Random(out * in, 6, 0.05f, true);
    std::vector<float> ref(rows * out);
    cpu::Gemm(x.data(), rows, in, w.data(), out, ref.data());
    cuda::Gemm gemm;
    ASSERT_TRUE(gemm.Init().ok());
    float* y = Poisoned<float>(ref.size());
    ASSERT_TRUE(gemm.Run(Bf16ToDevice(x), rows, in, Bf16ToDevice(w), out, y, nullptr).ok());
    EXPECT_LT(testing::RelativeError(FromDevice(y, ref.size()), ref), 1e-4) << rows << "x" << in << "x" << out;
    const float scale = 0.37f;
    auto h = Random(ref.size(), 7, 2.0f);
    std::vector<float> sum(h.size());
    for (size_t i = 0; i < h.size(); ++i) sum[i] = h[i] + scale * ref[i];
    float* dh = ToDevice(h);
    ASSERT_TRUE(gemm.RunAdd(Bf16ToDevice(x), rows, in, Bf16ToDevice(w), out, scale, dh, nullptr).ok());
    EXPECT_LT(testing::RelativeError(FromDevice(dh, sum.size()), sum), 1e-5) << "add, " << rows << "x" << in;
    // bf16 output (the MLP's gate and up), by the GEMV or cuBLASLt as the rows decide.
    auto* yb = Poisoned<__nv_bfloat16>(ref.size());
    const cuda::GemvWeight to_bf16{Bf16ToDevice(w), out, nullptr, false, 1.0f, yb};
    ASSERT_TRUE(gemm.RunMany(Bf16ToDevice(x), rows, in, {&to_bf16, 1}, nullptr).ok());
    EXPECT_LT(testing::RelativeError(FromDeviceBf16(yb, ref.size()), ref), 1e-2) << "bf16 output, " << rows << " rows";
    // A residual add cannot go into a bf16 output.
    cuda::GemvWeight add_to_bf16 = to_bf16;
    add_to_bf16.add = true;
    EXPECT_FALSE(gemm.RunMany(Bf16ToDevice(x), rows, in, {&add_to_bf16, 1}, nullptr).ok());
  }
}

// bf16 gate and up; lengths that leave a tail after the 8-wide loads.
TEST_F(GpuTest, SwiGluMatchesCpu) {
  for (int64_t n : {int64_t{1}, int64_t{7}, int64_t{4099}, int64_t{1} << 20}) {
    auto g = Random(n, 61, 3.0f, true), u = Random(n, 62, 2.0f, true);
    std::vector<float> ref(n);
    for (int64_t i = 0; i < n; ++i) ref[i] = cpu::Silu(g[i]) * u[i];
    auto* y = Poisoned<__nv_bfloat16>(n);
    ASSERT_TRUE(cuda::SwiGluToBf16(Bf16ToDevice(g), Bf16ToDevice(u), n, y, nullptr).ok());
    ExpectBf16Of(y, ref, "n " + std::to_string(n));
  }
}

// The fused gate/up GEMM with SwiGLU in its epilogue (Hopper only): rows that leave partial row
// tiles, a partial cluster and a partial group of them, widths of one and several column tiles,
// K of one k tile, of more than its shared-memory stages, and the 9B model's (4096).
TEST_F(GpuTest, GemmSwiGluMatchesCpu) {
  if (!cuda::GemmSwiGluApplies(64, 128)) GTEST_SKIP() << "the fused gate/up GEMM needs an sm_90a device";
  for (auto [rows, in, ff] :
       {std::tuple{1, 64, 128}, {77, 512, 256}, {300, 256, 384}, {2100, 384, 128}, {130, 4096, 256}}) {
    auto x = Random(rows * in, 63, 1.0f, true), wg = Random(ff * in, 64, 0.1f, true), wu = Random(ff * in, 65, 0.1f, true);
    std::vector<float> gate(rows * ff), up(rows * ff), ref(rows * ff);
    cpu::Gemm(x.data(), rows, in, wg.data(), ff, gate.data());
    cpu::Gemm(x.data(), rows, in, wu.data(), ff, up.data());
    for (size_t i = 0; i < ref.size(); ++i) ref[i] = cpu::Silu(gate[i]) * up[i];
    auto* y = Poisoned<__nv_bfloat16>(ref.size());
    ASSERT_TRUE(cuda::GemmSwiGlu(Bf16ToDevice(x), rows, in, Bf16ToDevice(wg), Bf16ToDevice(wu), ff, y, nullptr).ok());
    EXPECT_LT(testing::RelativeError(FromDeviceBf16(y, ref.size()), ref), 5e-3) << rows << "x" << in << "x" << ff;
  }
  EXPECT_FALSE(cuda::GemmSwiGluApplies(96, 128));
  EXPECT_FALSE(cuda::GemmSwiGluApplies(64, 192));
}

// GEMV operands: random bf16 weights [out, in] for each of `outs` (seeds seed, seed + 1, ...),
// the CPU products x·wᵀ as references, and poisoned outputs.
struct GemvOperands {
  std::vector<cuda::GemvWeight> weights;
  std::vector<std::vector<float>> refs;
};
GemvOperands RandomGemvOperands(const std::vector<float>& x, int rows, int in, const std::vector<int64_t>& outs,
                                uint64_t seed) {
  GemvOperands g;
  for (size_t i = 0; i < outs.size(); ++i) {
    auto w = Random(outs[i] * in, seed + i, 0.05f, true);
    g.refs.emplace_back(rows * outs[i]);
    cpu::Gemm(x.data(), rows, in, w.data(), outs[i], g.refs.back().data());
    g.weights.push_back({Bf16ToDevice(w), outs[i], Poisoned<float>(rows * outs[i])});
  }
  return g;
}

// A decode step's projections: up to 4 rows, several weights in one launch, widths that leave
// partial unrolled steps and columns that leave partial blocks.
TEST_F(GpuTest, GemvMatchesCpuForFewRowsAndSeveralWeights) {
  for (auto [rows, in] : {std::pair{1, 4096}, {2, 264}, {3, 1032}, {4, 16384}}) {
    const std::vector<int64_t> outs{1032, 37, 256, 4096};
    auto x = Random(rows * in, 11 + rows, 1.0f, true);
    auto [weights, refs] = RandomGemvOperands(x, rows, in, outs, 20);
    const __nv_bfloat16* dx = Bf16ToDevice(x);
    ASSERT_TRUE(cuda::GemvApplies(rows, in, dx, weights.data(), int(weights.size())));
    ASSERT_TRUE(cuda::Gemv(dx, rows, in, weights.data(), int(weights.size()), nullptr).ok());
    for (size_t i = 0; i < outs.size(); ++i)
      EXPECT_LT(testing::RelativeError(FromDevice(weights[i].y, refs[i].size()), refs[i]), 1e-4)
          << rows << " rows of " << in << ", weight " << i;
  }
  // Shapes it does not take are refused, not computed wrongly.
  const cuda::GemvWeight one{nullptr, 8, nullptr};
  EXPECT_FALSE(cuda::GemvApplies(cuda::kGemvMaxRows + 1, 256, nullptr, &one, 1));
  EXPECT_FALSE(cuda::GemvApplies(1, 260, nullptr, &one, 1));
  EXPECT_FALSE(cuda::Gemv(nullptr, 1, 260, &one, 1, nullptr).ok());
}

// The input formed inside the GEMV from fp32 rows (a norm, a post-norm scale, a sigmoid gate, in
// the combinations the model uses) and a residual add into one of the outputs: against the CPU
// norm and gate (rounded to bf16, as the GPU rounds them) and GEMM.
TEST_F(GpuTest, GemvOverFormedRowsWithResidualAddMatchesCpu) {
  struct Case {
    int rows, in;
    bool norm, gate;
  };
  for (auto [rows, in, norm, gate] : {Case{1, 4096, true, false}, {2, 264, true, true}, {3, 1032, false, true},
                                      {4, 4096, true, false}}) {
    const std::vector<int64_t> outs{1032, 37, 4096};
    const float post_scale = 0.25f, add_scale = 0.37f;
    auto h = Random(rows * in, 31 + rows, 3.0f), z = Random(rows * in, 33, 2.0f);
    auto norm_weight = Random(in, 32, 1.0f, true);
    std::vector<float> x = h;
    if (norm) cpu::RmsNorm(h.data(), rows, in, norm_weight.data(), 1e-6, x.data());
    for (size_t i = 0; i < x.size(); ++i) {
      const float gated = gate ? x[i] * post_scale / (1.0f + std::exp(-z[i])) : x[i] * post_scale;
      x[i] = Bf16ToF32(F32ToBf16(gated));
    }
    auto [weights, refs] = RandomGemvOperands(x, rows, in, outs, 40);
    // The second output takes a residual add: y += add_scale · x·wᵀ onto random values.
    auto before = Random(refs[1].size(), 50, 1.0f);
    for (size_t j = 0; j < before.size(); ++j) refs[1][j] = before[j] + add_scale * refs[1][j];
    weights[1].y = ToDevice(before);
    weights[1].add = true;
    weights[1].scale = add_scale;
    const cuda::GemvFormedInput input{ToDevice(h), norm ? Bf16ToDevice(norm_weight) : nullptr,
                                      gate ? ToDevice(z) : nullptr, 1e-6f, post_scale};
    ASSERT_TRUE(cuda::GemvFormedApplies(rows, in, input, weights.data(), int(weights.size())));
    ASSERT_TRUE(cuda::GemvFormed(input, rows, in, weights.data(), int(weights.size()), nullptr).ok());
    for (size_t i = 0; i < outs.size(); ++i)
      EXPECT_LT(testing::RelativeError(FromDevice(weights[i].y, refs[i].size()), refs[i]), 2e-3)
          << rows << " rows of " << in << ", norm " << norm << ", gate " << gate << ", weight " << i;
  }
  // More rows, or rows that do not fit in shared memory, are refused.
  const cuda::GemvFormedInput none{nullptr, nullptr, nullptr, 1e-6f};
  const cuda::GemvWeight one{nullptr, 8, nullptr};
  EXPECT_FALSE(cuda::GemvFormedApplies(cuda::kGemvMaxRows + 1, 256, none, &one, 1));
  EXPECT_FALSE(cuda::GemvFormedApplies(4, 8192, none, &one, 1));
  EXPECT_FALSE(cuda::GemvFormed(none, 4, 8192, &one, 1, nullptr).ok());
}

// f16 q and k, bf16 v, f16 tensor-core operands, bf16 output: tolerances of the order of f16 and
// bf16 rounding. The
// lengths cut the sequence into one segment (1, 63, 64, 65 tokens), several of one chunk or more,
// and segments of several chunks with a partial last one (3001 with 4 heads, 8192 with 32).
TEST_F(GpuTest, LinearAttentionChunkedMatchesCpu) {
  for (auto [T, H, Hk, D] : {std::tuple{1, 4, 4, 64}, {63, 4, 2, 64}, {64, 4, 4, 64}, {65, 4, 4, 128},
                             {300, 8, 8, 128}, {1000, 32, 32, 128}, {3001, 4, 2, 128}, {8192, 32, 32, 128},
                             {5000, 8, 8, 64}}) {
    const auto slopes = LinearDecaySlopes(H);
    std::vector<float> fslopes(slopes.begin(), slopes.end());
    auto q = RoundedToHalf(Random(T * H * D, 7)), k = RoundedToHalf(Random(T * Hk * D, 8));
    auto v = Random(T * Hk * D, 9, 1.0f, true);
    auto s0 = Random(size_t(H) * D * D, 10, 0.1f);
    std::vector<float> ref_state = s0, ref_o(T * H * D);
    const double scale = 1.0 / std::sqrt(double(D));
    cpu::LinearAttentionChunked({H, Hk, D, scale, &slopes}, q.data(), k.data(), v.data(), T, 64, ref_state.data(),
                                ref_o.data());
    float* state = ToDevice(s0);
    auto* o = Poisoned<__nv_bfloat16>(ref_o.size());
    const auto scratch = cuda::LinearAttentionScratchFloats(T, H, D);
    ASSERT_TRUE(scratch.ok());
    ASSERT_TRUE(cuda::LinearAttentionChunked(HalfToDevice(q), HalfToDevice(k), Bf16ToDevice(v), T, H, Hk, D,
                                             float(scale), ToDevice(fslopes), state, o, Poisoned<float>(*scratch),
                                             nullptr)
                    .ok());
    EXPECT_LT(testing::RelativeError(FromDeviceBf16(o, ref_o.size()), ref_o), 6e-3)
        << T << " " << H << " " << Hk << " " << D;
    EXPECT_LT(testing::RelativeError(FromDevice(state, ref_state.size()), ref_state), 5e-3)
        << T << " " << H << " " << Hk << " " << D;
  }
}

// A decode step for a batch, with q and k as projected (per-head norm and RoPE at each row's own
// position inside the step, as the CPU does before its step) and as already prepared.
TEST_F(GpuTest, LinearAttentionStepMatchesCpuForABatch) {
  for (auto [D, prepare] : {std::pair{128, true}, {64, true}, {128, false}}) {
    const int B = 3, H = 4, Hk = 2;
    const double scale = 1.0 / std::sqrt(double(D));
    const auto slopes = LinearDecaySlopes(H);
    std::vector<float> fslopes(slopes.begin(), slopes.end());
    const auto q = Random(B * H * D, 11, 2.0f), k = Random(B * Hk * D, 12, 2.0f), v = Random(B * Hk * D, 13);
    const auto wq = Random(D, 14, 1.0f, true), wk = Random(D, 15, 1.0f, true);
    const std::vector<int64_t> positions{7, 1000000, 524287};
    std::vector<float*> states;
    std::vector<std::vector<float>> ref_states;
    std::vector<float> ref_o(B * H * D);
    for (int b = 0; b < B; ++b) {
      auto s = Random(size_t(H) * D * D, 20 + b, 0.1f);
      states.push_back(ToDevice(s));
      ref_states.push_back(s);
      std::vector<float> qb(q.begin() + b * H * D, q.begin() + (b + 1) * H * D);
      std::vector<float> kb(k.begin() + b * Hk * D, k.begin() + (b + 1) * Hk * D);
      if (prepare) {
        cpu::RmsNorm(qb.data(), H, D, wq.data(), 1e-6, qb.data());
        cpu::RmsNorm(kb.data(), Hk, D, wk.data(), 1e-6, kb.data());
        cpu::Rope(qb.data(), 1, H, D, positions[b], 10000.0);
        cpu::Rope(kb.data(), 1, Hk, D, positions[b], 10000.0);
      }
      cpu::LinearAttentionStep({H, Hk, D, scale, &slopes}, qb.data(), kb.data(), v.data() + b * Hk * D,
                               ref_states[b].data(), ref_o.data() + b * H * D);
    }
    cuda::StepHeadPrep prep;
    if (prepare) prep = {Bf16ToDevice(wq), Bf16ToDevice(wk), 1e-6f, ToDevice(positions), 10000.0, true};
    float* dq = ToDevice(q);
    float* o = Poisoned<float>(ref_o.size());
    ASSERT_TRUE(cuda::LinearAttentionStep(dq, ToDevice(k), ToDevice(v), B, H, Hk, D, float(scale), ToDevice(fslopes),
                                          ToDevice(states), o, prep, nullptr)
                    .ok());
    EXPECT_LT(testing::RelativeError(FromDevice(o, ref_o.size()), ref_o), 1e-4) << D << " " << prepare;
    for (int b = 0; b < B; ++b)
      EXPECT_LT(testing::RelativeError(FromDevice(states[b], ref_states[b].size()), ref_states[b]), 1e-4) << D;
    EXPECT_EQ(FromDevice(dq, q.size()), q);  // the projections are left as they were
  }
}

// A sparse config like the built-in model's; the cache holds bf16-exact keys and values.
ModelConfig SmallSparseConfig(int heads, int kv_heads, int dim, int topk = 8) {
  ModelConfig c;
  c.hidden_size = heads * dim;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.sparse.block_size = 64;
  c.sparse.kernel_size = 32;
  c.sparse.kernel_stride = 16;
  c.sparse.init_blocks = 1;
  c.sparse.topk = topk;
  c.sparse.window_size = 128;
  return c;
}

// One sparse layer's K/V rows in pages laid out as the KV pool lays them out (with one layer a
// page here), the pages in shuffled order: a kernel that does not follow the page table fails.
struct PagedKv {
  static constexpr int64_t P = cuda::kKvPageTokens;
  size_t row;
  int64_t page_elems;
  std::vector<int> pages;
  __nv_bfloat16* base;  // page 0's K rows
  int* table;

  PagedKv(const std::vector<float>& k, const std::vector<float>& v, size_t row, uint32_t seed)
      : row(row), page_elems(2 * P * int64_t(row)) {
    const int64_t tokens = int64_t(k.size() / row);
    pages.resize(size_t((tokens + P - 1) / P));
    for (size_t i = 0; i < pages.size(); ++i) pages[i] = int(i);
    std::shuffle(pages.begin(), pages.end(), std::mt19937(seed));
    std::vector<uint16_t> image(pages.size() * page_elems, 0xFFFF);  // NaN where no row is
    for (int64_t t = 0; t < tokens; ++t)
      for (size_t e = 0; e < row; ++e) {
        const size_t at = At(t) + e;
        image[at] = F32ToBf16(k[t * row + e]);
        image[at + P * row] = F32ToBf16(v[t * row + e]);
      }
    base = reinterpret_cast<__nv_bfloat16*>(ToDevice(image));
    table = ToDevice(pages);
  }
  size_t At(int64_t t) const { return size_t(pages[t / P]) * page_elems + size_t(t % P) * row; }
  __nv_bfloat16* Row(int64_t t, bool v) const { return base + At(t) + (v ? P * row : 0); }
  // Rows [0, n) of K or V, gathered from the pages.
  std::vector<float> Rows(bool v, int64_t n) const {
    std::vector<float> out;
    for (int64_t t = 0; t < n; ++t) {
      const auto r = FromDeviceBf16(Row(t, v), row);
      out.insert(out.end(), r.begin(), r.end());
    }
    return out;
  }
};

// A random sparse-layer cache of L tokens (bf16-exact K/V) with its compressed keys on both sides.
struct SparseFixture {
  ModelConfig c;
  SparseLayerCache cache;
  size_t row;
  std::unique_ptr<PagedKv> kv;
  __nv_bfloat16 *k1, *k2;
  cuda::SparseShape shape;

  SparseFixture(int64_t L, int heads, int kv_heads, int dim, uint32_t seed, int topk = 8)
      : c(SmallSparseConfig(heads, kv_heads, dim, topk)), row(size_t(kv_heads) * dim) {
    cache.k = Random(L * row, seed, 1.0f, true);
    cache.v = Random(L * row, seed + 1, 1.0f, true);
    UpdateCompressedKeys(c, L, cache);
    kv = std::make_unique<PagedKv>(cache.k, cache.v, row, seed);
    const int64_t n1 = int64_t(cache.k1.size() / row), n2 = int64_t(cache.k2.size() / row);
    k1 = Poisoned<__nv_bfloat16>(std::max<int64_t>(n1, 1) * row);
    k2 = Poisoned<__nv_bfloat16>(std::max<int64_t>(n2, 1) * row);
    EXPECT_TRUE(cuda::CompressKeys(view(), kv_heads, dim, 0, n1, 32, 16, k1, nullptr).ok());
    EXPECT_TRUE(cuda::CompressKeys(view(), kv_heads, dim, 0, n2, 128, 64, k2, nullptr).ok());
    ExpectBf16Of(k1, cache.k1, "k1");
    ExpectBf16Of(k2, cache.k2, "k2");
    shape = {heads, kv_heads, dim, 64, 32, 16, 1, c.sparse.window_blocks(), c.sparse.selected_blocks()};
  }
  cuda::SparseCacheView view() const {
    return {kv->base, kv->base + PagedKv::P * row, kv->table, kv->page_elems, k1, k2, int(kv->pages.size())};
  }
};

// Prefill rows land in their pages as bf16, across page boundaries, and nowhere else.
TEST_F(GpuTest, StoreRowsWritesPagedRows) {
  const int kv_heads = 2, dim = 128;
  const size_t row = size_t(kv_heads) * dim;
  const int64_t L = 700, first = 200, T = 450;  // rows 200 .. 649: three pages, two boundaries
  const auto k0 = Random(L * row, 30, 1.0f, true), v0 = Random(L * row, 31, 1.0f, true);
  PagedKv kv(k0, v0, row, 32);
  const auto k = Random(T * row, 33, 1.0f), v = Random(T * row, 34, 1.0f);
  const cuda::SparseCacheView view{kv.base,          kv.base + PagedKv::P * row, kv.table, kv.page_elems, nullptr,
                                   nullptr,          int(kv.pages.size())};
  ASSERT_TRUE(cuda::StoreRows(ToDevice(k), ToDevice(v), first, T, view, kv_heads, dim, nullptr).ok());
  auto expect_k = k0, expect_v = v0;
  for (size_t e = 0; e < T * row; ++e) {
    expect_k[first * row + e] = Bf16ToF32(F32ToBf16(k[e]));
    expect_v[first * row + e] = Bf16ToF32(F32ToBf16(v[e]));
  }
  EXPECT_EQ(kv.Rows(false, L), expect_k);
  EXPECT_EQ(kv.Rows(true, L), expect_v);
}

// Decode appends: rows of three sequences land at their positions as bf16, and the k1/k2 entries
// that each new token completes (and only those) equal the CPU's compression.
TEST_F(GpuTest, AppendRowsMatchesCpuCompression) {
  const int heads = 4, kv_heads = 2, dim = 64;
  const size_t row = size_t(kv_heads) * dim;
  // 128: completes a k1 and the first k2 entry; 144: a k1 entry only; 150: neither.
  const int64_t lengths[3] = {127, 143, 149};
  std::vector<std::unique_ptr<SparseFixture>> seqs;
  std::vector<cuda::SparseCacheView> views;
  std::vector<int64_t> positions;
  for (int i = 0; i < 3; ++i) {
    seqs.push_back(std::make_unique<SparseFixture>(lengths[i] + 1, heads, kv_heads, dim, 90 + i));
    views.push_back(seqs.back()->view());
    positions.push_back(lengths[i]);
  }
  const auto k = Random(3 * row, 95, 1.0f), v = Random(3 * row, 96, 1.0f);
  // The fixtures hold one row more than the prefix: poison it and the entries the new token
  // completes, so that only the kernel can make them right.
  for (int i = 0; i < 3; ++i) {
    SparseFixture& f = *seqs[i];
    cudaMemset(f.kv->Row(lengths[i], false), 0xFF, row * 2);
    cudaMemset(f.kv->Row(lengths[i], true), 0xFF, row * 2);
    const int64_t n1 = SequenceState::NumK1(f.c.sparse, lengths[i] + 1), n2 = SequenceState::NumK2(f.c.sparse, lengths[i] + 1);
    if (n1 > SequenceState::NumK1(f.c.sparse, lengths[i])) cudaMemset(f.k1 + (n1 - 1) * row, 0xFF, row * 2);
    if (n2 > SequenceState::NumK2(f.c.sparse, lengths[i])) cudaMemset(f.k2 + (n2 - 1) * row, 0xFF, row * 2);
  }
  ASSERT_TRUE(cuda::AppendRows(ToDevice(k), ToDevice(v), 3, ToDevice(views), ToDevice(positions), seqs[0]->shape,
                               nullptr)
                  .ok());
  for (int i = 0; i < 3; ++i) {
    SparseFixture& f = *seqs[i];
    SparseLayerCache expect = f.cache;  // the prefix and the new row, compressed on the CPU
    for (size_t e = 0; e < row; ++e) {
      expect.k[lengths[i] * row + e] = Bf16ToF32(F32ToBf16(k[i * row + e]));
      expect.v[lengths[i] * row + e] = Bf16ToF32(F32ToBf16(v[i * row + e]));
    }
    expect.k1.clear();
    expect.k2.clear();
    UpdateCompressedKeys(f.c, lengths[i] + 1, expect);
    EXPECT_EQ(f.kv->Rows(false, lengths[i] + 1), expect.k) << i;
    EXPECT_EQ(f.kv->Rows(true, lengths[i] + 1), expect.v) << i;
    ExpectBf16Of(f.k1, expect.k1, "k1 of sequence " + std::to_string(i));
    ExpectBf16Of(f.k2, expect.k2, "k2 of sequence " + std::to_string(i));
  }
}

// Checks one (token, group) block list of the GPU against SelectBlocks': equal, except where a
// differing block's score is within bf16 rounding of the last chosen score (scores are bf16
// products on the GPU, and the kernels sum the heads in different orders). Returns the number of
// such near-ties.
int ExpectBlocksUpToTies(const SparseFixture& f, const float* q_group, int g, int64_t position, const int* got_blocks,
                         int n, const std::string& where) {
  std::vector<float> score;
  const auto want = cpu::SelectBlocks(f.c, f.cache, q_group, g, position, &score);
  EXPECT_EQ(n, int(want.size())) << where;
  if (n != int(want.size())) return 0;
  std::vector<int64_t> got(got_blocks, got_blocks + n);
  EXPECT_TRUE(std::adjacent_find(got.begin(), got.end(), std::greater_equal<int64_t>()) == got.end())
      << where << ": blocks not strictly increasing";
  float last = INFINITY;  // the lowest finite score the CPU chose
  for (int64_t b : want) last = std::min(last, score[b]);
  int differing = 0;
  for (int64_t b : got) {
    if (std::binary_search(want.begin(), want.end(), b)) continue;
    ++differing;
    EXPECT_GE(score[b], last * (1 - 2e-2f)) << where << " block " << b;
  }
  for (int64_t b : want)
    if (!std::binary_search(got.begin(), got.end(), b)) EXPECT_LE(score[b], last * (1 + 2e-2f)) << where << " block " << b;
  return differing;
}

// Stage 1 of a prefill: the GPU's block lists against SelectBlocks', up to near-ties.
// 300000: above 4096 candidate blocks. Zero queries make every score tie on the CPU (and nearly
// so on the GPU, whose exponentials differ by the key's place in a tile), so that more scores
// reach the top-k's bound than a warp gathers and it searches the whole row; any choice among
// such ties is a near-tie. Top-k 8 keeps 6 scored candidates, 64 keeps 62 (as the 9B model
// does), 160 keeps 158.
TEST_F(GpuTest, SparseBlockSelectionMatchesCpu) {
  for (auto [L, T, heads, kv_heads, dim, zero_q, topk] :
       {std::tuple{1500, 40, 4, 2, 64, false, 8}, {2100, 100, 32, 2, 128, false, 8}, {9000, 33, 32, 2, 128, false, 8},
        {70000, 20, 32, 2, 128, false, 8}, {300000, 4, 32, 2, 128, false, 8}, {70000, 6, 32, 2, 128, true, 8},
        {70000, 20, 32, 2, 128, false, 64}, {300000, 4, 32, 2, 128, false, 64}, {70000, 6, 32, 2, 128, true, 64},
        {20000, 16, 32, 2, 128, false, 160}}) {
    SparseFixture f(L, heads, kv_heads, dim, 40, topk);
    // bf16 queries, as a prefill gives them
    const auto q = zero_q ? std::vector<float>(size_t(T) * heads * dim, 0.0f) : Random(T * heads * dim, 41, 1.0f, true);
    const int S = f.shape.selected_blocks;
    int* blocks = Poisoned<int>(size_t(T) * kv_heads * S);
    int* counts = Poisoned<int>(size_t(T) * kv_heads);
    cuda::SparseScratch scratch;
    const int64_t first = L - T;
    ASSERT_TRUE(cuda::SelectSparseBlocks(Bf16ToDevice(q), first, T, f.view(), f.shape, blocks, counts, scratch, nullptr).ok());
    std::vector<int> gb(size_t(T) * kv_heads * S), gc(size_t(T) * kv_heads);
    cudaMemcpy(gb.data(), blocks, gb.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(gc.data(), counts, gc.size() * 4, cudaMemcpyDeviceToHost);
    int differing = 0;
    for (int64_t t = 0; t < T; ++t)
      for (int g = 0; g < kv_heads; ++g)
        differing += ExpectBlocksUpToTies(f, q.data() + (t * heads + g * (heads / kv_heads)) * dim, g, first + t,
                                          gb.data() + (t * kv_heads + g) * S, gc[t * kv_heads + g],
                                          "L " + std::to_string(L) + " t " + std::to_string(t));
    if (!zero_q) EXPECT_LE(differing, T * kv_heads) << "L " << L;  // near-ties only
  }
}

// Stage 1's top-k alone against cpu::ChooseBlocks on the same f16 scores, list for list:
// random scores with ~2K candidates a row and with ~20K (segments of 32 scores above 16K),
// scores of 3 values (hundreds tie at tau among the gathered ones) and of 2 (more reach the
// bound than a warp gathers, so it searches the whole row), fewer segments than the blocks kept
// (no bound: all gathered, or at top-k 160 too many to gather), rows around and below the point
// where a row has more candidates than it keeps, and top-k 8 and 160.
TEST_F(GpuTest, TopBlocksMatchCpu) {
  for (auto [first, T, window, topk, levels] :
       {std::tuple{130000, 40, 32, 64, 0}, {1300000, 8, 32, 64, 0}, {130000, 24, 32, 64, 3}, {1300000, 4, 32, 64, 2},
        {50000, 16, 32, 64, 0}, {3000, 30, 32, 64, 0}, {6060, 200, 32, 64, 0}, {130000, 20, 2, 8, 0},
        {130000, 8, 32, 160, 0}, {130000, 8, 32, 160, 2}}) {
    const cuda::SparseShape shape{32, 2, 128, 64, 32, 16, 1, window, topk + window};  // as ModelConfig has it
    const int Hk = shape.kv_heads, init = shape.init_blocks, S = shape.selected_blocks;
    const int64_t last_bq = (first + T - 1) / 64, ncap = std::max<int64_t>(8, (last_bq - window - init + 7) / 8 * 8);
    std::mt19937 rng(first + topk + levels);
    std::uniform_real_distribution<float> uniform(0.0f, 1.0f);
    std::vector<float> scores(size_t(T) * Hk * ncap);
    for (float& x : scores) x = levels ? float(rng() % levels) / levels : uniform(rng);
    int* blocks = Poisoned<int>(size_t(T) * Hk * S);
    int* counts = Poisoned<int>(size_t(T) * Hk);
    ASSERT_TRUE(cuda::SelectTopBlocks(HalfToDevice(scores), ncap, first, T, shape, blocks, counts, nullptr).ok());
    std::vector<int> gb(size_t(T) * Hk * S), gc(size_t(T) * Hk);
    cudaMemcpy(gb.data(), blocks, gb.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(gc.data(), counts, gc.size() * 4, cudaMemcpyDeviceToHost);
    for (int64_t r = 0; r < T; ++r)
      for (int g = 0; g < Hk; ++g) {
        const int64_t bq = (first + r) / 64;
        std::vector<float> score(bq + 1, INFINITY);  // init and local blocks forced
        for (int64_t b = init; b < bq - window; ++b)
          score[b] = __half2float(__float2half_rn(scores[(r * Hk + g) * ncap + b - init]));
        const std::vector<int64_t> want = cpu::ChooseBlocks(score, S);
        const int* got = gb.data() + (r * Hk + g) * S;
        ASSERT_EQ(gc[r * Hk + g], int(want.size())) << "first " << first << " row " << r;
        for (size_t i = 0; i < want.size(); ++i)
          ASSERT_EQ(got[i], want[i]) << "first " << first << " levels " << levels << " row " << r << " entry " << i;
      }
  }
  // Rows of scores that are not whole 16-byte pieces, or too short for the last row's candidates.
  const cuda::SparseShape shape{32, 2, 128, 64, 32, 16, 1, 32, 96};
  EXPECT_FALSE(cuda::SelectTopBlocks(Poisoned<__half>(64), 12, 3000, 1, shape, nullptr, nullptr, nullptr).ok());
  EXPECT_FALSE(cuda::SelectTopBlocks(Poisoned<__half>(64), 8, 130000, 1, shape, nullptr, nullptr, nullptr).ok());
}

// Stage 2 over the GPU's own lists (and dense causal) against AttendBlocks. 6200: rows on both
// sides of the first with chosen blocks (b_q 96). 110000: the chosen blocks in two launches (a
// range of blocks at dim 128 fills three quarters of a 50 MiB L2 at 1200 blocks), the state
// carried between them in f16. 3000 with 4 heads a group: rows of the warpgroup form (dim 128 on
// Hopper) past the group's heads. Top-k 40 and 64: lists of more than one warp's width.
TEST_F(GpuTest, BlockSparseAttentionMatchesCpu) {
  for (auto [L, T, heads, kv_heads, dim, topk] :
       {std::tuple{200, 200, 4, 2, 64, 8}, {1500, 40, 4, 2, 64, 8}, {1501, 1, 4, 2, 64, 8},
        {2100, 100, 32, 2, 128, 8}, {3000, 50, 8, 2, 128, 8}, {6200, 100, 4, 2, 64, 8},
        {6200, 30, 4, 2, 64, 40}, {9000, 17, 32, 2, 128, 8}, {110000, 9, 32, 2, 128, 8},
        {110000, 5, 32, 2, 128, 64}}) {
    SparseFixture f(L, heads, kv_heads, dim, 50, topk);
    const auto q = Random(T * heads * dim, 51, 1.0f, true);  // bf16, as a prefill gives them
    const int S = f.shape.selected_blocks, G = heads / kv_heads;
    const int64_t first = L - T;
    int* blocks = Poisoned<int>(size_t(T) * kv_heads * S);
    int* counts = Poisoned<int>(size_t(T) * kv_heads);
    cuda::SparseScratch scratch;
    const __nv_bfloat16* dq = Bf16ToDevice(q);
    ASSERT_TRUE(cuda::SelectSparseBlocks(dq, first, T, f.view(), f.shape, blocks, counts, scratch, nullptr).ok());
    std::vector<int> gb(size_t(T) * kv_heads * S), gc(size_t(T) * kv_heads);
    cudaMemcpy(gb.data(), blocks, gb.size() * 4, cudaMemcpyDeviceToHost);
    cudaMemcpy(gc.data(), counts, gc.size() * 4, cudaMemcpyDeviceToHost);
    for (bool sparse : {false, true}) {
      std::vector<float> ref(T * heads * dim);
      for (int64_t t = 0; t < T; ++t)
        for (int g = 0; g < kv_heads; ++g) {
          std::vector<int64_t> list;
          if (sparse) {
            const int* b = gb.data() + (t * kv_heads + g) * S;
            list.assign(b, b + gc[t * kv_heads + g]);
          } else {
            for (int64_t b = 0; b <= (first + t) / 64; ++b) list.push_back(b);
          }
          const size_t at = (t * heads + g * G) * dim;
          cpu::AttendBlocks(f.c, f.cache, q.data() + at, g, first + t, list, ref.data() + at);
        }
      // Without a gate, and with one (the output times sigmoid(z), in bf16 either way).
      const auto z = Random(ref.size(), 52, 2.0f, true);
      std::vector<float> gated(ref.size());
      for (size_t i = 0; i < ref.size(); ++i) gated[i] = ref[i] * cpu::Sigmoid(z[i]);
      for (bool with_gate : {false, true}) {
        __nv_bfloat16* o = Poisoned<__nv_bfloat16>(ref.size());
        ASSERT_TRUE(cuda::BlockSparseAttention(dq, first, T, f.view(), f.shape, sparse ? blocks : nullptr,
                                               with_gate ? Bf16ToDevice(z) : nullptr, o, scratch, nullptr)
                        .ok());
        EXPECT_LT(testing::RelativeError(FromDeviceBf16(o, ref.size()), with_gate ? gated : ref), 1e-2)
            << "L " << L << " T " << T << " topk " << topk << " sparse " << sparse << " gate " << with_gate;
      }
    }
  }
  // Lists longer than the chosen-blocks kernel keeps in shared memory are refused.
  const cuda::SparseShape wide{32, 2, 128, 64, 32, 16, 1, 2, 5000};
  cuda::SparseScratch scratch;
  EXPECT_EQ(cuda::BlockSparseAttention(nullptr, 0, 1, cuda::SparseCacheView{}, wide, nullptr, nullptr, nullptr,
                                       scratch, nullptr)
                .code(),
            absl::StatusCode::kInvalidArgument);
}

// Decode: one row per sequence, sequences of different lengths, sparse and dense rows mixed;
// sparse rows attend the blocks the GPU's stage 1 chose for them.
TEST_F(GpuTest, SparseAttentionRowsMatchesCpu) {
  const int heads = 32, kv_heads = 2, dim = 128, G = heads / kv_heads;
  std::vector<std::unique_ptr<SparseFixture>> seqs;
  std::vector<cuda::SparseCacheView> views;
  std::vector<int64_t> positions;
  bool flags[4] = {false, true, true, false};
  // 20000: stage 1 split over 10 thread blocks per row and group, its k2 pass over 5 of them.
  const int64_t lengths[4] = {300, 1501, 20000, 2000};
  for (int i = 0; i < 4; ++i) {
    seqs.push_back(std::make_unique<SparseFixture>(lengths[i], heads, kv_heads, dim, 60 + i));
    views.push_back(seqs.back()->view());
    positions.push_back(lengths[i] - 1);
  }
  const auto q = Random(4 * heads * dim, 70, 1.0f);
  float* dq = ToDevice(q);
  const int S = seqs[0]->shape.selected_blocks;
  int* blocks = Poisoned<int>(4 * kv_heads * S);
  int* counts = Poisoned<int>(4 * kv_heads);
  cuda::SparseScratch scratch;
  ASSERT_TRUE(cuda::SelectSparseBlocksRows(dq, 4, ToDevice(views), ToDevice(positions), 19999, seqs[0]->shape, blocks,
                                           counts, scratch, nullptr)
                  .ok());
  std::vector<int> gb(4 * kv_heads * S), gc(4 * kv_heads);
  cudaMemcpy(gb.data(), blocks, gb.size() * 4, cudaMemcpyDeviceToHost);
  cudaMemcpy(gc.data(), counts, gc.size() * 4, cudaMemcpyDeviceToHost);
  // Row by row, the lists are SelectBlocks', up to near-ties. (The one-sequence entry point runs
  // another kernel on Hopper, which sums the heads in another order.)
  for (int i = 0; i < 4; ++i) {
    if (!flags[i]) continue;
    for (int g = 0; g < kv_heads; ++g)
      ExpectBlocksUpToTies(*seqs[i], q.data() + (size_t(i) * heads + g * G) * dim, g, positions[i],
                           gb.data() + (i * kv_heads + g) * S, gc[i * kv_heads + g], "row " + std::to_string(i));
  }
  std::vector<float> ref(q.size());
  for (int i = 0; i < 4; ++i)
    for (int g = 0; g < kv_heads; ++g) {
      std::vector<int64_t> list;
      if (flags[i]) list.assign(gb.begin() + (i * kv_heads + g) * S, gb.begin() + (i * kv_heads + g) * S + gc[i * kv_heads + g]);
      else for (int64_t b = 0; b <= positions[i] / 64; ++b) list.push_back(b);
      const size_t at = (size_t(i) * heads + g * G) * dim;
      cpu::AttendBlocks(seqs[i]->c, seqs[i]->cache, q.data() + at, g, positions[i], list, ref.data() + at);
    }
  float* o = Poisoned<float>(ref.size());
  const std::vector<unsigned char> sparse_rows(flags, flags + 4);
  ASSERT_TRUE(cuda::SparseAttentionRows(dq, 4, ToDevice(views), ToDevice(positions), ToDevice(sparse_rows), blocks,
                                        counts, seqs[0]->shape, o, scratch, nullptr)
                  .ok());
  EXPECT_LT(testing::RelativeError(FromDevice(o, ref.size()), ref), 1e-3);
}

TEST_F(GpuTest, DrawTokensMatchesCpu) {
  // Greedy, plain temperature, top-k (also 1 and beyond the vocabulary), top-p (also tiny),
  // both together; logits distinct and bf16-rounded (many ties at the cuts).
  const std::vector<TokenDraw> kinds = {{0.0f, 0, 1.0f}, {0.9f, 0, 1.0f},   {0.7f, 50, 1.0f},  {1.0f, 1, 1.0f},
                                        {1.2f, 0, 0.9f}, {1.0f, 0, 1e-6f}, {0.8f, 40, 0.8f}, {1.0f, 1 << 20, 0.5f}};
  std::mt19937_64 rng(5);
  std::uniform_real_distribution<double> uniform(0.0, 1.0);
  for (int vocab : {7, 1000, 73448}) {
    for (bool ties : {false, true}) {
      std::vector<TokenDraw> draws;
      for (const TokenDraw& k : kinds)
        for (int r = 0; r < 4; ++r) {
          draws.push_back(k);
          draws.back().u = uniform(rng);
        }
      const int rows = int(draws.size());
      const auto logits = Random(size_t(rows) * vocab, 40 + vocab, 3.0f, ties);
      int* tokens = Poisoned<int>(rows);
      ASSERT_TRUE(cuda::DrawTokens(ToDevice(logits), rows, vocab, ToDevice(draws), tokens, nullptr).ok());
      std::vector<int> got(rows);
      ASSERT_EQ(cudaMemcpy(got.data(), tokens, rows * sizeof(int), cudaMemcpyDeviceToHost), cudaSuccess);
      for (int r = 0; r < rows; ++r) {
        const std::span<const float> row(logits.data() + size_t(r) * vocab, vocab);
        EXPECT_EQ(got[r], DrawToken(row, draws[r]))
            << "vocab " << vocab << " ties " << ties << " T " << draws[r].temperature << " top_k " << draws[r].top_k
            << " top_p " << draws[r].top_p << " u " << draws[r].u;
      }
    }
  }
}

}  // namespace
}  // namespace sala

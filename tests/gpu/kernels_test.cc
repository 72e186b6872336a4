// Every CUDA kernel against the CPU backend's op on fresh random inputs; device outputs are
// poisoned (NaN) before each run so that an unwritten element cannot pass.
#include <cuda_runtime.h>

#include <random>

#include "cpu/cpu_ops.h"
#include "cuda/cuda_common.h"
#include "cuda/gemm.h"
#include "cuda/lightning.h"
#include "cuda/ops.h"
#include "cuda/sparse.h"
#include "gtest/gtest.h"
#include "test_util.h"
#include "sala/safetensors.h"

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

std::vector<float> FromDeviceBf16(const __nv_bfloat16* p, size_t n) {
  std::vector<uint16_t> h(n);
  EXPECT_EQ(cudaMemcpy(h.data(), p, n * 2, cudaMemcpyDeviceToHost), cudaSuccess);
  std::vector<float> v(n);
  for (size_t i = 0; i < n; ++i) v[i] = Bf16ToF32(h[i]);
  return v;
}

TEST_F(GpuTest, RmsNormMatchesCpu) {
  for (int width : {256, 4096}) {
    const int rows = 7;
    auto x = Random(rows * width, 1, 3.0f), w = Random(width, 2, 1.0f, true);
    std::vector<float> ref(x.size());
    cpu::RmsNorm(x.data(), rows, width, w.data(), 1e-6, ref.data());
    auto* out = Poisoned<__nv_bfloat16>(x.size());
    ASSERT_TRUE(cuda::RmsNormToBf16(ToDevice(x), rows, width, Bf16ToDevice(w), 1e-6f, 1.0f, out, nullptr).ok());
    EXPECT_LT(testing::RelativeError(FromDeviceBf16(out, x.size()), ref), 1e-2) << width;
  }
}

TEST_F(GpuTest, HeadNormRopeMatchesCpuAtLargePositions) {
  for (int dim : {64, 128}) {
    const int rows = 5, heads = 3;
    const int64_t pos0 = 1000000;
    auto x = Random(rows * heads * dim, 3, 2.0f), w = Random(dim, 4, 1.0f, true);
    std::vector<float> ref(x.size());
    cpu::RmsNorm(x.data(), rows * heads, dim, w.data(), 1e-6, ref.data());
    cpu::Rope(ref.data(), rows, heads, dim, pos0, 10000.0);
    float* d = ToDevice(x);
    ASSERT_TRUE(cuda::HeadNormRope(d, rows, heads, dim, Bf16ToDevice(w), 1e-6f, pos0, 10000.0, true, nullptr).ok());
    EXPECT_LT(testing::RelativeError(FromDevice(d, x.size()), ref), 1e-4) << dim;
  }
}

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
  }
}

TEST_F(GpuTest, LinearAttentionChunkedMatchesCpu) {
  for (auto [T, H, Hk, D] : {std::tuple{1, 4, 4, 64}, {63, 4, 2, 64}, {64, 4, 4, 64}, {65, 4, 4, 128},
                             {300, 8, 8, 128}}) {
    const auto slopes = LinearDecaySlopes(H);
    std::vector<float> fslopes(slopes.begin(), slopes.end());
    auto q = Random(T * H * D, 7), k = Random(T * Hk * D, 8), v = Random(T * Hk * D, 9);
    auto s0 = Random(size_t(H) * D * D, 10, 0.1f);
    std::vector<float> ref_state = s0, ref_o(T * H * D);
    const double scale = 1.0 / std::sqrt(double(D));
    cpu::LinearAttentionChunked({H, Hk, D, scale, &slopes}, q.data(), k.data(), v.data(), T, 64, ref_state.data(),
                                ref_o.data());
    float* state = ToDevice(s0);
    float* o = Poisoned<float>(ref_o.size());
    cuda::DeviceBuffer<float> scratch;
    ASSERT_TRUE(cuda::LinearAttentionChunked(ToDevice(q), ToDevice(k), ToDevice(v), T, H, Hk, D, float(scale),
                                             ToDevice(fslopes), state, o, scratch, nullptr)
                    .ok());
    EXPECT_LT(testing::RelativeError(FromDevice(o, ref_o.size()), ref_o), 1e-4) << T << " " << H << " " << Hk << " " << D;
    EXPECT_LT(testing::RelativeError(FromDevice(state, ref_state.size()), ref_state), 1e-4);
  }
}

TEST_F(GpuTest, LinearAttentionStepMatchesCpuForABatch) {
  const int B = 3, H = 4, Hk = 2, D = 128;
  const auto slopes = LinearDecaySlopes(H);
  std::vector<float> fslopes(slopes.begin(), slopes.end());
  auto q = Random(B * H * D, 11), k = Random(B * Hk * D, 12), v = Random(B * Hk * D, 13);
  std::vector<float*> states;
  std::vector<std::vector<float>> ref_states;
  std::vector<float> ref_o(B * H * D);
  for (int b = 0; b < B; ++b) {
    auto s = Random(size_t(H) * D * D, 20 + b, 0.1f);
    states.push_back(ToDevice(s));
    ref_states.push_back(s);
    cpu::LinearAttentionStep({H, Hk, D, 1.0 / std::sqrt(128.0), &slopes}, q.data() + b * H * D,
                             k.data() + b * Hk * D, v.data() + b * Hk * D, ref_states[b].data(), ref_o.data() + b * H * D);
  }
  float* o = Poisoned<float>(ref_o.size());
  ASSERT_TRUE(cuda::LinearAttentionStep(ToDevice(q), ToDevice(k), ToDevice(v), B, H, Hk, D, float(1.0 / std::sqrt(128.0)),
                                        ToDevice(fslopes), ToDevice(states), o, nullptr)
                  .ok());
  EXPECT_LT(testing::RelativeError(FromDevice(o, ref_o.size()), ref_o), 1e-4);
  for (int b = 0; b < B; ++b) EXPECT_LT(testing::RelativeError(FromDevice(states[b], ref_states[b].size()), ref_states[b]), 1e-4);
}

// A sparse config like the built-in model's; the cache holds bf16-exact keys and values.
ModelConfig SmallSparseConfig(int heads, int kv_heads, int dim) {
  ModelConfig c;
  c.hidden_size = heads * dim;
  c.num_heads = heads;
  c.num_kv_heads = kv_heads;
  c.sparse.block_size = 64;
  c.sparse.kernel_size = 32;
  c.sparse.kernel_stride = 16;
  c.sparse.init_blocks = 1;
  c.sparse.topk = 8;
  c.sparse.window_size = 128;
  return c;
}

TEST_F(GpuTest, SparseAttentionMatchesCpu) {
  for (auto [L, T, heads, kv_heads, dim] : {std::tuple{200, 200, 4, 2, 64}, {1500, 40, 4, 2, 64},
                                            {1501, 1, 4, 2, 64}, {2100, 64, 32, 2, 128}}) {
    const ModelConfig c = SmallSparseConfig(heads, kv_heads, dim);
    const size_t row = size_t(kv_heads) * dim;
    SparseLayerCache cache;
    cache.k = Random(L * row, 30, 1.0f, true);
    cache.v = Random(L * row, 31, 1.0f, true);
    UpdateCompressedKeys(c, L, cache);
    auto q = Random(T * heads * dim, 32, 1.0f);
    const int64_t first = L - T;
    // Compressed keys from the bf16 cache, on the GPU.
    auto* k = Bf16ToDevice(cache.k);
    const int64_t n1 = int64_t(cache.k1.size() / row), n2 = int64_t(cache.k2.size() / row);
    float* k1 = Poisoned<float>(std::max<int64_t>(n1, 1) * row);
    float* k2 = Poisoned<float>(std::max<int64_t>(n2, 1) * row);
    ASSERT_TRUE(cuda::CompressKeys(k, kv_heads, dim, 0, n1, 32, 16, k1, nullptr).ok());
    ASSERT_TRUE(cuda::CompressKeys(k, kv_heads, dim, 0, n2, 128, 64, k2, nullptr).ok());
    EXPECT_LT(testing::RelativeError(FromDevice(k1, n1 * row), cache.k1), 1e-5);
    if (n2) EXPECT_LT(testing::RelativeError(FromDevice(k2, n2 * row), cache.k2), 1e-5);
    const cuda::SparseShape shape{heads, kv_heads, dim, 64, 32, 16, 1, 2, 10};
    for (bool sparse : {false, true}) {
      std::vector<float> ref(T * heads * dim);
      cpu::SparseLayerAttention(c, cache, q.data(), first, T, sparse, ref.data());
      float* o = Poisoned<float>(ref.size());
      cuda::SparseScratch scratch;
      ASSERT_TRUE(cuda::SparseAttention(ToDevice(q), first, T, {k, Bf16ToDevice(cache.v), k1, k2}, shape, sparse, o,
                                        scratch, nullptr)
                      .ok());
      EXPECT_LT(testing::RelativeError(FromDevice(o, ref.size()), ref), 1e-3) << "L " << L << " T " << T << " sparse " << sparse;
    }
  }
}

}  // namespace
}  // namespace sala

#include "cpu_ops.h"

#include <omp.h>

#include <algorithm>
#include <cmath>
#include <limits>

namespace sala::cpu {
namespace {

float Dot(const float* a, const float* b, int64_t n) {
  float acc = 0.0f;
#pragma omp simd reduction(+ : acc)
  for (int64_t i = 0; i < n; ++i) acc += a[i] * b[i];
  return acc;
}

void Axpy(float a, const float* x, float* y, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

}  // namespace

void Gemm(const float* x, int64_t rows, int64_t in, const float* w, int64_t out, float* y) {
  // Tiles of 32 rows x 64 outputs keep both operands in cache.
  constexpr int64_t kRowTile = 32, kOutTile = 64;
  const int64_t row_tiles = (rows + kRowTile - 1) / kRowTile;
  const int64_t out_tiles = (out + kOutTile - 1) / kOutTile;
#pragma omp parallel for collapse(2) schedule(static) if (rows * out * in > (1 << 16))
  for (int64_t rt = 0; rt < row_tiles; ++rt)
    for (int64_t ot = 0; ot < out_tiles; ++ot)
      for (int64_t r = rt * kRowTile; r < std::min(rows, (rt + 1) * kRowTile); ++r)
        for (int64_t o = ot * kOutTile; o < std::min(out, (ot + 1) * kOutTile); ++o)
          y[r * out + o] = Dot(x + r * in, w + o * in, in);
}

void RmsNorm(const float* x, int64_t rows, int64_t width, const float* weight, double eps, float* y) {
#pragma omp parallel for schedule(static) if (rows * width > (1 << 16))
  for (int64_t r = 0; r < rows; ++r) {
    const float* xr = x + r * width;
    double ss = 0.0;
    for (int64_t i = 0; i < width; ++i) ss += double(xr[i]) * xr[i];
    const float inv = float(1.0 / std::sqrt(ss / width + eps));
    for (int64_t i = 0; i < width; ++i) y[r * width + i] = xr[i] * inv * weight[i];
  }
}

void Rope(float* x, int64_t rows, int heads, int dim, int64_t pos0, double theta) {
  const int half = dim / 2;
  std::vector<double> inv_freq(half);
  for (int j = 0; j < half; ++j) inv_freq[j] = std::pow(theta, -2.0 * j / dim);
#pragma omp parallel for schedule(static) if (rows > 64)
  for (int64_t r = 0; r < rows; ++r) {
    // Angles in double: at a million positions fp32 angles are off by whole hundredths.
    for (int j = 0; j < half; ++j) {
      const double angle = double(pos0 + r) * inv_freq[j];
      const float c = float(std::cos(angle)), s = float(std::sin(angle));
      for (int h = 0; h < heads; ++h) {
        float* p = x + (r * heads + h) * dim;
        const float a = p[j], b = p[j + half];
        p[j] = a * c - b * s;
        p[j + half] = b * c + a * s;
      }
    }
  }
}

float Sigmoid(float x) { return 1.0f / (1.0f + std::exp(-x)); }
float Silu(float x) { return x * Sigmoid(x); }

void LinearAttentionChunked(const LinearAttentionShape& sh, const float* q, const float* k,
                            const float* v, int64_t T, int chunk, float* state, float* o) {
  const int H = sh.heads, D = sh.dim, group = sh.heads / sh.kv_heads;
  const float s = float(sh.scale);
#pragma omp parallel for schedule(static)
  for (int h = 0; h < H; ++h) {
    const int kh = h / group;
    const double g = -(*sh.slopes)[h];
    float* S = state + int64_t(h) * D * D;  // [key dim, value dim]
    for (int64_t t0 = 0; t0 < T; t0 += chunk) {
      const int c = int(std::min<int64_t>(chunk, T - t0));
      for (int i = 0; i < c; ++i) {
        const float* qi = q + ((t0 + i) * H + h) * D;
        float* oi = o + ((t0 + i) * H + h) * D;
        // Inter-chunk part: exp(G_i) · s · q_i · S_in, G_i = g·(i+1).
        const float decay_in = float(std::exp(g * (i + 1)));
        std::fill(oi, oi + D, 0.0f);
        for (int a = 0; a < D; ++a) Axpy(decay_in * s * qi[a], S + int64_t(a) * D, oi, D);
        // Intra-chunk part: Σ_{j≤i} s (q_i·k_j) exp(G_i − G_j) v_j.
        for (int j = 0; j <= i; ++j) {
          const float* kj = k + ((t0 + j) * sh.kv_heads + kh) * D;
          const float* vj = v + ((t0 + j) * sh.kv_heads + kh) * D;
          Axpy(s * Dot(qi, kj, D) * float(std::exp(g * (i - j))), vj, oi, D);
        }
      }
      // S_out = exp(G_{c−1}) S_in + Σ_j exp(G_{c−1} − G_j) k_jᵀ v_j.
      const float decay_all = float(std::exp(g * c));
      for (int64_t e = 0; e < int64_t(D) * D; ++e) S[e] *= decay_all;
      for (int j = 0; j < c; ++j) {
        const float* kj = k + ((t0 + j) * sh.kv_heads + kh) * D;
        const float* vj = v + ((t0 + j) * sh.kv_heads + kh) * D;
        const float w = float(std::exp(g * (c - 1 - j)));
        for (int a = 0; a < D; ++a) Axpy(w * kj[a], vj, S + int64_t(a) * D, D);
      }
    }
  }
}

void LinearAttentionStep(const LinearAttentionShape& sh, const float* q, const float* k,
                         const float* v, float* state, float* o) {
  const int H = sh.heads, D = sh.dim, group = sh.heads / sh.kv_heads;
  for (int h = 0; h < H; ++h) {
    const int kh = h / group;
    const float decay = float(std::exp(-(*sh.slopes)[h]));
    float* S = state + int64_t(h) * D * D;
    const float* kh_ = k + int64_t(kh) * D;
    const float* vh = v + int64_t(kh) * D;
    // S = exp(g) S + kᵀ v, then o = s q S (the current token included).
    for (int a = 0; a < D; ++a) {
      float* row = S + int64_t(a) * D;
      for (int b = 0; b < D; ++b) row[b] = decay * row[b] + kh_[a] * vh[b];
    }
    float* oh = o + int64_t(h) * D;
    std::fill(oh, oh + D, 0.0f);
    for (int a = 0; a < D; ++a) Axpy(float(sh.scale) * q[int64_t(h) * D + a], S + int64_t(a) * D, oh, D);
  }
}

std::vector<int64_t> SelectBlocks(const ModelConfig& config, const SparseLayerCache& cache,
                                  const float* q, int kv_head, int64_t pos,
                                  std::vector<float>* scores_out) {
  const SparseConfig& sc = config.sparse;
  const int hd = config.sparse_head_dim(), Hkv = config.num_kv_heads, group = config.sparse_group();
  const float scale = 1.0f / std::sqrt(float(hd));
  const float inf = std::numeric_limits<float>::infinity();
  const int64_t n1 = SequenceState::NumK1(sc, pos + 1), n2 = SequenceState::NumK2(sc, pos + 1);
  // S(j) = Σ_h exp(q_h·k1_j·scale − lse_h), lse over the visible k2 entries.
  std::vector<float> S(n1, 0.0f);
  if (n2 > 0) {
    for (int h = 0; h < group; ++h) {
      const float* qh = q + int64_t(h) * hd;
      double m = -inf, sum = 0.0;
      std::vector<float> l2(n2);
      for (int64_t j = 0; j < n2; ++j) {
        l2[j] = Dot(qh, cache.k2.data() + (j * Hkv + kv_head) * hd, hd) * scale;
        m = std::max<double>(m, l2[j]);
      }
      for (int64_t j = 0; j < n2; ++j) sum += std::exp(l2[j] - m);
      const double lse = m + std::log(sum);
      for (int64_t j = 0; j < n1; ++j)
        S[j] += float(std::exp(Dot(qh, cache.k1.data() + (j * Hkv + kv_head) * hd, hd) * scale - lse));
    }
  }
  // Block scores: forced init and local blocks, else the max of the overlapping k1 entries.
  const int64_t bq = pos / sc.block_size;
  const int64_t per_block = sc.block_size / sc.kernel_stride;
  const int64_t lead = sc.kernel_size / sc.kernel_stride - 1;
  std::vector<float> score(bq + 1, -inf);
  for (int64_t b = 0; b <= bq; ++b) {
    if (b < sc.init_blocks || b >= bq - sc.window_blocks()) {
      score[b] = inf;
      continue;
    }
    for (int64_t j = std::max<int64_t>(0, b * per_block - lead); j < std::min(n1, (b + 1) * per_block); ++j)
      score[b] = std::max(score[b], S[j]);
  }
  std::vector<int64_t> order = ChooseBlocks(score, sc.selected_blocks());
  if (scores_out) *scores_out = std::move(score);
  return order;
}

std::vector<int64_t> ChooseBlocks(std::span<const float> score, int selected) {
  std::vector<int64_t> order;
  for (int64_t b = 0; b < int64_t(score.size()); ++b)
    if (score[b] > -std::numeric_limits<float>::infinity()) order.push_back(b);
  const size_t keep = std::min<size_t>(order.size(), size_t(selected));
  std::partial_sort(order.begin(), order.begin() + keep, order.end(), [&](int64_t a, int64_t b) {
    return score[a] != score[b] ? score[a] > score[b] : a < b;
  });
  order.resize(keep);
  std::sort(order.begin(), order.end());
  return order;
}

void AttendBlocks(const ModelConfig& config, const SparseLayerCache& cache, const float* q, int kv_head,
                  int64_t pos, std::span<const int64_t> blocks, float* o) {
  const int hd = config.sparse_head_dim(), Hkv = config.num_kv_heads, group = config.sparse_group();
  const int64_t block = config.sparse.block_size;
  const float scale = 1.0f / std::sqrt(float(hd));
  std::vector<int64_t> keys;
  for (int64_t b : blocks)
    for (int64_t k = b * block; k < std::min(pos + 1, (b + 1) * block); ++k) keys.push_back(k);
  std::vector<float> logits(keys.size());
  for (int hh = 0; hh < group; ++hh) {
    const float* qh = q + int64_t(hh) * hd;
    float m = -std::numeric_limits<float>::infinity();
    for (size_t i = 0; i < keys.size(); ++i) {
      logits[i] = Dot(qh, cache.k.data() + (keys[i] * Hkv + kv_head) * hd, hd) * scale;
      m = std::max(m, logits[i]);
    }
    double denom = 0.0;
    for (float& l : logits) {
      l = std::exp(l - m);
      denom += l;
    }
    float* oh = o + int64_t(hh) * hd;
    std::fill(oh, oh + hd, 0.0f);
    for (size_t i = 0; i < keys.size(); ++i)
      Axpy(float(logits[i] / denom), cache.v.data() + (keys[i] * Hkv + kv_head) * hd, oh, hd);
  }
}

void SparseLayerAttention(const ModelConfig& config, const SparseLayerCache& cache,
                          const float* q, int64_t first, int64_t T, bool sparse, float* o) {
  const int H = config.num_heads, hd = config.sparse_head_dim(), Hkv = config.num_kv_heads;
  const int group = config.sparse_group();
  const int64_t block = config.sparse.block_size;
#pragma omp parallel for schedule(dynamic, 4)
  for (int64_t t = 0; t < T; ++t) {
    const int64_t pos = first + t;
    std::vector<int64_t> blocks;
    for (int g = 0; g < Hkv; ++g) {
      const float* qg = q + (t * H + int64_t(g) * group) * hd;
      if (sparse) {
        blocks = SelectBlocks(config, cache, qg, g, pos);
      } else {
        blocks.resize(pos / block + 1);
        for (size_t b = 0; b < blocks.size(); ++b) blocks[b] = int64_t(b);
      }
      AttendBlocks(config, cache, qg, g, pos, blocks, o + (t * H + int64_t(g) * group) * hd);
    }
  }
}

}  // namespace sala::cpu

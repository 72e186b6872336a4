// GemmSwiGluKernel: a thread block computes a 128-row by 128-column tile of y from the matching
// 128 columns of both gate and up, i.e. a 128 x 256 product, so that every thread holds a gate
// value and its up partner in its own accumulators. Warpgroup 0 is the producer: one thread
// feeds a ring of kStages shared-memory stages by TMA (x's 128 x 64 box, then gate's and up's
// 128 x 64 boxes stacked as one 256-row B operand). Warpgroups 1 and 2 each take 64 of the rows
// with m64n256k16 MMAs (128 fp32 accumulators a thread) and free a stage once the MMAs that read
// it have completed. Blocks run in clusters of two over neighbouring row tiles of one column
// tile: each loads half of the weights' boxes for both (TMA multicast), a third less L2 traffic
// a block, and a stage is free once the consumers of both blocks are done with it. Tiles run in
// groups of kGroupRows row tiles down each column tile, so that a wave of blocks reads some
// 16 MB of x and of the weights, which stay in L2.
#include "gemm_swiglu.h"

#include <algorithm>
#include <map>
#include <mutex>

#include "activation.cuh"
#include "cuda_common.h"
#include "driver_api.h"
#include "sala/status_macros.h"
#include "wgmma.cuh"

namespace sala::cuda {
namespace {

using Bf16 = __nv_bfloat16;

constexpr int kTileRows = 128, kTileCols = 128, kTileK = 64, kStages = 4, kCluster = 2;
constexpr int kThreads = 384;
constexpr int kABytes = kTileRows * kTileK * 2, kBBytes = 2 * kTileCols * kTileK * 2;
constexpr int kStageBytes = kABytes + kBBytes;
constexpr size_t kSmemBytes = 1024 + size_t(kStages) * kStageBytes + 2 * kStages * sizeof(uint64_t);

struct SwiGluParams {
  int64_t rows;
  int ff, k_tiles, row_tiles, cluster_tiles;
  Bf16* y;
};

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
constexpr int kGroupRows = 16;

// Tile order: groups of kGroupRows row tiles, each group column tile by column tile, the
// kCluster blocks of a cluster on neighbouring row tiles (past the last row tile, a block only
// loads its share of the weights). `tile` counts blocks' tiles in that order.
__device__ __forceinline__ void TileOf(const SwiGluParams& p, int tile, int& row_tile, int& col_tile) {
  const int cluster = tile / kCluster, rank = tile % kCluster;
  const int col_tiles = p.ff / kTileCols, group_clusters = kGroupRows / kCluster;
  const int row_clusters = (p.row_tiles + kCluster - 1) / kCluster;
  const int group = cluster / (group_clusters * col_tiles), in_group = cluster % (group_clusters * col_tiles);
  const int clusters_here = min(group_clusters, row_clusters - group * group_clusters);
  row_tile = (group * group_clusters + in_group % clusters_here) * kCluster + rank;
  col_tile = in_group / clusters_here;
}
#endif

// Persistent: cluster c takes the clusters' tiles c, c + clusters, ...; the producer runs ahead
// into the next tile while the consumers finish one.
__global__ void __launch_bounds__(kThreads, 1)
    GemmSwiGluKernel(SwiGluParams p, const __grid_constant__ CUtensorMap x_map,
                     const __grid_constant__ CUtensorMap gate_map, const __grid_constant__ CUtensorMap up_map) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
  extern __shared__ unsigned char smem_raw[];
  unsigned char* smem =
      reinterpret_cast<unsigned char*>((reinterpret_cast<uintptr_t>(smem_raw) + 1023) & ~uintptr_t(1023));
  uint64_t* full = reinterpret_cast<uint64_t*>(smem + kStages * kStageBytes);
  uint64_t* empty = full + kStages;
  auto a_stage = [&](int s) { return smem + s * kStageBytes; };
  auto b_stage = [&](int s) { return smem + s * kStageBytes + kABytes; };

  const uint32_t rank = ClusterRank();
  const int first_tile = blockIdx.x / kCluster, tile_step = gridDim.x / kCluster;
  if (threadIdx.x == 0) {
    for (int s = 0; s < kStages; ++s) {
      MbarInit(&full[s], 1);
      MbarInit(&empty[s], 2 * kCluster);  // each consumer warpgroup of the cluster
    }
    FenceMbarInit();
  }
  ClusterSync();  // the peer's barriers are set before any multicast or arrival reaches them

  const int wg = threadIdx.x / 128;
  if (wg == 0) {
    asm volatile("setmaxnreg.dec.sync.aligned.u32 40;\n");
    if (threadIdx.x == 0) {
      // Rank 0 loads the gate box for both blocks, rank 1 the up box.
      const CUtensorMap* w_map = rank == 0 ? &gate_map : &up_map;
      int it = 0;  // k tiles loaded so far, over all tiles
      for (int t = first_tile; t < p.cluster_tiles; t += tile_step) {
        int row_tile, col_tile;
        TileOf(p, t * kCluster + int(rank), row_tile, col_tile);
        for (int kt = 0; kt < p.k_tiles; ++kt, ++it) {
          const int s = it % kStages;
          if (it >= kStages) MbarWait(&empty[s], ((it / kStages) - 1) & 1);
          MbarArriveExpectTx(&full[s], kStageBytes);
          TmaLoad2d(a_stage(s), &x_map, kt * kTileK, row_tile * kTileRows, &full[s]);
          TmaLoad2dMulticast(b_stage(s) + rank * (kBBytes / 2), w_map, kt * kTileK, col_tile * kTileCols,
                             &full[s], (1u << kCluster) - 1);
        }
      }
    }
  } else {
    asm volatile("setmaxnreg.inc.sync.aligned.u32 232;\n");
    const int half = wg - 1;  // rows 64 half .. of the tile
    const int warp = (threadIdx.x % 128) / 32, lane = threadIdx.x % 32;
    // Frees stage s in both blocks once this warpgroup's MMAs that read it are done.
    auto release = [&](int s) {
      if (threadIdx.x % 128 == 0)
        for (int r = 0; r < kCluster; ++r) MbarArriveCluster(&empty[s], r);
    };
    float acc[128];
    int it = 0;
    for (int t = first_tile; t < p.cluster_tiles; t += tile_step) {
      int row_tile, col_tile;
      TileOf(p, t * kCluster + int(rank), row_tile, col_tile);
      for (int kt = 0; kt < p.k_tiles; ++kt, ++it) {
        const int s = it % kStages;
        MbarWait(&full[s], (it / kStages) & 1);
        const uint32_t a_desc = Sw128Descriptor(a_stage(s) + half * 64 * 128), b_desc = Sw128Descriptor(b_stage(s));
        WgmmaFence();
#pragma unroll
        for (int kk = 0; kk < kTileK / 16; ++kk)  // 32 bytes a k step, in the descriptors' 16-byte units
          WgmmaM64N256K16(acc, a_desc + 2 * kk, b_desc + 2 * kk, kt > 0 || kk > 0);
        WgmmaCommit();
        WgmmaWait<1>();  // the previous stage's MMAs are done
        if (kt > 0) release((it - 1) % kStages);
      }
      WgmmaWait<0>();
      WgmmaFenceOperands(acc);
      release((it - 1) % kStages);

      // Register 4 n + c holds row 16 w + g + 8 (c / 2), column 8 n + 2 t + c % 2: gate for
      // n < 16, its up partner at n + 16.
      const int64_t row0 = int64_t(row_tile) * kTileRows + half * 64 + warp * 16 + lane / 4;
      const int col0 = col_tile * kTileCols + 2 * (lane % 4);
#pragma unroll
      for (int r = 0; r < 2; ++r) {
        const int64_t row = row0 + 8 * r;
        if (row >= p.rows) continue;
        Bf16* out = p.y + row * p.ff + col0;
#pragma unroll
        for (int n = 0; n < 16; ++n) {
          const float g0 = acc[4 * n + 2 * r], g1 = acc[4 * n + 2 * r + 1];
          const float u0 = acc[4 * (n + 16) + 2 * r], u1 = acc[4 * (n + 16) + 2 * r + 1];
          *reinterpret_cast<__nv_bfloat162*>(out + 8 * n) =
              __floats2bfloat162_rn(SiluF(g0) * u0, SiluF(g1) * u1);
        }
      }
    }
  }
  // No block leaves while its peer may still arrive on its barriers. The cluster barrier is
  // .aligned: each warp reconverges first (lane 0 of the producer ran its own loop).
  __syncwarp();
  ClusterSync();
#endif
}

// Clusters that the device runs at once (per device, asked once).
absl::StatusOr<int> ResidentClusters(const cudaLaunchConfig_t& config) {
  static std::mutex mu;
  static std::map<int, int> by_device;
  int device = 0;
  SALA_CUDA_RETURN_IF_ERROR(cudaGetDevice(&device));
  std::lock_guard<std::mutex> lock(mu);
  if (auto it = by_device.find(device); it != by_device.end()) return it->second;
  int clusters = 0;
  SALA_CUDA_RETURN_IF_ERROR(cudaOccupancyMaxActiveClusters(&clusters, GemmSwiGluKernel, &config));
  if (clusters <= 0) return absl::FailedPreconditionError("the fused gate/up GEMM's clusters do not fit on this device");
  by_device[device] = clusters;
  return clusters;
}

}  // namespace

bool GemmSwiGluApplies(int64_t in, int64_t ff) {
  const absl::StatusOr<bool> hopper = HasWgmma();
  return hopper.ok() && *hopper && in % kTileK == 0 && ff % kTileCols == 0 && in > 0 && ff > 0;
}

absl::Status GemmSwiGlu(const Bf16* x, int64_t rows, int64_t in, const Bf16* w_gate, const Bf16* w_up, int64_t ff,
                        Bf16* y, cudaStream_t stream) {
  if (rows == 0) return absl::OkStatus();
  if (!GemmSwiGluApplies(in, ff))
    return absl::FailedPreconditionError("the fused gate/up GEMM needs an sm_90a device, in % 64 == 0, ff % 128 == 0");
  for (const void* ptr : {static_cast<const void*>(x), static_cast<const void*>(w_gate),
                          static_cast<const void*>(w_up), static_cast<const void*>(y)})
    if (reinterpret_cast<uintptr_t>(ptr) % 16 != 0)
      return absl::InvalidArgumentError("the fused gate/up GEMM's operands must be 16-byte aligned");
  const cuuint32_t box[2] = {kTileK, kTileRows};
  SALA_ASSIGN_OR_RETURN(const CUtensorMap x_map,
                        Bf16TensorMap<2>(x, {cuuint64_t(in), cuuint64_t(rows)}, {cuuint64_t(in) * 2}, box));
  SALA_ASSIGN_OR_RETURN(const CUtensorMap gate_map,
                        Bf16TensorMap<2>(w_gate, {cuuint64_t(in), cuuint64_t(ff)}, {cuuint64_t(in) * 2}, box));
  SALA_ASSIGN_OR_RETURN(const CUtensorMap up_map,
                        Bf16TensorMap<2>(w_up, {cuuint64_t(in), cuuint64_t(ff)}, {cuuint64_t(in) * 2}, box));
  SALA_CUDA_RETURN_IF_ERROR(
      cudaFuncSetAttribute(GemmSwiGluKernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(kSmemBytes)));
  const int row_tiles = int((rows + kTileRows - 1) / kTileRows);
  const int cluster_tiles = (row_tiles + kCluster - 1) / kCluster * int(ff / kTileCols);
  const SwiGluParams p{rows, int(ff), int(in / kTileK), row_tiles, cluster_tiles, y};
  cudaLaunchConfig_t config{};
  config.blockDim = dim3(kThreads);
  config.dynamicSmemBytes = kSmemBytes;
  config.stream = stream;
  cudaLaunchAttribute cluster{};
  cluster.id = cudaLaunchAttributeClusterDimension;
  cluster.val.clusterDim = {kCluster, 1, 1};
  config.attrs = &cluster;
  config.numAttrs = 1;
  config.gridDim = dim3(kCluster);  // for the occupancy query
  SALA_ASSIGN_OR_RETURN(const int resident, ResidentClusters(config));
  config.gridDim = dim3(unsigned(std::min(resident, cluster_tiles) * kCluster));
  SALA_CUDA_RETURN_IF_ERROR(cudaLaunchKernelEx(&config, GemmSwiGluKernel, p, x_map, gate_map, up_map));
  return absl::OkStatus();
}

}  // namespace sala::cuda

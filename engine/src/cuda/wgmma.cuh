// Hopper warpgroup tensor-core building blocks (sm_90a only): wgmma.mma_async with both operands
// in shared memory or A in registers, its shared-memory descriptors, and the fences around it;
// and the tensor memory accelerator (TMA) copies with the shared-memory barriers that feed such
// operands, alone or multicast to the blocks of a thread-block cluster.
// Callers compile these only where __CUDA_ARCH_FEAT_SM90_ALL is defined and launch such kernels
// only on compute capability 9.0 (HasWgmma in cuda_common.h); the PTX target of other GPUs never
// reaches them.
//
// Operand layout ("K-major, 128-byte swizzle"): a tile of R rows (the M or N index) by K bf16
// values is stored as K / 64 column slabs of R rows x 64 values (128 bytes a row), slab s at
// element s * R * 64; inside a slab the 16-byte chunk c of row r sits at chunk c ^ (r % 8). Each
// slab must start on a 1024-byte boundary, where the swizzle pattern repeats.
//
// The same tile read N-major (a B operand whose rows are k): its 128-byte rows hold 64 values of
// n, slabs of 64 n values lie the descriptor's leading offset apart, groups of eight k rows 1024
// bytes apart.
//
// A in registers (m64nNk16, f16 or bf16): warp w of the warpgroup holds rows 16 w .. 16 w + 15 as
// the A fragment of mma.sync m16n8k16.
//
// Accumulator of m64nNk16 (warp w of the warpgroup, g = lane / 4, t = lane % 4): register 4 n + c
// holds row 16 w + g + 8 (c / 2), column 8 n + 2 t + c % 2 (the mma.sync C layout, N / 8 times).
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>
#include <type_traits>

#include "mma.cuh"

namespace sala::cuda {

// Element offset of (row, col) in a K-major, 128-byte-swizzled tile of `rows` rows.
__host__ __device__ constexpr int Sw128Offset(int row, int col, int rows) {
  return (col / 64) * rows * 64 + row * 64 + ((((col % 64) / 8) ^ (row % 8)) * 8) + col % 8;
}

#if defined(__CUDA_ARCH_FEAT_SM90_ALL)

// Descriptor of the 64 x 16 (or N x 16) operand slice whose first element is at `p`: the k step
// kk of a tile starts at slab kk / 4, byte 32 (kk % 4) of its rows. Only the low word varies (the
// start address in 16-byte units, and the leading offset, unused with this swizzle: 1, as the PTX
// ISA asks), so callers keep that word and add offsets to it; the high word is
// kSw128DescriptorHigh: 1024 bytes between groups of eight rows, 128-byte swizzle.
constexpr uint32_t kSw128DescriptorHigh = (1024 >> 4) | (1u << 30);
__device__ __forceinline__ uint32_t Sw128Descriptor(const void* p) {
  return ((SmemAddress(p) & 0x3FFFF) >> 4) | (1u << 16);
}

// Orders this thread's generic-proxy writes of shared memory (plain stores, cp.async) before
// later wgmma reads of it; a barrier must follow for other threads' writes.
__device__ __forceinline__ void FenceProxyAsync() { asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory"); }

__device__ __forceinline__ void WgmmaFence() { asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory"); }
__device__ __forceinline__ void WgmmaCommit() { asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}

// Keeps the compiler from moving accesses of accumulator registers across wgmma issue and wait,
// which it cannot see through.
template <int N>
__device__ __forceinline__ void WgmmaFenceOperands(float (&d)[N]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+f"(d[i])::"memory");
}
// The same for A fragments in registers, which an MMA reads until its wait: kept live (and
// unchanged) up to here, so that their registers are not reused while it runs.
template <int N>
__device__ __forceinline__ void WgmmaFenceOperands(uint32_t (&a)[N][4]) {
#pragma unroll
  for (int i = 0; i < N; ++i) asm volatile("" : "+r"(a[i][0]), "+r"(a[i][1]), "+r"(a[i][2]), "+r"(a[i][3])::"memory");
}

// d (+)= A (64 x 16, descriptor a) x B (16 x 64, stored as 64 rows of k: descriptor b), given the
// descriptors' low words; d is overwritten when accumulate is false. bf16 inputs, fp32 accumulation.
__device__ __forceinline__ void WgmmaM64N64K16(float (&d)[32], uint32_t a, uint32_t b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %34, 0;\n"
      "mov.b64 da, {%32, %35};\nmov.b64 db, {%33, %35};\n"
      "wgmma.mma_async.sync.aligned.m64n64k16.f32.bf16.bf16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,"
      "%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, da, db, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]),
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]),
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31])
      : "r"(a), "r"(b), "r"(int(accumulate)), "r"(kSw128DescriptorHigh));
}

// d (+)= A (64 x 16, descriptor a) x B (16 x 256, stored as 256 rows of k: descriptor b), given
// the descriptors' low words (high word kSw128DescriptorHigh); bf16 inputs, fp32 accumulation.
#define SALA_ACC4(i) "+f"(d[i]), "+f"(d[i + 1]), "+f"(d[i + 2]), "+f"(d[i + 3])
#define SALA_ACC16(i) SALA_ACC4(i), SALA_ACC4(i + 4), SALA_ACC4(i + 8), SALA_ACC4(i + 12)
#define SALA_ACC64(i) SALA_ACC16(i), SALA_ACC16(i + 16), SALA_ACC16(i + 32), SALA_ACC16(i + 48)
__device__ __forceinline__ void WgmmaM64N256K16(float (&d)[128], uint32_t a, uint32_t b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %130, 0;\n"
      "mov.b64 da, {%128, %131};\nmov.b64 db, {%129, %131};\n"
      "wgmma.mma_async.sync.aligned.m64n256k16.f32.bf16.bf16 {"
      "%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,"
      "%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63,"
      "%64,%65,%66,%67,%68,%69,%70,%71,%72,%73,%74,%75,%76,%77,%78,%79,%80,%81,%82,%83,%84,%85,%86,%87,%88,%89,%90,%91,%92,%93,%94,%95,"
      "%96,%97,%98,%99,%100,%101,%102,%103,%104,%105,%106,%107,%108,%109,%110,%111,%112,%113,%114,%115,%116,%117,%118,%119,%120,%121,%122,%123,%124,%125,%126,%127}, "
      "da, db, p, 1, 1, 0, 0;\n}\n"
      : SALA_ACC64(0), SALA_ACC64(64)
      : "r"(a), "r"(b), "r"(int(accumulate)), "r"(kSw128DescriptorHigh));
}
#undef SALA_ACC64
#undef SALA_ACC16
#undef SALA_ACC4

// d (+)= A (64 x 16, descriptor a) x B (16 x 32, stored as 32 rows of k: descriptor b), given the
// descriptors' low words (high word kSw128DescriptorHigh); f16 inputs, fp32 accumulation.
__device__ __forceinline__ void WgmmaF16M64N32K16(float (&d)[16], uint32_t a, uint32_t b, bool accumulate) {
  asm volatile(
      "{\n.reg .pred p;\n.reg .b64 da, db;\nsetp.ne.b32 p, %18, 0;\n"
      "mov.b64 da, {%16, %19};\nmov.b64 db, {%17, %19};\n"
      "wgmma.mma_async.sync.aligned.m64n32k16.f32.f16.f16 "
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15}, da, db, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15])
      : "r"(a), "r"(b), "r"(int(accumulate)), "r"(kSw128DescriptorHigh));
}

// d (+)= A (64 x 16, 16-bit pairs in registers: the mma.sync A fragment of each warp's 16 rows) x
// B (16 x 64, stored as 64 rows of k: descriptor low word b, K-major, 128-byte swizzle). T:
// __half or __nv_bfloat16 (A and B alike).
#define SALA_WGMMA_M64N64K16_RS(TYPE)                                                                       \
  asm volatile(                                                                                          \
      "{\n.reg .pred p;\n.reg .b64 db;\nsetp.ne.b32 p, %37, 0;\n"                                          \
      "mov.b64 db, {%36, %38};\n"                                                                         \
      "wgmma.mma_async.sync.aligned.m64n64k16.f32." TYPE "." TYPE " "                                      \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31}, {%32,%33,%34,%35}, db, p, 1, 1, 0;\n}\n" \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]),   \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b), "r"(int(accumulate)), "r"(kSw128DescriptorHigh))
template <typename T>
__device__ __forceinline__ void WgmmaM64N64K16Rs(float (&d)[32], const uint32_t (&a)[4], uint32_t b, bool accumulate) {
  if constexpr (std::is_same_v<T, __half>) SALA_WGMMA_M64N64K16_RS("f16");
  else SALA_WGMMA_M64N64K16_RS("bf16");
}
#undef SALA_WGMMA_M64N64K16_RS

// d += A (64 x 16, 16-bit pairs in registers) x B (16 x 128) with B N-major: k rows of 128 values,
// as two 64-value slabs of 128-byte swizzled rows kSlabBytes apart (the descriptor's leading
// offset), eight rows 1024 bytes apart (its stride); b is the descriptor's low word without that
// offset. T: __half or __nv_bfloat16 (A and B alike).
#define SALA_WGMMA_M64N128K16_RS_TRANSB(TYPE)                                                                   \
  asm volatile(                                                                                              \
      "{\n.reg .pred p;\n.reg .b64 db;\nsetp.eq.b32 p, 1, 1;\nmov.b64 db, {%68, %69};\n"                     \
      "wgmma.mma_async.sync.aligned.m64n128k16.f32." TYPE "." TYPE " "                                        \
      "{%0,%1,%2,%3,%4,%5,%6,%7,%8,%9,%10,%11,%12,%13,%14,%15,%16,%17,%18,%19,%20,%21,%22,%23,%24,%25,%26,%27,%28,%29,%30,%31,%32,%33,%34,%35,%36,%37,%38,%39,%40,%41,%42,%43,%44,%45,%46,%47,%48,%49,%50,%51,%52,%53,%54,%55,%56,%57,%58,%59,%60,%61,%62,%63}, "    \
      "{%64,%65,%66,%67}, db, p, 1, 1, 1;\n}\n"                                                               \
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), \
        "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), \
        "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), \
        "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), \
        "+f"(d[32]), "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), \
        "+f"(d[40]), "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), \
        "+f"(d[48]), "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), \
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63]) \
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b | uint32_t(kSlabBytes >> 4) << 16), \
        "r"(kSw128DescriptorHigh))
template <int kSlabBytes, typename T>
__device__ __forceinline__ void WgmmaM64N128K16RsTransB(float (&d)[64], const uint32_t (&a)[4], uint32_t b) {
  if constexpr (std::is_same_v<T, __half>) SALA_WGMMA_M64N128K16_RS_TRANSB("f16");
  else SALA_WGMMA_M64N128K16_RS_TRANSB("bf16");
}
#undef SALA_WGMMA_M64N128K16_RS_TRANSB

// Hands registers from one warpgroup to another (setmaxnreg; all warps of a warpgroup execute
// it): one that needs few releases them down to R a thread, one that needs many waits for them
// up to R. ptxas allocates by these counts where the kernel's launch bounds fix its count at
// entry and each call opens the branch it governs (one call before the branch: C7507, ignored).
template <int R>
__device__ __forceinline__ void WarpgroupReleaseRegisters() {
  asm volatile("setmaxnreg.dec.sync.aligned.u32 %0;\n" ::"n"(R) : "memory");
}
template <int R>
__device__ __forceinline__ void WarpgroupTakeRegisters() {
  asm volatile("setmaxnreg.inc.sync.aligned.u32 %0;\n" ::"n"(R) : "memory");
}

// Shared-memory barriers (mbarrier): a phase completes once `count` threads have arrived and
// the bytes a thread announced with MbarArriveExpectTx have landed.
__device__ __forceinline__ void MbarInit(uint64_t* bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(SmemAddress(bar)), "r"(count) : "memory");
}
// Makes the initialised barriers visible to the TMA unit; a block-wide barrier must follow.
__device__ __forceinline__ void FenceMbarInit() { asm volatile("fence.mbarrier_init.release.cluster;\n" ::: "memory"); }
__device__ __forceinline__ void MbarArriveExpectTx(uint64_t* bar, uint32_t bytes) {
  asm volatile("{\n.reg .b64 state;\nmbarrier.arrive.expect_tx.shared::cta.b64 state, [%0], %1;\n}\n" ::"r"(
                   SmemAddress(bar)),
               "r"(bytes)
               : "memory");
}
__device__ __forceinline__ void MbarArrive(uint64_t* bar) {
  asm volatile("mbarrier.arrive.shared::cta.b64 _, [%0];\n" ::"r"(SmemAddress(bar)) : "memory");
}
// Whether the phase of parity `parity` has completed, the thread suspended for a while (a
// system-dependent limit) if it has not yet: waiting warps then leave the issue slots to others.
__device__ __forceinline__ bool MbarTryWait(uint64_t* bar, uint32_t parity) {
  uint32_t done;
  asm volatile(
      "{\n.reg .pred p;\nmbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2;\nselp.u32 %0, 1, 0, p;\n}\n"
      : "=r"(done)
      : "r"(SmemAddress(bar)), "r"(parity)
      : "memory");
  return done != 0;
}
__device__ __forceinline__ void MbarWait(uint64_t* bar, uint32_t parity) {
  while (!MbarTryWait(bar, parity)) {
  }
}
// Thread-block clusters: this block's rank in its cluster, a barrier over all threads of the
// cluster (release/acquire of shared memory), and an arrival on the barrier at `bar`'s offset in
// the shared memory of cluster block `rank` (this one included).
__device__ __forceinline__ uint32_t ClusterRank() {
  uint32_t r;
  asm volatile("mov.u32 %0, %%cluster_ctarank;\n" : "=r"(r));
  return r;
}
__device__ __forceinline__ void ClusterSync() {
  asm volatile("barrier.cluster.arrive.release.aligned;\nbarrier.cluster.wait.acquire.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void MbarArriveCluster(uint64_t* bar, uint32_t rank) {
  asm volatile(
      "{\n.reg .b32 remote;\nmapa.shared::cluster.u32 remote, %0, %1;\n"
      "mbarrier.arrive.shared::cluster.b64 _, [remote];\n}\n" ::"r"(SmemAddress(bar)),
      "r"(rank)
      : "memory");
}
// TMA: the box at coordinates (c0, c1) of a 2-D tensor map into shared memory at dst, its bytes
// counted on `bar`. The map must live in kernel parameter (or constant/global) space.
__device__ __forceinline__ void TmaLoad2d(void* dst, const void* map, int c0, int c1, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3}], "
      "[%4];\n" ::"r"(SmemAddress(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(SmemAddress(bar))
      : "memory");
}
// The same box into shared memory at dst's offset in every cluster block of `cta_mask`, counted
// on the barrier at bar's offset in each of them.
__device__ __forceinline__ void TmaLoad2dMulticast(void* dst, const void* map, int c0, int c1, uint64_t* bar,
                                                   uint16_t cta_mask) {
  asm volatile(
      "cp.async.bulk.tensor.2d.shared::cluster.global.tile.mbarrier::complete_tx::bytes.multicast::cluster "
      "[%0], [%1, {%2, %3}], [%4], %5;\n" ::"r"(SmemAddress(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(SmemAddress(bar)), "h"(cta_mask)
      : "memory");
}
// TMA: the box at coordinates (c0, c1, c2) of a 3-D tensor map into shared memory at dst, its
// bytes counted on `bar`. The map must live in kernel parameter (or constant/global) space.
__device__ __forceinline__ void TmaLoad3d(void* dst, const void* map, int c0, int c1, int c2, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.3d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4}], "
      "[%5];\n" ::"r"(SmemAddress(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(SmemAddress(bar))
      : "memory");
}

// The same for a 4-D tensor map.
__device__ __forceinline__ void TmaLoad4d(void* dst, const void* map, int c0, int c1, int c2, int c3, uint64_t* bar) {
  asm volatile(
      "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes [%0], [%1, {%2, %3, %4, "
      "%5}], [%6];\n" ::"r"(SmemAddress(dst)),
      "l"(reinterpret_cast<uint64_t>(map)), "r"(c0), "r"(c1), "r"(c2), "r"(c3), "r"(SmemAddress(bar))
      : "memory");
}

#endif  // __CUDA_ARCH_FEAT_SM90_ALL

}  // namespace sala::cuda

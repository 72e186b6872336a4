// Warp-level tensor-core building blocks (sm_80+): mma.sync m16n8k16 bf16 and f16,
// ldmatrix, cp.async, and a swizzled shared-memory layout for row-major bf16 tiles.
//
// Fragment layouts (g = lane / 4, t = lane % 4):
//   A 16x16: a0 (g, 2t..2t+1), a1 (g+8, 2t..), a2 (g, 2t+8..), a3 (g+8, 2t+8..)
//   B 16x8:  b0 (k 2t..2t+1, n g), b1 (k 2t+8.., n g)
//   C 16x8:  c0 c1 (g, 2t..2t+1), c2 c3 (g+8, 2t..2t+1)
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <cstdint>

namespace sala::cuda {

__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ void MmaF16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
      "{%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}

__device__ __forceinline__ uint32_t PackF16(float lo, float hi) {
  const __half2 v = __floats2half2_rn(lo, hi);
  return *reinterpret_cast<const uint32_t*>(&v);
}
// As PackF16, but values beyond f16's range become ±65504 rather than infinities.
__device__ __forceinline__ uint32_t PackF16Sat(float lo, float hi) {
  uint32_t r;
  asm("cvt.rn.satfinite.f16x2.f32 %0, %1, %2;\n" : "=r"(r) : "f"(hi), "f"(lo));
  return r;
}
// A bf16 pair as an f16 pair (exact within f16's range, saturated beyond it).
__device__ __forceinline__ uint32_t Bf16x2ToF16x2(uint32_t v) {
  return PackF16Sat(__uint_as_float(v << 16), __uint_as_float(v & 0xffff0000u));
}
// Two f16 sums at once (f16 pairs as packed by PackF16).
__device__ __forceinline__ uint32_t AddF16x2(uint32_t a, uint32_t b) {
  const __half2 r = __hadd2(*reinterpret_cast<const __half2*>(&a), *reinterpret_cast<const __half2*>(&b));
  return *reinterpret_cast<const uint32_t*>(&r);
}
// 2^x for an f16 pair x on the FMA and integer pipes, x clamped to [-13, 15], where the result
// is a normal f16: x = n + f with n an integer (rounded by adding 1560, whose low mantissa bits
// then hold n + 24) and |f| <= 1/2, 2^f by a degree-3 fit (relative error 7e-4 in f16
// arithmetic), n added to the exponent fields. Takes some exponentials off the MUFU, which
// serves 16 a cycle an SM; this takes 12 instructions a pair.
__device__ __forceinline__ uint32_t Exp2F16x2OnFma(uint32_t x) {
  const __half2 lo = __float2half2_rn(-13.0f), hi = __float2half2_rn(15.0f), magic = __float2half2_rn(1560.0f);
  const __half2 xc = __hmin2(__hmax2(*reinterpret_cast<const __half2*>(&x), lo), hi);
  const __half2 r = __hadd2(xc, magic);
  const __half2 f = __hsub2(xc, __hsub2(r, magic));
  __half2 q = __hfma2(f, __float2half2_rn(0.054595947f), __float2half2_rn(0.2421875f));
  q = __hfma2(q, f, __float2half2_rn(0.693359375f));
  q = __hfma2(q, f, __float2half2_rn(1.0f));
  // Per half: q's bits lie in [0x39A8, 0x3DA8] and (n + 24) << 10 in [0x2C00, 0x9C00], so
  // neither the add nor the subtract carries into the other half.
  const uint32_t e = (*reinterpret_cast<const uint32_t*>(&r) & 0x003F003Fu) << 10;
  return *reinterpret_cast<const uint32_t*>(&q) + e - 0x60006000u;
}

// The two values of an f16 pair, times `scale`.
__device__ __forceinline__ void UnpackF16(uint32_t v, float scale, float& lo, float& hi) {
  const float2 f = __half22float2(*reinterpret_cast<const __half2*>(&v));
  lo = f.x * scale;
  hi = f.y * scale;
}

__device__ __forceinline__ uint32_t SmemAddress(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddress(p)));
}

__device__ __forceinline__ void LdMatrixX4Trans(uint32_t (&r)[4], const void* p) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(SmemAddress(p)));
}

// 16-byte asynchronous copy; `valid` false fills the destination with zeros instead.
__device__ __forceinline__ void CpAsync16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(SmemAddress(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

// Row-major bf16 tile with D columns (D a multiple of 64): the 16-byte chunk c of row r is stored
// at chunk c ^ (r % 8), so that ldmatrix's eight row addresses fall in different banks.
template <int D>
__device__ __forceinline__ int Swizzled(int row, int col) {
  return row * D + ((((col >> 3) ^ row) & 7) | ((col >> 3) & ~7)) * 8 + (col & 7);
}

}  // namespace sala::cuda

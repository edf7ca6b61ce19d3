// Shared by the CUDA kernels of kivi_ops: input checks that name the argument, dtype plumbing,
// the KIVI numerics of kivi_ops/ops/layout.py (bit-identical to kivi_ops/ops/reference.py) and
// small PTX wrappers (cp.async, mma.sync, packed half/bfloat16 arithmetic).
//
// Only c10/cuda headers are included (not ATen/cuda/CUDAContext.h, which pulls cuSPARSE/cuBLAS
// headers that a bare toolkit may lack); c10::cuda::getCurrentCUDAStream is the function that
// at::cuda::getCurrentCUDAStream names.
#pragma once

#include <ATen/core/Tensor.h>
#include "../check.h"
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <mutex>
#include <type_traits>
#include <unordered_map>
#include <utility>

namespace kivi::cuda {

// ------------------------------------------------------------------------------------------------
// Host: checks and dispatch
// ------------------------------------------------------------------------------------------------

inline void check_bits_group(int64_t bits, int64_t group_size, const char* bits_name = "bits") {
  KIVI_CHECK(bits == 2 || bits == 4 || bits == 8, "kivi: ", bits_name, " must be 2, 4 or 8, got ", bits);
  KIVI_CHECK(group_size > 0 && group_size % 8 == 0 && group_size <= (1 << 20),
              "kivi: group_size must be a positive multiple of 8, got ", group_size);
}

inline bool is_float_dtype(at::ScalarType st) {
  return st == at::kHalf || st == at::kBFloat16 || st == at::kFloat;
}

inline void check_cuda(const at::Tensor& t, const char* name) {
  KIVI_CHECK(t.defined(), "kivi: ", name, " is an undefined tensor");
  KIVI_CHECK(t.is_cuda(), "kivi: ", name, " must be a CUDA tensor for the CUDA kernel, got ", t.device());
}

inline void check_float_4d(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  KIVI_CHECK(t.dim() == 4, "kivi: ", name, " must be 4-D, got ", t.dim(), "-D with shape ", t.sizes());
  KIVI_CHECK(is_float_dtype(t.scalar_type()), "kivi: ", name, " must be float16, bfloat16 or float32, got ",
              t.scalar_type());
}

inline void check_codes(const at::Tensor& t, const char* name) {
  check_cuda(t, name);
  KIVI_CHECK(t.dim() == 4 && t.scalar_type() == at::kByte, "kivi: ", name, " must be a 4-D uint8 tensor, got ",
              t.scalar_type(), " of shape ", t.sizes());
}

inline void check_same_device(const at::Tensor& a, const char* an, const at::Tensor& b, const char* bn) {
  KIVI_CHECK(a.device() == b.device(), "kivi: ", bn, " is on ", b.device(), " but ", an, " is on ", a.device());
}

// Index math inside the kernels is 64-bit for addresses, 32-bit for counts of tokens/threads.
inline void check_fits_int32(int64_t v, const char* what) {
  KIVI_CHECK(v >= 0 && v < (int64_t(1) << 31), "kivi: ", what, " (", v, ") exceeds the CUDA kernels' 2^31 limit");
}

template <typename T>
struct Tag {
  using type = T;
};

// Calls f(Tag<T>{}) with T = __half, __nv_bfloat16 or float.
template <typename F>
void dispatch_float(at::ScalarType st, const char* name, F&& f) {
  switch (st) {
    case at::kHalf: f(Tag<__half>{}); break;
    case at::kBFloat16: f(Tag<__nv_bfloat16>{}); break;
    case at::kFloat: f(Tag<float>{}); break;
    default: KIVI_CHECK(false, "kivi: ", name, ": unsupported dtype ", st);
  }
}

// Calls f(std::integral_constant<int, BITS>{}) for BITS = 2, 4, 8.
template <typename F>
void dispatch_bits(int64_t bits, F&& f) {
  switch (bits) {
    case 2: f(std::integral_constant<int, 2>{}); break;
    case 4: f(std::integral_constant<int, 4>{}); break;
    case 8: f(std::integral_constant<int, 8>{}); break;
    default: KIVI_CHECK(false, "kivi: bits must be 2, 4 or 8, got ", bits);
  }
}

inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15) == 0; }
inline int ilog2_exact(int64_t v) {  // log2(v) if v is a power of two, else -1
  if (v <= 0 || (v & (v - 1)) != 0) return -1;
  int l = 0;
  while ((int64_t(1) << l) < v) ++l;
  return l;
}

// A device attribute, looked up once per (device, attribute): the launchers ask at every call.
inline int device_attr(int device, cudaDeviceAttr attr) {
  static std::mutex mu;
  static std::unordered_map<int64_t, int> cache;
  const int64_t key = (static_cast<int64_t>(device) << 32) | static_cast<int64_t>(attr);
  std::lock_guard<std::mutex> lock(mu);
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  int n = 0;
  C10_CUDA_CHECK(cudaDeviceGetAttribute(&n, attr, device));
  cache[key] = n;
  return n;
}

inline int num_sms(int device) { return device_attr(device, cudaDevAttrMultiProcessorCount); }

// 9 and up can launch with programmatic dependent launch.
inline int cc_major(int device) { return device_attr(device, cudaDevAttrComputeCapabilityMajor); }

// How far programmatic dependent launch goes on `device` (below): 1, the default, for the split
// combine only; 2 (KIVI_ATTN_PDL=2) for the split kernels of decode attention and Q_MatMul too; 0
// (KIVI_ATTN_PDL=0, and before sm_90) for none; 3 as 2, and the combine lets the next kernel launch
// at its start (split_combine_kernel). An A/B knob, read at every call. Measured on the H200:
// - 2 against 1 on the ops alone, back-to-back calls (benchmarks/results/2026-12-01-h200-pdl):
//   0.98-1.00 of the time on decode attention's 2-bit rows, 0.93-1.00 on most Q_MatMul rows;
// - 2 against 1 in a model's compiled decode step (bench_static_cache.py, CUDA graphs; results
//   2026-12-01-h200-7bc6260): 1.004-1.019x of the time on four shapes (GQA batch 1 and 8, MHA
//   batch 1), in alternating processes. What users run is the step, so 1 is the default (I: the
//   kernels before attention in a step never trigger their dependents, so the early launch has
//   nothing to overlap);
// - 3: 0.92-0.99 on back-to-back calls but 1.05x (decode, GQA batch 1, 1k) and 1.29x (Q_MatMul
//   values, GQA batch 1, 4k) on small grids, whose early blocks pile onto the SMs freed first.
inline int pdl_level(int device) {
  if (cc_major(device) < 9) return 0;
  const char* v = std::getenv("KIVI_ATTN_PDL");
  return v == nullptr || v[0] == '\0' ? 1 : std::clamp(std::atoi(v), 0, 3);
}

// Whether the split kernels of decode attention and Q_MatMul launch early (pdl_level 2 and up; off
// by default), so that their blocks must wait in pdl_wait_primary before they touch global memory.
inline bool pdl_for_split_kernels(int device) { return pdl_level(device) >= 2; }

// A kernel launch's configuration for cudaLaunchKernelEx(C), with programmatic dependent launch where
// `pdl`: the launch and block placement may then overlap the end of the kernel before it on the
// stream, so the kernel must call pdl_wait_primary before it touches global memory. Not copyable
// (cfg points into attr).
struct LaunchConfig {
  cudaLaunchAttribute attr[1];
  cudaLaunchConfig_t cfg{};
  LaunchConfig(dim3 grid, dim3 block, size_t smem, cudaStream_t stream, bool pdl) {
    attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
    attr[0].val.programmaticStreamSerializationAllowed = 1;
    cfg.gridDim = grid;
    cfg.blockDim = block;
    cfg.dynamicSmemBytes = smem;
    cfg.stream = stream;
    cfg.attrs = attr;
    cfg.numAttrs = pdl ? 1 : 0;
  }
  LaunchConfig(const LaunchConfig&) = delete;
  LaunchConfig& operator=(const LaunchConfig&) = delete;
};

// Programmatic dependent launch (sm_90+, PTX griddepcontrol). A primary kernel lets the next kernel
// on the stream start launching (its blocks fill the SMs the primary leaves free and wait there);
// that kernel waits until every block of the primary has ended and its writes are visible. Both are
// no-ops when the kernels were not launched that way, and before sm_90.
__device__ __forceinline__ void pdl_launch_dependents() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}
__device__ __forceinline__ void pdl_wait_primary() {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  asm volatile("griddepcontrol.wait;" ::: "memory");
#endif
}

// Resident blocks per SM for `kernel` at `threads` threads and `smem` bytes of dynamic shared
// memory; raises the kernel's dynamic shared-memory limit first when it needs more than 48 KB.
// Cached per (device, kernel, smem).
inline int blocks_per_sm(const void* kernel, int threads, size_t smem, int device) {
  struct Key {
    int dev;
    const void* k;
    size_t s;
    bool operator==(const Key& o) const { return dev == o.dev && k == o.k && s == o.s; }
  };
  struct Hash {
    size_t operator()(const Key& k) const {
      return std::hash<const void*>()(k.k) ^ (std::hash<size_t>()(k.s) * 31) ^ (size_t(k.dev) << 20);
    }
  };
  static std::mutex mu;
  static std::unordered_map<Key, int, Hash> cache;
  std::lock_guard<std::mutex> lock(mu);
  const Key key{device, kernel, smem};
  auto it = cache.find(key);
  if (it != cache.end()) return it->second;
  if (smem > 48 * 1024) {
    C10_CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(smem)));
  }
  int n = 0;
  C10_CUDA_CHECK(cudaOccupancyMaxActiveBlocksPerMultiprocessor(&n, kernel, threads, smem));
  KIVI_CHECK(n > 0, "kivi: a CUDA kernel cannot be resident with ", threads, " threads and ", smem,
              " bytes of shared memory");
  cache[key] = n;
  return n;
}

// KIVI_CUDA_GENERIC=1 in the environment forces the generic (non-tensor-core, scalar) kernels:
// slower, simpler, and the first thing to try if a fast path is suspected of a wrong answer.
inline bool force_generic() {
  const char* v = std::getenv("KIVI_CUDA_GENERIC");
  return v != nullptr && v[0] != '\0' && v[0] != '0';
}

// A positive integer from the environment, or 0: tuning knobs for benchmarks, read at every call.
inline int env_int(const char* name) {
  const char* v = std::getenv(name);
  return v != nullptr ? std::max(0, std::atoi(v)) : 0;
}

// ------------------------------------------------------------------------------------------------
// Device: dtype conversion
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ float to_f(float x) { return x; }
__device__ __forceinline__ float to_f(__half x) { return __half2float(x); }
__device__ __forceinline__ float to_f(__nv_bfloat16 x) { return __bfloat162float(x); }

template <typename T>
__device__ __forceinline__ T from_f(float x);  // round to nearest even, like torch's .to(dtype)
template <>
__device__ __forceinline__ float from_f<float>(float x) { return x; }
template <>
__device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

// Bits of a 16-bit type; the canonical NaN torch writes for float('nan') in each dtype.
__device__ __forceinline__ uint16_t bits_of(__half x) { return __half_as_ushort(x); }
__device__ __forceinline__ uint16_t bits_of(__nv_bfloat16 x) { return __bfloat16_as_ushort(x); }

template <typename T>
__device__ __forceinline__ T canonical_nan();
template <>
__device__ __forceinline__ float canonical_nan<float>() { return __uint_as_float(0x7FC00000u); }
template <>
__device__ __forceinline__ __half canonical_nan<__half>() { return __ushort_as_half(0x7E00); }
template <>
__device__ __forceinline__ __nv_bfloat16 canonical_nan<__nv_bfloat16>() { return __ushort_as_bfloat16(0x7FC0); }

template <typename T>
__device__ __forceinline__ T load_elem(const T* p) { return *p; }

// ------------------------------------------------------------------------------------------------
// Device: KIVI numerics (kivi_ops/ops/layout.py)
// ------------------------------------------------------------------------------------------------

// NaN-propagating min/max (fminf/fmaxf drop NaN): PTX min.NaN / max.NaN (sm_80+).
__device__ __forceinline__ float fmin_nan(float a, float b) {
  float d;
  asm("min.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float fmax_nan(float a, float b) {
  float d;
  asm("max.NaN.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// Cast float32 x >= 0 to T rounding to nearest, then one representable step up where that fell
// below x (reference.round_up_cast): the stored scale never undershoots.
template <typename T>
__device__ __forceinline__ T round_up_cast(float x) {
  if constexpr (std::is_same_v<T, float>) {
    return x;
  } else {
    T y = from_f<T>(x);
    if (to_f(y) < x) {
      if constexpr (std::is_same_v<T, __half>) {
        y = __ushort_as_half(static_cast<unsigned short>(__half_as_ushort(y) + 1));
      } else {
        y = __ushort_as_bfloat16(static_cast<unsigned short>(__bfloat16_as_ushort(y) + 1));
      }
    }
    return y;
  }
}

// A group's stored (scale, zero) from its float32 min/max; a non-finite group -> (NaN, NaN).
template <typename T, int BITS>
__device__ __forceinline__ void group_params(float lo, float hi, T& scale, T& zero) {
  const float s = __fdiv_rn(__fsub_rn(hi, lo), static_cast<float>((1 << BITS) - 1));
  T st = round_up_cast<T>(s);
  T zt = from_f<T>(lo);
  if (!(isfinite(to_f(st)) && isfinite(to_f(zt)))) {
    st = canonical_nan<T>();
    zt = canonical_nan<T>();
  }
  scale = st;
  zero = zt;
}

// code = clamp(floor((x - z) / s + 0.5), 0, maxq), 0 where !(s > 0): IEEE float32 throughout.
__device__ __forceinline__ uint32_t encode_exact(float x, float s, float z, float maxq) {
  if (!(s > 0.f)) return 0u;
  const float t = __fadd_rn(__fdiv_rn(__fsub_rn(x, z), s), 0.5f);
  return static_cast<uint32_t>(fminf(fmaxf(floorf(t), 0.f), maxq));
}

// The same code, usually without the IEEE division: t ~ (x - z) * inv + 0.5 with inv = 1/s
// (correctly rounded). For t in [0, 512) that approximation is within 1.2e-4 of the exactly
// divided t (a few float32 ulps), so whenever its fractional part is more than 1e-3 away from an
// integer both floor to the same code; otherwise (and for NaN, Inf, huge t) the exact path runs.
// Pass inv = 0 where !(s > 0): t = 0.5 then encodes 0, like the exact path.
__device__ __forceinline__ uint32_t encode(float x, float s, float inv, float z, float maxq) {
  const float t = fmaf(__fsub_rn(x, z), inv, 0.5f);
  const float f = floorf(t);
  const float fr = t - f;
  if (t >= 0.f && t < 512.f && fr > 1e-3f && fr < 0.999f) return static_cast<uint32_t>(fminf(f, maxq));
  return encode_exact(x, s, z, maxq);
}

__device__ __forceinline__ float safe_inv(float s) { return s > 0.f ? __frcp_rn(s) : 0.f; }

// One token's value row quantized per token by a whole block (every thread calls it): vf [D] the
// row as float32 in shared memory, sz [2 * D/G] shared scratch; writes scale/zero [D/G] and the
// D * VB / 8 code bytes. The numerics of kivi::quantize_values (bit for bit). Used by the fused
// appends (static_append.cu, dynamic_append.cu); the caller syncs before (vf written) as needed.
template <typename T, int VB>
__device__ __forceinline__ void quantize_value_row(const float* vf, float* sz, int D, int G, T* scale, T* zero,
                                                   uint8_t* codes) {
  constexpr int PV = 8 / VB;
  constexpr float VMAX = static_cast<float>((1 << VB) - 1);
  for (int g = threadIdx.x; g < D / G; g += blockDim.x) {
    float lo = vf[g * G], hi = lo;
    for (int j = 1; j < G; ++j) {
      lo = fmin_nan(lo, vf[g * G + j]);
      hi = fmax_nan(hi, vf[g * G + j]);
    }
    T s, z;
    group_params<T, VB>(lo, hi, s, z);
    scale[g] = s;
    zero[g] = z;
    sz[2 * g] = to_f(s);
    sz[2 * g + 1] = to_f(z);
  }
  __syncthreads();
  for (int t = threadIdx.x; t < D / PV; t += blockDim.x) {
    uint32_t byte = 0;
#pragma unroll
    for (int j = 0; j < PV; ++j) {
      const int d = t * PV + j, g = d / G;
      const float sf = sz[2 * g];
      byte |= encode(vf[d], sf, safe_inv(sf), sz[2 * g + 1], VMAX) << (j * VB);
    }
    codes[t] = static_cast<uint8_t>(byte);
  }
}

// Dequantize like the reference: code * s then + z, each rounded to float32 (no contraction).
__device__ __forceinline__ float dequant(uint32_t code, float s, float z) {
  return __fadd_rn(__fmul_rn(static_cast<float>(code), s), z);
}

// ------------------------------------------------------------------------------------------------
// Device: 16-byte vectors of 16-bit or 32-bit elements
// ------------------------------------------------------------------------------------------------

// The fp16 or bf16 value with bits `hbits`, as float.
template <typename T>
__device__ __forceinline__ float half_bits_to_f(uint16_t hbits) {
  if constexpr (std::is_same_v<T, __half>) {
    return __half2float(__ushort_as_half(hbits));
  } else {
    return __bfloat162float(__ushort_as_bfloat16(hbits));
  }
}

// Element i of a uint4 holding 16 bytes of T.
template <typename T>
__device__ __forceinline__ float vec_elem(const uint4& v, int i) {
  const uint32_t w = (&v.x)[(i * static_cast<int>(sizeof(T))) / 4];
  if constexpr (std::is_same_v<T, float>) {
    return __uint_as_float(w);
  } else {
    return half_bits_to_f<T>(static_cast<uint16_t>((i & 1) ? (w >> 16) : (w & 0xFFFFu)));
  }
}

template <typename T>
__device__ __forceinline__ uint32_t elem_bits(T x) {
  if constexpr (std::is_same_v<T, float>) {
    return __float_as_uint(x);
  } else {
    return bits_of(x);
  }
}

// 16 bytes of T from VEC = 16 / sizeof(T) elements.
template <typename T>
__device__ __forceinline__ uint4 make_vec(const T (&e)[16 / sizeof(T)]) {
  uint4 v;
  uint32_t* w = &v.x;
  if constexpr (std::is_same_v<T, float>) {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = __float_as_uint(e[i]);
  } else {
#pragma unroll
    for (int i = 0; i < 4; ++i) w[i] = elem_bits(e[2 * i]) | (elem_bits(e[2 * i + 1]) << 16);
  }
  return v;
}

// Streaming 16-byte global load (read once: no L1 allocation).
__device__ __forceinline__ uint4 ldg_stream(const void* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0,%1,%2,%3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
               : "l"(p));
  return v;
}

// ------------------------------------------------------------------------------------------------
// Device: PTX wrappers for the tensor-core kernels
// ------------------------------------------------------------------------------------------------

__device__ __forceinline__ uint32_t smem_u32(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte global -> shared copy, bypassing L1; src_bytes = 0 fills the 16 bytes with zeros
// (nothing is read then, but src must still be a valid address).
__device__ __forceinline__ void cp_async16(uint32_t dst, const void* src, int src_bytes = 16) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src), "r"(src_bytes) : "memory");
}
// Requests the 128-byte line holding p into L2 (no register, no wait).
__device__ __forceinline__ void prefetch_l2(const void* p) {
  asm volatile("prefetch.global.L2 [%0];\n" ::"l"(p));
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}

// Four 8x8 matrices of 16-bit elements from shared memory, transposed (PTX "ldmatrix ... .trans"):
// lanes 8i..8i+7 give the 16-byte rows 0..7 of matrix i; lane l receives in d[i] the elements
// (row 2(l%4), col l/4) in its lower 16 bits and (row 2(l%4)+1, col l/4) in its upper 16 bits.
// volatile: ordered with the cp.async waits that make the rows valid.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&d)[4], uint32_t addr) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(d[0]), "=r"(d[1]), "=r"(d[2]), "=r"(d[3])
               : "r"(addr));
}

// D = A * B + D, m16n8k16, A row-major 16x16, B col-major 16x8, fp32 accumulators.
// Fragments (PTX ISA "mma.m16n8k16", g = lane / 4, c = lane % 4):
//   a0: (row g,   cols 2c, 2c+1)   a1: (row g+8, cols 2c, 2c+1)
//   a2: (row g,   cols 2c+8, 2c+9) a3: (row g+8, cols 2c+8, 2c+9)
//   b0: (rows 2c, 2c+1, col g)     b1: (rows 2c+8, 2c+9, col g)
//   d0, d1: (row g, cols 2c, 2c+1) d2, d3: (row g+8, cols 2c, 2c+1)
// The lower 16 bits of a register hold the element of lower index.
template <typename T>
__device__ __forceinline__ void mma16816(float (&d)[4], uint32_t a0, uint32_t a1, uint32_t a2, uint32_t a3,
                                         uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  } else {
    asm("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
  }
}

// Packed pairs of T (__half or __nv_bfloat16) in a 32-bit register.
template <typename T>
__device__ __forceinline__ uint32_t hmul2(uint32_t a, uint32_t b) {
  uint32_t d;
  if constexpr (std::is_same_v<T, __half>) {
    asm("mul.rn.f16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  } else {
    asm("mul.rn.bf16x2 %0, %1, %2;" : "=r"(d) : "r"(a), "r"(b));
  }
  return d;
}
template <typename T>
__device__ __forceinline__ uint32_t hfma2(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (std::is_same_v<T, __half>) {
    asm("fma.rn.f16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("fma.rn.bf16x2 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}
// a * b - c, one rounding (the rounding error of c = round(a * b), exactly representable: the
// product of two 16-bit floats has at most twice their significant bits).
template <typename T>
__device__ __forceinline__ uint32_t hfma2_negc(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  if constexpr (std::is_same_v<T, __half>) {
    asm("{ .reg .b32 t; neg.f16x2 t, %3; fma.rn.f16x2 %0, %1, %2, t; }" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  } else {
    asm("{ .reg .b32 t; neg.bf16x2 t, %3; fma.rn.bf16x2 %0, %1, %2, t; }" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  }
  return d;
}
template <typename T>
__device__ __forceinline__ uint32_t pack2(float lo, float hi) {
  if constexpr (std::is_same_v<T, __half>) {
    __half2 h = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  } else {
    __nv_bfloat162 h = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&h);
  }
}

// (a & b) | c in one LOP3 (C++ `&` then `|` with two immediates compiles to two).
__device__ __forceinline__ uint32_t and_or(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t d;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

// x holds two code bytes, in bits 0..7 and 16..23 (the rest ignored unless BITS*F + BITS > 8).
// unpack2_biased returns the two F-th codes (bits [F*BITS, F*BITS+BITS) of each byte) in the mantissa
// of a magic float, exact: the pair (magic + code * 2^shift), magic 1024 (fp16) or 128 (bf16), where
// shift = biased_shift (the field's offset; 0 where bf16 must shift the byte first). One LOP3.
template <typename T, int BITS, int F>
constexpr int biased_shift() {
  return std::is_same_v<T, __half> || F * BITS + BITS <= 7 ? F * BITS : 0;
}

template <typename T, int BITS, int F>
__device__ __forceinline__ uint32_t unpack2_biased(uint32_t x) {
  constexpr int OFF = F * BITS;
  constexpr uint32_t M = (1u << BITS) - 1u;
  static_assert(OFF + BITS <= 8, "field outside the byte");
  constexpr uint32_t magic = std::is_same_v<T, __half> ? 0x64006400u : 0x43004300u;
  if constexpr (biased_shift<T, BITS, F>() == OFF) {
    return and_or(x, (M << OFF) * 0x10001u, magic);
  } else {
    return and_or(x >> OFF, M * 0x10001u, magic);
  }
}

// The two codes as a pair of T, exact: one fma removes the magic and the field's power of two
// (one LOP3 + one HFMA2 per two codes). Cancelling the magic inside the value mma instead (a second
// k-half of -magic) was measured slower: docs/perf_plan.md, "Session 7".
template <typename T, int BITS, int F>
__device__ __forceinline__ uint32_t unpack2(uint32_t x) {
  constexpr uint32_t S = biased_shift<T, BITS, F>();
  constexpr uint32_t mul = std::is_same_v<T, __half> ? ((15 - S) << 10) * 0x10001u     // 2^-S
                                                     : ((127 - S) << 7) * 0x10001u;
  constexpr uint32_t add = std::is_same_v<T, __half> ? (0x8000u | ((25 - S) << 10)) * 0x10001u  // -magic * 2^-S
                                                     : (0x8000u | ((134 - S) << 7)) * 0x10001u;
  return hfma2<T>(unpack2_biased<T, BITS, F>(x), mul, add);
}

// fp16 codes as exact subnormals (bf16 keeps unpack2; KIVI_SUBNORMAL_CODES at build time, a bit
// mask: 1 keys, 2 values, 3 both (the default), 0 unpack2 everywhere, for A/B). Masking
// field F in place leaves code * 2^(F*BITS) in the mantissa under a zero exponent, i.e. the fp16
// subnormal code * 2^(F*BITS - 24). One LOP3 per two codes and no fma: the HFMA2 that removes
// unpack2's magic sat on the dependency chain into every mma. The tensor cores take fp16 subnormals
// exactly (products with an fp16 operand are >= 2^-48, normal in the fp32 accumulator), and the
// power of two comes back once on the accumulator: codes_unscale<T, BITS, F>() per score (keys: the
// field is the token) or per output channel (values: the field is the channel). Measured on the H200:
// 7-10 % less decode-attention time at 2 bits and 3-8 % at 4 bits from 32k tokens (docs/perf_plan.md,
// "Session 20"); scripts/probe_subnormal_mma.cu checks the exact subnormal products on the GPU.
#ifndef KIVI_SUBNORMAL_CODES
#define KIVI_SUBNORMAL_CODES 3
#endif
template <typename T, bool KEYS>
constexpr bool subnormal_codes() {
  return std::is_same_v<T, __half> && (KIVI_SUBNORMAL_CODES & (KEYS ? 1 : 2));
}

template <typename T, int BITS, int F, bool KEYS>
__device__ __forceinline__ uint32_t unpack2_codes(uint32_t x) {
  if constexpr (subnormal_codes<T, KEYS>()) {
    static_assert(F * BITS + BITS <= 8, "field outside the byte");
    constexpr uint32_t mask = (((1u << BITS) - 1u) << (F * BITS)) * 0x10001u;
    uint32_t d;  // opaque to the compiler, as unpack2's asm is (a plain `&` spilled the 4-bit one-stage kernels)
    asm("and.b32 %0, %1, %2;" : "=r"(d) : "r"(x), "n"(mask));
    return d;
  } else {
    return unpack2<T, BITS, F>(x);
  }
}

// What the mma products of unpack2_codes<T, BITS, F> are multiplied by (1 where it is unpack2).
template <typename T, int BITS, int F, bool KEYS>
constexpr float codes_unscale() {
  return subnormal_codes<T, KEYS>() ? static_cast<float>(1u << (24 - F * BITS)) : 1.f;
}

__device__ __forceinline__ float fast_exp2(float x) {  // 2^x; 2^-inf = 0
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

constexpr float kNegInf = -__builtin_huge_valf();

}  // namespace kivi::cuda

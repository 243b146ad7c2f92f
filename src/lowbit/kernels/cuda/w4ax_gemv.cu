// W4Ax linear for a few tokens (decode) in one launch, on the CUDA cores: the activation quantizer fused in front of a
// weight-streaming GEMV (sm_80+; built for the device at first use by lowbit.kernels.cuda_build).
//
// y[m, n] = sum over K tiles t of  float(A_t . W_t) * (a_scale[m, t] * w_scale[n, t])  (+ bias), in the order of the
// Triton two-launch path (lowbit.kernels.gemm.linear_two_launch) at the same split-K plan, so the result is the same
// bits: per split of `tps` tiles a float32 chain acc = fma(partial, scale, acc) from zero, the splits' chains summed
// in split order from zero, then the bias, then the output dtype (round to nearest even).
//
// Grid: WARPS warps per CTA, RPW output rows per warp. Each CTA first issues its weight loads (16 bytes per lane and
// row, D per lane in flight, with the rows' weight scales; the tile-split layout of lowbit.kernels.layout: byte j of a
// tile holds channel j low and channel j + tile/2 high), then quantizes the tokens' activations into shared memory
// (per-token, per-block symmetric codes, gathered through the FMPQ permutation, 8 bits in the INT8 blocks; bit for bit
// the Triton quantizer), then multiplies with dp4a: exact int32 partials, summed over a tile's lanes by shuffles, then
// the float chain above, tile by tile.
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

namespace {

struct Args {
  const void* x; long long ldx; int m; int x_bf16;
  const int* perm;        // [k_in] or null: permuted channel j reads x[perm[j]]
  const int8_t* mask;     // [k / block] or null: nonzero = an 8-bit block
  float low_hi;           // largest code of the low-bit blocks (7 for 4 bits, 127 for 8)
  const uint8_t* w; long long ldw;     // [n, k / 2] tile-split packed codes (q + 8)
  const __half* ws; long long ldws;    // [n, k / group]
  const float* bias;      // [n] or null
  void* out; long long ldo; int out_bf16;
  int n, k_in, k, block, group, tps;
  int log_block, log_group;
};

// Shape of the work (override with -DLOWBIT_GEMV_WARPS=... in $LOWBIT_NVCC_FLAGS to compare)
#ifndef LOWBIT_GEMV_WARPS
#define LOWBIT_GEMV_WARPS 8
#endif
#ifndef LOWBIT_GEMV_RPW
#define LOWBIT_GEMV_RPW 2
#endif
#ifndef LOWBIT_GEMV_D
#define LOWBIT_GEMV_D 4
#endif
constexpr int WARPS = LOWBIT_GEMV_WARPS;  // warps per CTA
constexpr int RPW = LOWBIT_GEMV_RPW;      // rows per warp
constexpr int D = LOWBIT_GEMV_D;          // 16-byte chunks per lane and row in flight (a round)

__device__ __forceinline__ uint4 load_stream(const uint8_t* p) {
  uint4 v;
  asm volatile("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
               : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
  return v;
}

__device__ __forceinline__ float load_x(const Args& a, long long i) {
  if (a.x_bf16) return __bfloat162float(reinterpret_cast<const __nv_bfloat16*>(a.x)[i]);
  return __half2float(reinterpret_cast<const __half*>(a.x)[i]);
}

// Per token, per block of `block` channels: scale = amax / hi (1 when zero), code = rint(x / scale) clamped to
// [-hi - 1, hi]; channels past k_in are zero. Warp w takes the (token, block) rows w, w + WARPS, ..., QU at a time
// (their loads issued together).
template <int PER_LANE>
__device__ __forceinline__ void quantize(const Args& a, int8_t* codes, float* scales) {
  constexpr int QU = PER_LANE >= 8 ? 2 : 4;
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nb = a.k >> a.log_block;
  const int rows = a.m * nb;
  for (int r0 = warp; r0 < rows; r0 += WARPS * QU) {
    float v[QU][PER_LANE];
    float amax[QU];
#pragma unroll
    for (int u = 0; u < QU; ++u) {
      const int row = r0 + u * WARPS;
      const int tok = row / nb, b = row - tok * nb;
      amax[u] = 0.f;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) {
        const int ch = (b << a.log_block) + i * 32 + lane;
        float x = 0.f;
        if (row < rows && ch < a.k_in) x = load_x(a, tok * a.ldx + (a.perm ? __ldg(a.perm + ch) : ch));
        v[u][i] = x;
        amax[u] = fmaxf(amax[u], fabsf(x));
      }
    }
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) {
#pragma unroll
      for (int u = 0; u < QU; ++u) amax[u] = fmaxf(amax[u], __shfl_xor_sync(0xffffffffu, amax[u], o));
    }
#pragma unroll
    for (int u = 0; u < QU; ++u) {
      const int row = r0 + u * WARPS;
      if (row >= rows) break;
      const int tok = row / nb, b = row - tok * nb;
      const float hi = (a.mask && a.mask[b]) ? 127.f : a.low_hi;
      float scale = __fdiv_rn(amax[u], hi);
      scale = scale > 0.f ? scale : 1.f;
#pragma unroll
      for (int i = 0; i < PER_LANE; ++i) {
        const float c = fminf(fmaxf(rintf(__fdiv_rn(v[u][i], scale)), -hi - 1.f), hi);
        codes[tok * a.k + (b << a.log_block) + i * 32 + lane] = static_cast<int8_t>(c);
      }
      if (lane == 0) scales[row] = scale;
    }
  }
}

__device__ __forceinline__ int lo_codes(uint32_t w) { return static_cast<int>(((w & 0x0F0F0F0Fu) + 0x78787878u) ^ 0x80808080u); }
__device__ __forceinline__ int hi_codes(uint32_t w) { return lo_codes(w >> 4); }

template <int TILE, int MT>
__global__ void __launch_bounds__(WARPS * 32) gemv_kernel(Args a) {
  constexpr int CPT = TILE / 32;           // lanes (16-byte chunks) per tile
  constexpr int TPS_STEP = 32 / CPT;       // tiles per warp step (32 chunks)
  constexpr int HALF = TILE / 2;
  extern __shared__ __align__(16) uint8_t smem[];
  int8_t* codes = reinterpret_cast<int8_t*>(smem);                               // [m, k]
  float* ascale = reinterpret_cast<float*>(smem + ((a.m * a.k + 15) & ~15));    // [m, k / block]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int row0 = (blockIdx.x * WARPS + warp) * RPW;
  const int nchunks = a.k >> 5;              // 16-byte chunks of a row
  const int steps = nchunks >> 5;            // warp steps of 32 chunks (k is a multiple of 1024)
  const int rounds = (steps + D - 1) / D;
  const int lg_tile = __ffs(TILE) - 1;

  const uint8_t* wrow[RPW];
  const __half* srow[RPW];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
    const int row = min(row0 + r, a.n - 1);  // rows past n read the last row again (never stored)
    wrow[r] = a.w + (long long)row * a.ldw;
    srow[r] = a.ws + (long long)row * a.ldws;
  }
  // this lane's tile in step s: s * TPS_STEP + lane / CPT; its byte offset 16 * c
  uint4 buf[RPW][D];
  float wsb[RPW][D];
#pragma unroll
  for (int r = 0; r < RPW; ++r) {
#pragma unroll
    for (int i = 0; i < D; ++i) {
      const int c = i * 32 + lane;
      const bool ok = i < steps;
      buf[r][i] = ok ? load_stream(wrow[r] + 16 * c) : make_uint4(0, 0, 0, 0);
      wsb[r][i] = ok ? __half2float(srow[r][((c / CPT) << lg_tile) >> a.log_group]) : 0.f;
    }
  }
  switch (a.block >> 5) {  // elements per lane of a quantization block
    case 1: quantize<1>(a, codes, ascale); break;
    case 2: quantize<2>(a, codes, ascale); break;
    case 4: quantize<4>(a, codes, ascale); break;
    default: quantize<8>(a, codes, ascale); break;
  }
  __syncthreads();
  if (row0 >= a.n) return;

  const int nb = a.k >> a.log_block;
  float acc[RPW][MT], total[RPW][MT];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int t = 0; t < MT; ++t) acc[r][t] = total[r][t] = 0.f;
  int left = a.tps;  // tiles until the end of the current split

  for (int rd = 0; rd < rounds; ++rd) {
    uint4 nxt[RPW][D];
    float nws[RPW][D];
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
#pragma unroll
      for (int i = 0; i < D; ++i) {
        const int s = (rd + 1) * D + i;
        const int c = s * 32 + lane;
        const bool ok = s < steps;
        nxt[r][i] = ok ? load_stream(wrow[r] + 16 * c) : make_uint4(0, 0, 0, 0);
        nws[r][i] = ok ? __half2float(srow[r][((c / CPT) << lg_tile) >> a.log_group]) : 0.f;
      }
    }
#pragma unroll
    for (int i = 0; i < D; ++i) {
      const int s = rd * D + i;
      if (s >= steps) break;                 // uniform over the warp
      const int c = s * 32 + lane;
      const int t = c / CPT;                   // this lane's tile
      const int j0 = (c % CPT) * 16;           // its first byte in the tile
      float sa[MT];                            // activation scales of the lane's tile
#pragma unroll
      for (int tok = 0; tok < MT; ++tok) sa[tok] = tok < a.m ? ascale[tok * nb + ((t << lg_tile) >> a.log_block)] : 0.f;
      int4 alo[MT], ahi[MT];
#pragma unroll
      for (int tok = 0; tok < MT; ++tok) {
        if (tok < a.m) {
          const int8_t* ca = codes + tok * a.k + (t << lg_tile) + j0;
          alo[tok] = *reinterpret_cast<const int4*>(ca);
          ahi[tok] = *reinterpret_cast<const int4*>(ca + HALF);
        } else {
          alo[tok] = ahi[tok] = make_int4(0, 0, 0, 0);
        }
      }
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const uint32_t wv[4] = {buf[r][i].x, buf[r][i].y, buf[r][i].z, buf[r][i].w};
        int lo[4], hi[4];
#pragma unroll
        for (int q = 0; q < 4; ++q) { lo[q] = lo_codes(wv[q]); hi[q] = hi_codes(wv[q]); }
        float pf[MT], sc[MT];
#pragma unroll
        for (int tok = 0; tok < MT; ++tok) {
          int p = 0;
          p = __dp4a(lo[0], alo[tok].x, p); p = __dp4a(lo[1], alo[tok].y, p);
          p = __dp4a(lo[2], alo[tok].z, p); p = __dp4a(lo[3], alo[tok].w, p);
          p = __dp4a(hi[0], ahi[tok].x, p); p = __dp4a(hi[1], ahi[tok].y, p);
          p = __dp4a(hi[2], ahi[tok].z, p); p = __dp4a(hi[3], ahi[tok].w, p);
#pragma unroll
          for (int o = 1; o < CPT; o <<= 1) p += __shfl_xor_sync(0xffffffffu, p, o);  // exact: the tile's int32 sum
          pf[tok] = __int2float_rn(p);
          sc[tok] = __fmul_rn(sa[tok], wsb[r][i]);
        }
        int lft = left;
#pragma unroll
        for (int g = 0; g < TPS_STEP; ++g) {   // the float chain, tile by tile in order (every lane alike)
#pragma unroll
          for (int tok = 0; tok < MT; ++tok)
            acc[r][tok] = __fmaf_rn(__shfl_sync(0xffffffffu, pf[tok], g * CPT), __shfl_sync(0xffffffffu, sc[tok], g * CPT),
                                    acc[r][tok]);
          if (--lft == 0) {                    // end of a split: into the total, in split order
#pragma unroll
            for (int tok = 0; tok < MT; ++tok) { total[r][tok] = __fadd_rn(total[r][tok], acc[r][tok]); acc[r][tok] = 0.f; }
            lft = a.tps;
          }
        }
        if (r == RPW - 1) left = lft;
      }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int i = 0; i < D; ++i) { buf[r][i] = nxt[r][i]; wsb[r][i] = nws[r][i]; }
  }
  if (left != a.tps) {  // the last split ends with the last tile
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int tok = 0; tok < MT; ++tok) total[r][tok] = __fadd_rn(total[r][tok], acc[r][tok]);
  }
  if (lane < RPW * MT) {  // lane (r, tok) stores one output
    const int r = lane / MT, tok = lane % MT;
    const int row = row0 + r;
    float y = 0.f;
#pragma unroll
    for (int rr = 0; rr < RPW; ++rr)
#pragma unroll
      for (int tt = 0; tt < MT; ++tt)
        if (rr == r && tt == tok) y = total[rr][tt];
    if (row < a.n && tok < a.m) {
      if (a.bias) y = __fadd_rn(y, a.bias[row]);
      const long long o = (long long)tok * a.ldo + row;
      if (a.out_bf16) reinterpret_cast<__nv_bfloat16*>(a.out)[o] = __float2bfloat16_rn(y);
      else reinterpret_cast<__half*>(a.out)[o] = __float2half_rn(y);
    }
  }
}

template <int TILE, int MT>
int launch(const Args& a, cudaStream_t stream) {
  const size_t smem = ((size_t)(a.m * a.k + 15) & ~(size_t)15) + sizeof(float) * a.m * (a.k / a.block);
  auto kern = gemv_kernel<TILE, MT>;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return (int)err;
  }
  const int rows_per_cta = WARPS * RPW;
  kern<<<(a.n + rows_per_cta - 1) / rows_per_cta, WARPS * 32, smem, stream>>>(a);
  return (int)cudaGetLastError();
}

template <int TILE>
int dispatch_m(const Args& a, cudaStream_t s) {
  if (a.m <= 1) return launch<TILE, 1>(a, s);
  if (a.m <= 2) return launch<TILE, 2>(a, s);
  return launch<TILE, 4>(a, s);
}

int log2i(int v) { int l = 0; while ((1 << l) < v) ++l; return l; }

}  // namespace

// Returns a cudaError_t (0: launched). Checks of shapes and dtypes are the Python wrapper's
// (lowbit.kernels.w4ax_gemv); here only what would corrupt memory: m in [1, 4], blocks of 32..256 channels and groups
// of 32 or more (powers of two), k a multiple of 1024 and of the block and group.
extern "C" int lowbit_w4ax_gemv(
    const void* x, long long ldx, int m, int x_bf16, const int* perm, const int8_t* mask, float low_hi,
    const void* w, long long ldw, const void* ws, long long ldws, const float* bias,
    void* out, long long ldo, int out_bf16, int n, int k_in, int k, int block, int group, int tps, void* stream) {
  const int tile = block < group ? block : group;
  const bool pow2 = !(block & (block - 1)) && !(group & (group - 1));
  if (m < 1 || m > 4 || !pow2 || tile < 32 || block > 256 || group > 1 << 20 || k % 1024 || k % block ||
      k % group || tps < 1 || k_in > k)
    return (int)cudaErrorInvalidValue;
  Args a{x, ldx, m, x_bf16, perm, mask, low_hi, reinterpret_cast<const uint8_t*>(w), ldw,
         reinterpret_cast<const __half*>(ws), ldws, bias, out, ldo, out_bf16, n, k_in, k, block, group, tps,
         log2i(block), log2i(group)};
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  switch (tile) {
    case 32: return dispatch_m<32>(a, s);
    case 64: return dispatch_m<64>(a, s);
    case 128: return dispatch_m<128>(a, s);
    case 256: return dispatch_m<256>(a, s);
    case 512: return dispatch_m<512>(a, s);
    case 1024: return dispatch_m<1024>(a, s);
    default: return (int)cudaErrorInvalidValue;
  }
}

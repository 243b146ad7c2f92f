// W4Ax linear for a few tokens (decode) in one launch, on the CUDA cores: the activation quantizer fused in front of a
// weight-streaming GEMV (sm_80+; built for the device at first use by lowbit.kernels.cuda_build).
//
// y[m, n] = sum over K tiles t of  float(A_t . W_t) * (a_scale[m, t] * w_scale[n, t])  (+ bias): the function of
// the Triton path (lowbit.kernels.gemm.linear_two_launch) with the same activation codes bit for bit, its float32 sums
// taken in another order (per lane, then across the warp).
//
// Persistent grid of at most one wave: each CTA issues its first weight loads, quantizes the tokens' activations into
// shared memory (per-token, per-block symmetric codes, gathered through the FMPQ permutation, 8 bits in the INT8
// blocks), then takes sets of WARPS * RPW output rows in turn, a warp RPW rows. A lane reads 16 bytes of a row at a time
// (D per row in flight, the next round's loads issued before this round's math; the tile-split layout of
// lowbit.kernels.layout: byte j of a tile holds channel j low and channel j + tile/2 high) and multiplies them with
// dp4a as unsigned nibbles q + 8, subtracting 8 x the activations' sum per chunk (precomputed once per CTA); each lane
// accumulates partial * a_scale * w_scale in float32, and the warp sums its lanes at the end of a row set.
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
  int n, k_in, k, block, group;
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
// Experiment (off): skip the quantizer (the codes are whatever shared memory holds: wrong outputs, the time of the rest)
#ifndef LOWBIT_GEMV_SKIP_QUANT
#define LOWBIT_GEMV_SKIP_QUANT 0
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

// d = c + sum of the four products of unsigned bytes of a and signed bytes of b
__device__ __forceinline__ int dp4a_us(uint32_t a, int b, int c) {
  int d;
  asm("dp4a.u32.s32 %0, %1, %2, %3;" : "=r"(d) : "r"(a), "r"(b), "r"(c));
  return d;
}

template <int TILE, int MT>
__global__ void __launch_bounds__(WARPS * 32) gemv_kernel(Args a, int rowsets) {
  constexpr int CPT = TILE / 32;           // 16-byte chunks per tile
  constexpr int HALF = TILE / 2;
  extern __shared__ __align__(16) uint8_t smem[];
  const int m = a.m, k = a.k;
  int8_t* codes = reinterpret_cast<int8_t*>(smem);                                 // [m, k]
  float* ascale = reinterpret_cast<float*>(smem + ((m * k + 15) & ~15));          // [m, k / block]
  int* asum = reinterpret_cast<int*>(ascale + m * (k >> a.log_block));             // [m, k / 32]
  const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
  const int nchunks = k >> 5;                // 16-byte chunks of a row
  const int steps = nchunks >> 5;            // warp steps of 32 chunks (k is a multiple of 1024)
  const int rounds = (steps + D - 1) / D;
  constexpr int LG_TILE = TILE == 32 ? 5 : TILE == 64 ? 6 : TILE == 128 ? 7 : TILE == 256 ? 8 : TILE == 512 ? 9 : 10;

  // round `rd` of row set `rs`: this lane's chunks (rd * D + i) * 32 + lane of its RPW rows, with their weight scales
  auto load_round = [&](int rs, int rd, uint4 (&wb)[RPW][D], float (&sb)[RPW][D]) {
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
      const int row = min((rs * WARPS + warp) * RPW + r, a.n - 1);  // rows past n read the last row (never stored)
      const uint8_t* wrow = a.w + (long long)row * a.ldw;
      const __half* srow = a.ws + (long long)row * a.ldws;
#pragma unroll
      for (int i = 0; i < D; ++i) {
        const int c = (rd * D + i) * 32 + lane;
        const bool ok = rs < rowsets && rd * D + i < steps;
        wb[r][i] = ok ? load_stream(wrow + 16 * c) : make_uint4(0, 0, 0, 0);
        sb[r][i] = ok ? __half2float(srow[((c / CPT) << LG_TILE) >> a.log_group]) : 0.f;
      }
    }
  };

  int rs = blockIdx.x, rd = 0;
  uint4 buf[RPW][D];
  float wsb[RPW][D];
  load_round(rs, rd, buf, wsb);  // in flight while the tokens are quantized
  if (!LOWBIT_GEMV_SKIP_QUANT) {
    switch (a.block >> 5) {      // elements per lane of a quantization block
      case 1: quantize<1>(a, codes, ascale); break;
      case 2: quantize<2>(a, codes, ascale); break;
      case 4: quantize<4>(a, codes, ascale); break;
      default: quantize<8>(a, codes, ascale); break;
    }
  }
  __syncthreads();
  // per token and 16-byte weight chunk: the sum of the 32 activation codes it multiplies (the weights are read as
  // unsigned nibbles q + 8; sum (q + 8) a - 8 sum a = sum q a)
  for (int idx = threadIdx.x; idx < m * nchunks; idx += WARPS * 32) {
    const int tok = idx / nchunks, c = idx - tok * nchunks;
    const int8_t* ca = codes + tok * k + ((c / CPT) << LG_TILE) + (c % CPT) * 16;
    const int4 lo = *reinterpret_cast<const int4*>(ca), hi = *reinterpret_cast<const int4*>(ca + HALF);
    int s = 0;
    s = __dp4a(lo.x, 0x01010101, s); s = __dp4a(lo.y, 0x01010101, s); s = __dp4a(lo.z, 0x01010101, s);
    s = __dp4a(lo.w, 0x01010101, s); s = __dp4a(hi.x, 0x01010101, s); s = __dp4a(hi.y, 0x01010101, s);
    s = __dp4a(hi.z, 0x01010101, s); s = __dp4a(hi.w, 0x01010101, s);
    asum[idx] = s << 3;
  }
  __syncthreads();

  const int nb = k >> a.log_block;
  float acc[RPW][MT];
#pragma unroll
  for (int r = 0; r < RPW; ++r)
#pragma unroll
    for (int t = 0; t < MT; ++t) acc[r][t] = 0.f;

  while (rs < rowsets) {
    int nrs = rs, nrd = rd + 1;
    if (nrd == rounds) { nrd = 0; nrs += gridDim.x; }
    uint4 nxt[RPW][D];
    float nws[RPW][D];
    load_round(nrs, nrd, nxt, nws);
#pragma unroll
    for (int i = 0; i < D; ++i) {
      if (rd * D + i >= steps) break;          // uniform over the warp
      const int c = (rd * D + i) * 32 + lane;
      const int t = c / CPT;                   // this lane's tile
      const int8_t* cbase = codes + (t << LG_TILE) + (c % CPT) * 16;
      int4 alo[MT], ahi[MT];
      float sa[MT];
      int corr[MT];
#pragma unroll
      for (int tok = 0; tok < MT; ++tok) {
        if (tok < m) {
          alo[tok] = *reinterpret_cast<const int4*>(cbase + tok * k);
          ahi[tok] = *reinterpret_cast<const int4*>(cbase + tok * k + HALF);
          sa[tok] = ascale[tok * nb + ((t << LG_TILE) >> a.log_block)];
          corr[tok] = asum[tok * nchunks + c];
        } else {
          alo[tok] = ahi[tok] = make_int4(0, 0, 0, 0);
          sa[tok] = 0.f;
          corr[tok] = 0;
        }
      }
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const uint4 w = buf[r][i];
        const uint32_t l0 = w.x & 0x0F0F0F0Fu, l1 = w.y & 0x0F0F0F0Fu, l2 = w.z & 0x0F0F0F0Fu, l3 = w.w & 0x0F0F0F0Fu;
        const uint32_t h0 = (w.x >> 4) & 0x0F0F0F0Fu, h1 = (w.y >> 4) & 0x0F0F0F0Fu;
        const uint32_t h2 = (w.z >> 4) & 0x0F0F0F0Fu, h3 = (w.w >> 4) & 0x0F0F0F0Fu;
#pragma unroll
        for (int tok = 0; tok < MT; ++tok) {
          int p = -corr[tok];
          p = dp4a_us(l0, alo[tok].x, p); p = dp4a_us(l1, alo[tok].y, p);
          p = dp4a_us(l2, alo[tok].z, p); p = dp4a_us(l3, alo[tok].w, p);
          p = dp4a_us(h0, ahi[tok].x, p); p = dp4a_us(h1, ahi[tok].y, p);
          p = dp4a_us(h2, ahi[tok].z, p); p = dp4a_us(h3, ahi[tok].w, p);
          acc[r][tok] = fmaf(__int2float_rn(p), sa[tok] * wsb[r][i], acc[r][tok]);
        }
      }
    }
    if (nrd == 0) {  // the row set is done: sum the lanes, add the bias, store
#pragma unroll
      for (int r = 0; r < RPW; ++r) {
        const int row = (rs * WARPS + warp) * RPW + r;
#pragma unroll
        for (int tok = 0; tok < MT; ++tok) {
          float v = acc[r][tok];
#pragma unroll
          for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
          acc[r][tok] = 0.f;
          if (lane == 0 && row < a.n && tok < m) {
            if (a.bias) v += a.bias[row];
            const long long o = (long long)tok * a.ldo + row;
            if (a.out_bf16) reinterpret_cast<__nv_bfloat16*>(a.out)[o] = __float2bfloat16_rn(v);
            else reinterpret_cast<__half*>(a.out)[o] = __float2half_rn(v);
          }
        }
      }
    }
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
      for (int i = 0; i < D; ++i) { buf[r][i] = nxt[r][i]; wsb[r][i] = nws[r][i]; }
    rs = nrs;
    rd = nrd;
  }
}

size_t smem_bytes(const Args& a) {
  return ((size_t)(a.m * a.k + 15) & ~(size_t)15) + sizeof(float) * a.m * (a.k / a.block) + sizeof(int) * a.m * (a.k / 32);
}

template <int TILE, int MT>
int launch(const Args& a, cudaStream_t stream) {
  const size_t smem = smem_bytes(a);
  auto kern = gemv_kernel<TILE, MT>;
  if (smem > 48 * 1024) {
    cudaError_t err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return (int)err;
  }
  // persistent: at most one wave of CTAs, each quantizing the tokens once and taking row sets in turn
  int dev = 0, sms = 0, per_sm = 0;
  cudaGetDevice(&dev);
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, dev);
  cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, WARPS * 32, smem);
  const int rowsets = (a.n + WARPS * RPW - 1) / (WARPS * RPW);
  const int grid = min(rowsets, max(per_sm, 1) * sms);
  kern<<<grid, WARPS * 32, smem, stream>>>(a, rowsets);
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
    void* out, long long ldo, int out_bf16, int n, int k_in, int k, int block, int group, void* stream) {
  const int tile = block < group ? block : group;
  const bool pow2 = !(block & (block - 1)) && !(group & (group - 1));
  if (m < 1 || m > 4 || !pow2 || tile < 32 || block > 256 || group > 1 << 20 || k % 1024 || k % block ||
      k % group || k_in > k)
    return (int)cudaErrorInvalidValue;
  Args a{x, ldx, m, x_bf16, perm, mask, low_hi, reinterpret_cast<const uint8_t*>(w), ldw,
         reinterpret_cast<const __half*>(ws), ldws, bias, out, ldo, out_bf16, n, k_in, k, block, group,
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

// Paged KIVI-2/4 decode attention on tensor cores (sm_80+; built for the device at first use).
//
// Storage: pages of P = 128 tokens of one sequence and KV head (lowbit.quant.kivi.PageLayout):
//   [key codes | value codes | key scale | key zero | value scale | value zero]
// codes in the order the mma.m16n8k16 B fragments need them (lowbit.quant.kivi.fragment_index), so each lane reads
// its operands with 16-byte loads and turns two codes into a half2 with one AND (fp16 subnormals, code * 2^(pos-24),
// LOWBIT_PAGED_SUBNORMAL_K/V) or one lop3 (base + code, the older path), then folds scale, zero and the power of two
// into the MMAs' other operand.
//
// Grid B * H_kv + N (1-D). Programs 0 .. B*H_kv-1 take the tails (below). The page programs split the pages of all
// sequences and heads evenly, stream-K style: (sequence x head) bh owns virtual pages [bh*V, (bh+1)*V) (V: the most
// key pages a sequence holds), and page program c takes [c*C, (c+1)*C), one segment per (sequence x head) that range
// touches (a partial each), so every program does the same work whatever the batch and the split of a sequence into
// programs, and N can be the GPU's resident slots (one wave). Pages past a sequence's own count are skipped. 4 warps,
// warp w owning tokens 32w..32w+31 of each page (= key group w); pages staged through shared memory with cp.async
// (STAGES deep). Scores transposed, S^T = K Q^T: 16 tokens of key codes as the A operand, the GQA group's query
// heads x query tokens (<= 8) as the n8 side; online softmax in registers; O^T += V^T P^T
// with P^T's B fragments made from the score accumulators by 8x8 movmatrix transposes. Tail programs (dispatched first,
// so they overlap the pages): the sinks and the tail (tokens whose key or value is still full precision, or in a
// partly filled page), CUDA-core code over rows staged by cp.async. Each (sequence x head) stores its page partials
// in program order with the tail's last; a second kernel merges them (log-sum-exp).
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#include <stdint.h>

// CTAs per SM the main kernel is register-limited for (H200, both widths fastest at 4: 128 registers; 2-bit folded
// spill-free, 4-bit a few bytes). Override with -DLOWBIT_PAGED_MINBLOCKS=n in $LOWBIT_NVCC_FLAGS to compare.
#ifndef LOWBIT_PAGED_MINBLOCKS
#define LOWBIT_PAGED_MINBLOCKS 4
#endif
// Independent accumulators for the score bias (each MMA waits for the previous one on its accumulator: one chain of
// 16 dependent MMAs per page with 1).
#ifndef LOWBIT_PAGED_BIAS_CHAINS
#define LOWBIT_PAGED_BIAS_CHAINS 2
#endif
// Experiment (off): skip the accumulator rescale of a page when no row's running max moved (the factor is exactly 1
// then, so the result is the same bit for bit). H200, 2026-12-02/03: within noise (B8/32K 87.5-88.3 vs 87.9-88.4 us).
#ifndef LOWBIT_PAGED_LAZY_RESCALE
#define LOWBIT_PAGED_LAZY_RESCALE 0
#endif
// Folded variant: code pairs enter the MMAs as fp16 subnormals (code << pos, exponent 0: code * 2^(pos - 24), one
// AND, no base to subtract or cancel); the per-position power of two is folded into the other operand (values: P of
// the lower 8 tokens of each 16-token chunk, then one fix per channel half; keys: Q per channel, then 2^24 on the
// scores). 0 keeps the base + code magic with the base subtracted (values) or cancelled by bias MMAs (keys).
#ifndef LOWBIT_PAGED_SUBNORMAL_V
#define LOWBIT_PAGED_SUBNORMAL_V 1
#endif
#ifndef LOWBIT_PAGED_SUBNORMAL_K
#define LOWBIT_PAGED_SUBNORMAL_K 1
#endif
// Programmatic dependent launch (sm_90+): the merge kernel is launched while the last page programs still run and
// waits on the device (griddepcontrol) instead of behind a full launch gap. Off: no measurable effect on the H200
// (2026-12-03: B8/32K 88.4 vs 88.2 us, B32/32K 285-288 vs 291, B1/128K 55.1-55.5 vs 54.5-54.8).
#ifndef LOWBIT_PAGED_PDL
#define LOWBIT_PAGED_PDL 0
#endif
// Debug build (tools/paged_timeline.py): each main-kernel program writes (start ns, end ns, SM, is_tail << 32 | pages)
// into the buffer passed as `timeline`, to see the launch ramp, program durations and the last wave. With one page
// run per (sequence, head) split it showed SMs holding four runs of 32 pages ending at ~81 us and SMs holding three at
// ~55 us (B8/32K, H200, 2026-12-03): the SM is the bound, so the page programs are now equal slices of all pages.
// A persistent grid whose programs claimed slices from an atomic counter (so slower SMs take fewer) was slower at
// every slice size tried: each slice restarts the cp.async pipeline and the prologue (B8/32K 97.6 us with ~16-page
// slices, 109.8 with 8, against 90.8 for one static slice per program in the same build).
// 528 slices equal to a page with the tails dispatched last evened the pages per SM (124 each, most SMs done by 72 us)
// but the tails, landing beside running slices, held some SMs to 81-96 us (B8/32K 95.2 us against 84.5 for this).
// Each tail as w virtual pages after its (sequence x head)'s key pages, run inside 528 equal slices, was no better at
// any weight across the points (w = 4: B8/32K 95.0 us, the slices holding a last, MIXED page slow; w = 16: 83.4 /
// 282.0 / 51.5 us against 84.5-84.8 / 274.5-278.1 / 50.5 for this at B8/32K, B32/32K, B1/128K; stop 28, KERNELS.md).
#ifndef LOWBIT_PAGED_TIMELINE
#define LOWBIT_PAGED_TIMELINE 0
#endif
// The tail programs come after the page slices in block order (stop 29). With the tails first, the 64 tails of
// B8/32K (empty, ~4 us each) took 64 of the 528 slots, so 48 of the 512 slices started ~4.3 us late, and those were
// the last to end (78-81 us against a median of 63; timeline, H200). Last, they fill the 16 free slots and then the
// slots of the first slices to end (B8/32K 83.1-83.8 us against 83.9-84.2 with them first; with LOWBIT_PAGED_FP_SLAB
// 80.8-81.0 against 81.4-82.1; same loan, tools/paged_variants.py, 3 rounds).
#ifndef LOWBIT_PAGED_TAILS_LAST
#define LOWBIT_PAGED_TAILS_LAST 1
#endif
// A warp slab whose 32 values are all still full precision (at the bench points, the last page of every sequence x
// head) builds its V^T fragments from 8x8 tiles of V loaded row-wise (one 4-byte load per lane) and transposed by
// movmatrix, instead of the MIXED path's 128 two-byte loads and selects per lane (stop 29: B8/32K 81.4-82.1 us
// against 83.9-84.2, B1/128K 47.9-48.1 against 50.0-50.3; the slices holding such a page had taken a median 67.2 us
// against 62.2 for the others).
#ifndef LOWBIT_PAGED_FP_SLAB
#define LOWBIT_PAGED_FP_SLAB 1
#endif
#if LOWBIT_PAGED_PDL && defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
#define LOWBIT_PDL_TRIGGER() asm volatile("griddepcontrol.launch_dependents;" ::: "memory")
#define LOWBIT_PDL_WAIT() asm volatile("griddepcontrol.wait;" ::: "memory")
#else
#define LOWBIT_PDL_TRIGGER() do {} while (0)
#define LOWBIT_PDL_WAIT() do {} while (0)
#endif

namespace {

constexpr int D = 128;       // head dim
constexpr int P = 128;       // tokens per page
constexpr int THREADS = 128; // 4 warps
constexpr int MAXROWS = 8;  // query heads per KV head x query tokens: the n8 side of the P V product

template <int BITS>
struct Lay {
  static constexpr int PPW = 16 / BITS;               // half2 pairs per 32-bit word
  static constexpr int WPT = (D / 2) / PPW;           // words per lane per slab: 8 (2-bit), 16 (4-bit)
  static constexpr int CODE = P * D * BITS / 8;       // bytes of one code area
  static constexpr int KS = 2 * CODE;                 // key scale [P/32][D] fp16
  static constexpr int KZ = KS + (P / 32) * D * 2;
  static constexpr int VS = KZ + (P / 32) * D * 2;    // value scale [D/32][P] fp16
  static constexpr int VZ = VS + (D / 32) * P * 2;
  static constexpr int BYTES = VZ + (D / 32) * P * 2;
  static constexpr unsigned MASK = BITS == 2 ? 0x00030003u : 0x000f000fu;
  // one warp's share of a page (its 32 tokens), staged in the warp's own shared-memory ring
  static constexpr int SLAB_CODE = CODE / 4;                         // key (or value) codes of 32 tokens
  static constexpr int S_KS = 2 * SLAB_CODE, S_KZ = S_KS + D * 2;     // key scale / zero of the slab's group [D]
  static constexpr int S_VS = S_KZ + D * 2, S_VZ = S_VS + (D / 32) * 32 * 2;  // value scale / zero [D/32][32]
  static constexpr int SLAB = S_VZ + (D / 32) * 32 * 2;              // 3072 (2-bit) / 5120 (4-bit) bytes
};

struct Args {
  const uint8_t* pool; long long stride_block, stride_head;  // bytes
  const int* table; int max_pages;                            // block = table ? table[b*max_pages+p] : b*max_pages+p
  const void* q; long long q_sb, q_sh, q_st;                  // [B, Hq, nq, D] (elements)
  int batch, hq, hkv, nq, gqa, rows;
  float scale_log2;
  const int* seq;                                             // [B, 5]: n_sink, n_qk, n_qv, total, start (or null)
  int u_sink, u_qk, u_qv, u_total;                            // uniform counts when seq is null
  const int* start;                                           // [B] first unpadded position, or null
  const void* sink_k; const void* sink_v; long long sk_sb, sk_sh;
  const void* res_k; long long rk_sb, rk_sh;
  const void* res_v; long long rv_sb, rv_sh;
  float* part_acc; float* part_ml;                            // [B*Hkv, parts+1, rows, D], [B*Hkv, parts+1, rows, 2]
  int parts;                                                  // page partials a (sequence x head) may have (slots)
  int bh_pages, chunk, chunks;                                // V, C, N of the stream-K split (see the top)
  unsigned long long* timeline;                               // debug build only: 4 words per program
  int ring;                                                   // -1: residual rows from n_q on; R - 1: a ring of R rows
  void* out; long long o_sb, o_st, o_sh;                      // [B, nq, Hq, D] (elements)
};

template <typename T> __device__ __forceinline__ float to_f(T x);
template <> __device__ __forceinline__ float to_f<__half>(__half x) { return __half2float(x); }
template <> __device__ __forceinline__ float to_f<__nv_bfloat16>(__nv_bfloat16 x) { return __bfloat162float(x); }
template <typename T> __device__ __forceinline__ T from_f(float x);
template <> __device__ __forceinline__ __half from_f<__half>(float x) { return __float2half_rn(x); }
template <> __device__ __forceinline__ __nv_bfloat16 from_f<__nv_bfloat16>(float x) { return __float2bfloat16_rn(x); }

struct Seq { int n_sink, n_qk, n_qv, total, start; };

// row of the full-precision residual that holds quantized index k (k >= nq): linear from nq (ring < 0), or row k % R of
// a ring of R = ring + 1 rows (a power of two). A mask, not `k % R`: the division's registers made the 2-bit main loop
// spill (~25 % slower, H200).
__device__ __forceinline__ long long res_row(int ring, int k, int nq) { return ring >= 0 ? (k & ring) : k - nq; }

// page programs whose slices touch (sequence x head) bh, in program order (its page partials; the tail's comes next)
__device__ __forceinline__ int page_partials(const Args& a, int bh) {
  const int V = a.bh_pages;
  return V ? ((bh + 1) * V - 1) / a.chunk - bh * V / a.chunk + 1 : 0;
}

__device__ __forceinline__ Seq load_seq(const Args& a, int b) {
  Seq s;
  if (a.seq) {
    const int* p = a.seq + 5 * b;
    s.n_sink = p[0]; s.n_qk = p[1]; s.n_qv = p[2]; s.total = p[3]; s.start = p[4];
  } else {
    s.n_sink = a.u_sink; s.n_qk = a.u_qk; s.n_qv = a.u_qv; s.total = a.u_total;
    s.start = a.start ? a.start[b] : 0;
  }
  return s;
}

__device__ __forceinline__ const uint8_t* page_ptr(const Args& a, int b, int h, int page) {
  long long blk = a.table ? (long long)a.table[(long long)b * a.max_pages + page] : (long long)b * a.max_pages + page;
  return a.pool + blk * a.stride_block + (long long)h * a.stride_head;
}

__device__ __forceinline__ uint32_t lop3_and_or(uint32_t x, uint32_t m, uint32_t c) {
  uint32_t r;
  asm("lop3.b32 %0, %1, %2, %3, 0xEA;" : "=r"(r) : "r"(x), "r"(m), "r"(c));  // (x & m) | c
  return r;
}

// Pair i of a word sits at bit pos(i) of each 16-bit half. A code at mantissa bit `pos` of an fp16 whose exponent
// says 2^(10 - pos) reads as base(i) + code exactly (the ulp there is 2^-pos), so a code pair needs one lop3 and no
// shift while pos + BITS <= 10; the upper half of the pairs comes from one shared `word >> 8`. base(i) is a
// compile-time constant (1024, 256, 64, 16 for 2-bit; 1024, 64 for 4-bit) that the callers subtract or fold.
template <int BITS>
__device__ __forceinline__ constexpr int code_pos(int i) { return BITS * (i % (8 / BITS)); }
template <int BITS>
__device__ __forceinline__ constexpr float code_base(int i) { return float(1 << (10 - code_pos<BITS>(i))); }
template <int BITS>
__device__ __forceinline__ __half2 codes2(uint32_t word, int i) {  // (base(i) + lo, base(i) + hi) as half2
  const uint32_t src = i < 8 / BITS ? word : word >> 8;
  const int pos = code_pos<BITS>(i);
  const uint32_t magic = (uint32_t)(25 - pos) << 10;  // fp16 exponent field of 2^(10 - pos)
  uint32_t v = lop3_and_or(src, Lay<BITS>::MASK << pos, magic | (magic << 16));
  return *reinterpret_cast<__half2*>(&v);
}
template <int BITS>
__device__ __forceinline__ uint32_t codes2_sub(uint32_t word, int i) {  // pair i as fp16 subnormals: code * 2^(pos(i) - 24)
  const uint32_t src = i < 8 / BITS ? word : word >> 8;
  return src & (Lay<BITS>::MASK << code_pos<BITS>(i));
}
template <int BITS>
__device__ __forceinline__ uint32_t base_bits(int i, bool negative) {  // half2(±base(i), ±base(i)) as bits
  const uint32_t h = ((uint32_t)(25 - code_pos<BITS>(i)) << 10) | (negative ? 0x8000u : 0u);
  return h | (h << 16);
}
template <int BITS>
__device__ __forceinline__ __half2 base2(int i) {
  const uint32_t v = base_bits<BITS>(i, false);
  return *reinterpret_cast<const __half2*>(&v);
}

// keys (transposed scores): the A fragment of 16 tokens x channel chunk kc holds code pair (2 kc) % PPW for channels
// 2q.. (hf 0) and the next pair for 2q+8.. (hf 1)
template <int BITS>
__device__ __forceinline__ constexpr int key_pos(int kc, int hf) { return code_pos<BITS>((2 * kc) % (16 / BITS) + hf); }
template <int BITS>
__device__ __forceinline__ float key_pos_scale(int kc, int hf) { return 1.f / float(1 << key_pos<BITS>(kc, hf)); }

__device__ __forceinline__ uint32_t h2u(__half2 h) { return *reinterpret_cast<uint32_t*>(&h); }

__device__ __forceinline__ void mma16816(float* c, const uint32_t* a, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, {%0,%1,%2,%3};"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// 8x8 transpose of 16-bit elements across the warp: lane (g, q) holds row g, columns 2q, 2q+1 before and after
__device__ __forceinline__ uint32_t transpose8x8(uint32_t x) {
  uint32_t y;
  asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(y) : "r"(x));
  return y;
}

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem) {
  uint32_t s = (uint32_t)__cvta_generic_to_shared(smem);
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" :: "r"(s), "l"(gmem));
}
__device__ __forceinline__ void cp_commit() { asm volatile("cp.async.commit_group;"); }
template <int N> __device__ __forceinline__ void cp_wait() { asm volatile("cp.async.wait_group %0;" :: "n"(N)); }

template <int BITS>
__device__ __forceinline__ int page_code(const uint8_t* pg, int t, int c, bool values) {
  // the scalar inverse of lowbit.quant.kivi.fragment_index
  using L = Lay<BITS>;
  int w = t / 32, lane, pair, e;
  if (values) {  // A fragments of V^T [16 channels x 16 tokens]
    int kt = (t % 32) / 16, tt = t % 16, th = tt / 8, q = (tt % 8) / 2, cc = c % 16;
    e = tt % 2; lane = (cc % 8) * 4 + q; pair = (kt * (D / 16) + c / 16) * 4 + (cc / 8) + 2 * th;
  } else {
    int j = (t % 32) / 8, r = t % 8, cc = c % 16, hh = cc / 8, q = (cc % 8) / 2;
    e = cc % 2; lane = r * 4 + q; pair = (j * (D / 16) + c / 16) * 2 + hh;
  }
  int wd = pair / L::PPW, i = pair % L::PPW;
  int word = w * (32 * L::WPT) + (wd / 4) * 128 + lane * 4 + (wd % 4);
  uint32_t x = reinterpret_cast<const uint32_t*>(pg + (values ? L::CODE : 0))[word];
  return (x >> (BITS * i + 16 * e)) & ((1 << BITS) - 1);
}

// ------------------------------------------------------------------------------------------------ main

template <int BITS, bool MIXED, typename T>
__device__ __forceinline__ void value_product(float (&acc)[D / 16][4], const uint32_t (&pb)[2][2],
                                              const uint32_t (&words)[Lay<BITS>::WPT], const __half* vsc,
                                              const __half* vzr, int warp, int g, int qd, int page, const Seq& sq,
                                              const T* rv, int ring) {
  // vsc / vzr: the slab's value scales / zeros, [D/32 groups][32 tokens]
  // O^T += V^T P^T over one warp's 32 tokens of a page (A = dequantized value codes, B = probabilities)
  using L = Lay<BITS>;
  const int n_kept = sq.total - sq.n_sink, n_res_v = n_kept - sq.n_qv;
#pragma unroll
  for (int kt = 0; kt < 2; ++kt) {
    const int tl = kt * 16 + qd * 2, t0 = warp * 32 + tl;  // slab / page token of a0a1 / a2a3; a4..a7 at +8
#pragma unroll
    for (int vg = 0; vg < D / 32; ++vg) {
      const __half2 s0 = *reinterpret_cast<const __half2*>(vsc + vg * 32 + tl);
      const __half2 s1 = *reinterpret_cast<const __half2*>(vsc + vg * 32 + tl + 8);
      const __half2 z0 = *reinterpret_cast<const __half2*>(vzr + vg * 32 + tl);
      const __half2 z1 = *reinterpret_cast<const __half2*>(vzr + vg * 32 + tl + 8);
#pragma unroll
      for (int m2 = 0; m2 < 2; ++m2) {
        const int m = vg * 2 + m2;
        const int p = (kt * (D / 16) + m) * 4;
        uint32_t af[4];  // a01: (ch g, t0), a23: (ch g+8, t0), a45: (ch g, t0+8), a67: (ch g+8, t0+8)
#pragma unroll
        for (int w4 = 0; w4 < 4; ++w4) {
          const __half2 c = codes2<BITS>(words[(p + w4) / L::PPW], (p + w4) % L::PPW);
          __half2 v = __hfma2(__hsub2(c, base2<BITS>((p + w4) % L::PPW)), w4 < 2 ? s0 : s1, w4 < 2 ? z0 : z1);
          if (MIXED) {
            const int ch = m * 16 + g + (w4 & 1) * 8;
            const int k = page * P + t0 + (w4 >> 1) * 8;  // quantized index of the pair's first token
            const int lo = sq.n_qv, hi = sq.n_qv + max(n_res_v - 1, 0);  // clamped to the rows held
            const float x0 = to_f(rv[res_row(ring, min(max(k, lo), hi), sq.n_qv) * D + ch]);
            const float x1 = to_f(rv[res_row(ring, min(max(k + 1, lo), hi), sq.n_qv) * D + ch]);
            const float f0 = k < sq.n_qv ? __low2float(v) : (k < n_kept ? x0 : 0.f);
            const float f1 = k + 1 < sq.n_qv ? __high2float(v) : (k + 1 < n_kept ? x1 : 0.f);
            v = __floats2half2_rn(f0, f1);
          }
          af[w4] = h2u(v);
        }
        mma16816(acc[m], af, pb[kt][0], pb[kt][1]);
      }
    }
  }
}

// two adjacent residual elements as the bits of an fp16 pair
__device__ __forceinline__ uint32_t half2_bits(const __half* src) { return *reinterpret_cast<const uint32_t*>(src); }
__device__ __forceinline__ uint32_t half2_bits(const __nv_bfloat16* src) {
  return h2u(__float22half2_rn(__bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(src))));
}

template <typename T>
__device__ __forceinline__ void value_product_fp(float (&acc)[D / 16][4], const uint32_t (&pb)[2][2], int k0, int g,
                                                 int qd, const Seq& sq, const T* rv, int ring) {
  // O^T += V^T P^T over a warp's 32 tokens whose values are all in the residual (k0 >= n_qv). Fragment w4 of chunk
  // (kt, m) is the 8x8 tile V[tokens kt*16 + (w4 >> 1)*8 ..][channels m*16 + (w4 & 1)*8 ..] transposed: lane (g, q)
  // loads row g, channels 2q, 2q + 1 of it, and movmatrix hands it (channel g, tokens 2q, 2q + 1). Tokens past the
  // rows held (masked, p = 0) read the last row held, so every product is finite.
  const int n_kept = sq.total - sq.n_sink;
  const int hi = sq.n_qv + max(n_kept - sq.n_qv - 1, 0);
  int row[4];  // element offset of token k0 + 8 j + g's residual row, channel 2q
#pragma unroll
  for (int j = 0; j < 4; ++j) row[j] = (int)res_row(ring, min(k0 + 8 * j + g, hi), sq.n_qv) * D + 2 * qd;
#pragma unroll
  for (int kt = 0; kt < 2; ++kt) {
#pragma unroll
    for (int m = 0; m < D / 16; ++m) {
      uint32_t af[4];
#pragma unroll
      for (int w4 = 0; w4 < 4; ++w4) af[w4] = transpose8x8(half2_bits(rv + row[kt * 2 + (w4 >> 1)] + m * 16 + (w4 & 1) * 8));
      mma16816(acc[m], af, pb[kt][0], pb[kt][1]);
    }
  }
}

template <int BITS>
__device__ __forceinline__ void value_product_folded(float (&acc)[D / 16][4], float (&zs)[4], const uint32_t (&pb)[2][2],
                                                     const uint32_t (&words)[Lay<BITS>::WPT], const __half* vsc,
                                                     const __half* vzr, int g, int qd) {
  // value scales folded into P (B = P^T * s, per 32-channel group), exact codes in A (lop3 magic, minus its base:
  // no offset left to cancel against the rounded P * s); zs accumulates, for row g, sum_t p_t z_t of each group
  // (columns 0-3) with one extra MMA per 16 tokens (A = P, B = z); the merge adds them.
  // LOWBIT_PAGED_SUBNORMAL_V: register w4 of a value A fragment (channel half h = w4 & 1, token half w4 >> 1) holds
  // codes at bit code_pos(w4), i.e. code * 2^(code_pos(w4) - 24); P of the lower token half is scaled by
  // 2^V_TOKEN_SHIFT so both halves carry 2^(code_pos(2 + h) - 24), undone per channel half by value_unscale.
  using L = Lay<BITS>;
  constexpr bool SUB = LOWBIT_PAGED_SUBNORMAL_V;
  constexpr int V_TOKEN_SHIFT = code_pos<BITS>(2) - code_pos<BITS>(0);
#pragma unroll
  for (int kt = 0; kt < 2; ++kt) {
    const int tl = kt * 16 + qd * 2;
    {
      const __half* src = vzr + (g & 3) * 32;  // B = z: column g < 4 (columns 4-7 repeat them, unused)
      const uint32_t b0 = *reinterpret_cast<const uint32_t*>(src + tl), b1 = *reinterpret_cast<const uint32_t*>(src + tl + 8);
      const uint32_t ap[4] = {pb[kt][0], 0u, pb[kt][1], 0u};  // A = P: row g, tokens 2q.. and 2q+8..
      mma16816(zs, ap, b0, b1);
    }
    __half2 plo = *reinterpret_cast<const __half2*>(&pb[kt][0]);
    if (SUB && V_TOKEN_SHIFT) plo = __hmul2(plo, __float2half2_rn(float(1 << V_TOKEN_SHIFT)));  // exact
#pragma unroll
    for (int vg = 0; vg < D / 32; ++vg) {
      const __half2 s0 = *reinterpret_cast<const __half2*>(vsc + vg * 32 + tl);
      const __half2 s1 = *reinterpret_cast<const __half2*>(vsc + vg * 32 + tl + 8);
      const uint32_t b0 = h2u(__hmul2(plo, s0));
      const uint32_t b1 = h2u(__hmul2(*reinterpret_cast<const __half2*>(&pb[kt][1]), s1));
#pragma unroll
      for (int m2 = 0; m2 < 2; ++m2) {
        const int m = vg * 2 + m2;
        const int p = (kt * (D / 16) + m) * 4;
        uint32_t af[4];
#pragma unroll
        for (int w4 = 0; w4 < 4; ++w4) {
          const uint32_t word = words[(p + w4) / L::PPW];
          const int i = (p + w4) % L::PPW;
          af[w4] = SUB ? codes2_sub<BITS>(word, i) : h2u(__hsub2(codes2<BITS>(word, i), base2<BITS>(i)));
        }
        mma16816(acc[m], af, b0, b1);
      }
    }
  }
}

template <int BITS>
__device__ __forceinline__ void value_unscale(float (&acc)[D / 16][4]) {
  // the subnormal value products' power of two, per channel half (acc[m][0, 1]: channel m*16 + g, [2, 3]: + 8)
  const float f0 = exp2f(float(24 - code_pos<BITS>(2))), f1 = exp2f(float(24 - code_pos<BITS>(3)));
#pragma unroll
  for (int m = 0; m < D / 16; ++m) { acc[m][0] *= f0; acc[m][1] *= f0; acc[m][2] *= f1; acc[m][3] *= f1; }
}

template <int BITS, int STAGES, bool FOLD, typename T>
__device__ void paged_part(const Args& a, int b, int h, int slot, int p0, int p_end, const Seq& sq, uint8_t* smem) {
  // pages [p0, p_end) of (b, h) (those past its key pages skipped), the partial written to slot `slot`
  using L = Lay<BITS>;
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int g = lane / 4, qd = lane % 4;
  const int kpages = (sq.n_qk + P - 1) / P;  // pages holding quantized keys (the last may be partial)
  const int p1 = min(kpages, p_end);
  const long long part = ((long long)(b * a.hkv + h) * (a.parts + 1) + slot) * a.rows;
  const T* rv = reinterpret_cast<const T*>(a.res_v) + b * a.rv_sb + h * a.rv_sh;
  const int n_kept = sq.total - sq.n_sink;  // tokens after the sinks

  // S = Q K^T with Q as the A operand: row g (rows g + 8 are zero), columns 2q.. and 2q+8.. of each 16-channel chunk,
  // pre-scaled by softmax scale * log2 e
  uint32_t qa[D / 16][2];
  {
    const T* q = reinterpret_cast<const T*>(a.q);
#pragma unroll
    for (int kc = 0; kc < D / 16; ++kc) {
#pragma unroll
      for (int hf = 0; hf < 2; ++hf) {
        const int c = kc * 16 + qd * 2 + hf * 8;
        float x0 = 0.f, x1 = 0.f;
        if (g < a.rows) {
          const int gi = g / a.nq, qi = g % a.nq;
          const T* src = q + b * a.q_sb + (long long)(h * a.gqa + gi) * a.q_sh + (long long)qi * a.q_st + c;
          // FOLD + LOWBIT_PAGED_SUBNORMAL_K: times 2^-pos of the codes this channel meets (exact but for underflow)
          const float f = FOLD && LOWBIT_PAGED_SUBNORMAL_K ? a.scale_log2 * key_pos_scale<BITS>(kc, hf) : a.scale_log2;
          x0 = to_f(src[0]) * f;
          x1 = to_f(src[1]) * f;
        }
        qa[kc][hf] = h2u(__floats2half2_rn(x0, x1));
      }
    }
  }
  // O^T = V^T P^T: acc[m] holds channels m*16 + g (0, 1) and m*16 + g + 8 (2, 3) of rows 2q and 2q + 1
  float acc[D / 16][4];
#pragma unroll
  for (int i = 0; i < D / 16; ++i) acc[i][0] = acc[i][1] = acc[i][2] = acc[i][3] = 0.f;
  float m_r[2] = {-INFINITY, -INFINITY}, l_r[2] = {0.f, 0.f};  // rows 2q, 2q + 1 (l: this lane's tokens only)
  float zs[4] = {0.f, 0.f, 0.f, 0.f};     // FOLD: row g's sums of p z (groups 2q, 2q+1) or p s (q >= 2)
  bool v_scaled = FOLD && LOWBIT_PAGED_SUBNORMAL_V;  // acc holds value_product_folded's scaled products (warp-uniform)

  // each warp stages its own 32-token slab of every page (codes, scales, zeros) in a private ring:
  // no block-wide barrier inside the loop, warps drift independently
  uint8_t* ring = smem + warp * STAGES * L::SLAB;
  // lane's 16-byte chunks of the slab: chunk j at slab offset 16 lane + 512 j. Codes: the first 2 NJC chunks
  // (keys, then values); then key scale | zero (lanes 0-15 | 16-31) and value scale | zero (D/32 groups of 64 bytes)
  constexpr int NJC = L::SLAB_CODE / 512;
  static_assert(L::SLAB == 512 * (2 * NJC + 2) && L::S_KS == 512 * 2 * NJC, "slab layout");
  const int code_src = warp * L::SLAB_CODE + 16 * lane;
  const int kscz_src = L::KS + warp * D * 2 + 16 * lane + (lane >= 16 ? L::KZ - L::KS - 256 : 0);
  const int vscz_src = L::VS + (lane / 4) * P * 2 + warp * 64 + (lane % 4) * 16;  // lanes 16-31 land in VZ
  static_assert(L::VZ - L::VS == 4 * P * 2 && D / 32 == 4, "value scale/zero chunk formula");
  auto issue = [&](int page, int stage) {
    const uint8_t* src = page_ptr(a, b, h, page);
    uint8_t* dst = ring + stage * L::SLAB + 16 * lane;
#pragma unroll
    for (int j = 0; j < 2 * NJC; ++j)
      cp_async16(dst + 512 * j, src + code_src + (j < NJC ? 512 * j : L::CODE + 512 * (j - NJC)));
    cp_async16(dst + 512 * (2 * NJC), src + kscz_src);
    cp_async16(dst + 512 * (2 * NJC + 1), src + vscz_src);
  };
#pragma unroll
  for (int st = 0; st < STAGES - 1; ++st) {
    if (p0 + st < p1) issue(p0 + st, st);
    cp_commit();
  }
  for (int it = 0; p0 + it < p1; ++it) {
    if (p0 + it + STAGES - 1 < p1) issue(p0 + it + STAGES - 1, (it + STAGES - 1) % STAGES);
    cp_commit();
    cp_wait<STAGES - 1>();
    __syncwarp();
    const uint8_t* sl = ring + (it % STAGES) * L::SLAB;
    const int page = p0 + it;
    const int k0 = page * P + warp * 32;  // quantized index of this warp's first token

    // ---- S^T = K Q^T for this warp's 32 tokens: 2 m-tiles of 16 tokens (A = key codes, B = Q^T, no zero rows);
    // sc[mt]: (token 16 mt + g: rows 2q, 2q + 1), (token 16 mt + g + 8: rows 2q, 2q + 1). The A fragment of tokens
    // 16 mt.. is the B fragments of the 8-token tiles 2 mt and 2 mt + 1 the codes are laid out for.
    float sc[2][4];
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) sc[mt][0] = sc[mt][1] = sc[mt][2] = sc[mt][3] = 0.f;
    {
      const uint4* kw = reinterpret_cast<const uint4*>(sl) + lane;
      uint32_t words[L::WPT];
#pragma unroll
      for (int v = 0; v < L::WPT / 4; ++v) {
        const uint4 x = kw[v * 32];
        words[4 * v] = x.x; words[4 * v + 1] = x.y; words[4 * v + 2] = x.z; words[4 * v + 3] = x.w;
      }
      const __half2* ksc = reinterpret_cast<const __half2*>(sl + L::S_KS);
      const __half2* kzr = reinterpret_cast<const __half2*>(sl + L::S_KZ);
      constexpr int NB = LOWBIT_PAGED_BIAS_CHAINS;
      float bias[NB][4];  // FOLD: sum_c q_c z_c - sum_c base_c q_c s_c (every token row alike), in NB partial sums
#pragma unroll
      for (int i = 0; i < NB; ++i) bias[i][0] = bias[i][1] = bias[i][2] = bias[i][3] = 0.f;
#pragma unroll
      for (int kc = 0; kc < D / 16; ++kc) {
        const __half2 s0 = ksc[kc * 8 + qd], s1 = ksc[kc * 8 + 4 + qd];
        const __half2 z0 = kzr[kc * 8 + qd], z1 = kzr[kc * 8 + 4 + qd];
        if (FOLD && LOWBIT_PAGED_SUBNORMAL_K) {
          // codes as subnormals (code * 2^(pos - 24)) against Q * 2^-pos * s: every product is c q s 2^-24; the
          // zero term sum_c q_c z_c with z of the lower channels times 2^-BITS, so chain kc % NB carries 2^-pos(kc, 1)
          static_assert(BITS == 4 || NB % 2 == 0, "2-bit subnormal keys need an even number of bias chains");
          const uint32_t bs0 = h2u(__hmul2(*reinterpret_cast<const __half2*>(&qa[kc][0]), s0));
          const uint32_t bs1 = h2u(__hmul2(*reinterpret_cast<const __half2*>(&qa[kc][1]), s1));
          const uint32_t zl = h2u(__hmul2(z0, __float2half2_rn(1.f / (1 << BITS))));
          const uint32_t az[4] = {zl, zl, h2u(z1), h2u(z1)};
          mma16816(bias[kc % NB], az, qa[kc][0], qa[kc][1]);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            const int p0 = ((2 * mt) * (D / 16) + kc) * 2, p1 = ((2 * mt + 1) * (D / 16) + kc) * 2;
            const uint32_t ak[4] = {codes2_sub<BITS>(words[p0 / L::PPW], p0 % L::PPW),
                                    codes2_sub<BITS>(words[p1 / L::PPW], p1 % L::PPW),
                                    codes2_sub<BITS>(words[(p0 + 1) / L::PPW], (p0 + 1) % L::PPW),
                                    codes2_sub<BITS>(words[(p1 + 1) / L::PPW], (p1 + 1) % L::PPW)};
            mma16816(sc[mt], ak, bs0, bs1);
          }
        } else if (FOLD) {  // scales into Q, codes straight from lop3 (base + c), offsets and zeros as a bias
          const uint32_t bs0 = h2u(__hmul2(*reinterpret_cast<const __half2*>(&qa[kc][0]), s0));
          const uint32_t bs1 = h2u(__hmul2(*reinterpret_cast<const __half2*>(&qa[kc][1]), s1));
          const uint32_t az[4] = {h2u(z0), h2u(z0), h2u(z1), h2u(z1)};
          const uint32_t nb0 = base_bits<BITS>((2 * kc) % L::PPW, true), nb1 = base_bits<BITS>((2 * kc + 1) % L::PPW, true);
          const uint32_t ab[4] = {nb0, nb0, nb1, nb1};
          mma16816(bias[(2 * kc) % NB], az, qa[kc][0], qa[kc][1]);
          mma16816(bias[(2 * kc + 1) % NB], ab, bs0, bs1);
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            const int p0 = ((2 * mt) * (D / 16) + kc) * 2, p1 = ((2 * mt + 1) * (D / 16) + kc) * 2;
            const uint32_t ak[4] = {h2u(codes2<BITS>(words[p0 / L::PPW], p0 % L::PPW)),
                                    h2u(codes2<BITS>(words[p1 / L::PPW], p1 % L::PPW)),
                                    h2u(codes2<BITS>(words[(p0 + 1) / L::PPW], (p0 + 1) % L::PPW)),
                                    h2u(codes2<BITS>(words[(p1 + 1) / L::PPW], (p1 + 1) % L::PPW))};
            mma16816(sc[mt], ak, bs0, bs1);
          }
        } else {
#pragma unroll
          for (int mt = 0; mt < 2; ++mt) {
            const int p0 = ((2 * mt) * (D / 16) + kc) * 2, p1 = ((2 * mt + 1) * (D / 16) + kc) * 2;
            const __half2 c00 = codes2<BITS>(words[p0 / L::PPW], p0 % L::PPW);
            const __half2 c10 = codes2<BITS>(words[p1 / L::PPW], p1 % L::PPW);
            const __half2 c01 = codes2<BITS>(words[(p0 + 1) / L::PPW], (p0 + 1) % L::PPW);
            const __half2 c11 = codes2<BITS>(words[(p1 + 1) / L::PPW], (p1 + 1) % L::PPW);
            const __half2 b0 = base2<BITS>(p0 % L::PPW), b1 = base2<BITS>((p0 + 1) % L::PPW);
            const uint32_t ak[4] = {h2u(__hfma2(__hsub2(c00, b0), s0, z0)), h2u(__hfma2(__hsub2(c10, b0), s0, z0)),
                                    h2u(__hfma2(__hsub2(c01, b1), s1, z1)), h2u(__hfma2(__hsub2(c11, b1), s1, z1))};
            mma16816(sc[mt], ak, qa[kc][0], qa[kc][1]);
          }
        }
      }
      if (FOLD && LOWBIT_PAGED_SUBNORMAL_K) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float bt = 0.f;
#pragma unroll
          for (int i = 0; i < NB; ++i) bt += bias[i][e] * float(1 << key_pos<BITS>(i, 1));
          sc[0][e] = fmaf(sc[0][e], 16777216.f, bt);  // 2^24
          sc[1][e] = fmaf(sc[1][e], 16777216.f, bt);
        }
      } else if (FOLD) {
#pragma unroll
        for (int i = 1; i < NB; ++i) { bias[0][0] += bias[i][0]; bias[0][1] += bias[i][1]; bias[0][2] += bias[i][2]; bias[0][3] += bias[i][3]; }
#pragma unroll
        for (int mt = 0; mt < 2; ++mt) { sc[mt][0] += bias[0][0]; sc[mt][1] += bias[0][1]; sc[mt][2] += bias[0][2]; sc[mt][3] += bias[0][3]; }
      }
    }
    // ---- mask (left padding, keys past n_qk in the last page), online softmax of rows 2q, 2q + 1
    const int pos0 = sq.n_sink + k0;
    if (pos0 < sq.start || k0 + 32 > sq.n_qk) {
#pragma unroll
      for (int mt = 0; mt < 2; ++mt)
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          const int t = mt * 16 + g + (e >> 1) * 8;
          if (pos0 + t < sq.start || k0 + t >= sq.n_qk) sc[mt][e] = -INFINITY;
        }
    }
    float r_r[2];
#pragma unroll
    for (int e = 0; e < 2; ++e) {
      float mx = fmaxf(m_r[e], fmaxf(fmaxf(sc[0][e], sc[0][e + 2]), fmaxf(sc[1][e], sc[1][e + 2])));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 4));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 8));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, 16));
      const float base = mx == -INFINITY ? 0.f : mx;
      r_r[e] = exp2f(m_r[e] - base);
      m_r[e] = mx;
      l_r[e] *= r_r[e];
#pragma unroll
      for (int mt = 0; mt < 2; ++mt) {
        sc[mt][e] = exp2f(sc[mt][e] - base);
        sc[mt][e + 2] = exp2f(sc[mt][e + 2] - base);
        l_r[e] += sc[mt][e] + sc[mt][e + 2];
      }
    }
    if (!LOWBIT_PAGED_LAZY_RESCALE || __any_sync(0xffffffff, r_r[0] != 1.f || r_r[1] != 1.f)) {
#pragma unroll
      for (int i = 0; i < D / 16; ++i) { acc[i][0] *= r_r[0]; acc[i][1] *= r_r[1]; acc[i][2] *= r_r[0]; acc[i][3] *= r_r[1]; }
    }
    {  // zs holds row g: its factor comes from the lane holding row g (lane g / 2: rows 2q, 2q + 1 with q = g / 2)
      const float ra = __shfl_sync(0xffffffff, r_r[0], g >> 1), rb = __shfl_sync(0xffffffff, r_r[1], g >> 1);
      const float rg = (g & 1) ? rb : ra;
      zs[0] *= rg; zs[1] *= rg;
    }
    uint32_t pb[2][2];  // P^T as B fragments of the two 16-token k-chunks: tokens 2q.. (0) and 2q+8.. (1) of row g
#pragma unroll
    for (int mt = 0; mt < 2; ++mt) {
      pb[mt][0] = transpose8x8(h2u(__floats2half2_rn(sc[mt][0], sc[mt][1])));
      pb[mt][1] = transpose8x8(h2u(__floats2half2_rn(sc[mt][2], sc[mt][3])));
    }
    // ---- O^T += V^T P^T over this warp's 32 tokens
    {
      const uint4* vw = reinterpret_cast<const uint4*>(sl + L::SLAB_CODE) + lane;
      uint32_t words[L::WPT];
#pragma unroll
      for (int v = 0; v < L::WPT / 4; ++v) {
        const uint4 x = vw[v * 32];
        words[4 * v] = x.x; words[4 * v + 1] = x.y; words[4 * v + 2] = x.z; words[4 * v + 3] = x.w;
      }
      const __half* vsc = reinterpret_cast<const __half*>(sl + L::S_VS);
      const __half* vzr = reinterpret_cast<const __half*>(sl + L::S_VZ);
      // values past n_qv (only in the last page or two) are still in the residual: that slab takes the MIXED
      // copy of the loop, which loads them unconditionally (clamped index, all in flight at once) and selects
      if (k0 + 32 <= sq.n_qv) {
        if (FOLD) value_product_folded<BITS>(acc, zs, pb, words, vsc, vzr, g, qd);
        else value_product<BITS, false, T>(acc, pb, words, vsc, vzr, warp, g, qd, page, sq, rv, a.ring);
      } else {
        if (v_scaled) { value_unscale<BITS>(acc); v_scaled = false; }  // this and later pages: true scale
        if (LOWBIT_PAGED_FP_SLAB && k0 >= sq.n_qv) value_product_fp<T>(acc, pb, k0, g, qd, sq, rv, a.ring);
        else value_product<BITS, true, T>(acc, pb, words, vsc, vzr, warp, g, qd, page, sq, rv, a.ring);
      }
    }
    __syncwarp();  // this stage is refilled next iteration
  }
  cp_wait<0>();
  if (v_scaled) value_unscale<BITS>(acc);

  // ---- merge the 4 warps (shared memory), write this split's partial
  __syncthreads();
#pragma unroll
  for (int e = 0; e < 2; ++e) {
    l_r[e] += __shfl_xor_sync(0xffffffff, l_r[e], 4);
    l_r[e] += __shfl_xor_sync(0xffffffff, l_r[e], 8);
    l_r[e] += __shfl_xor_sync(0xffffffff, l_r[e], 16);
  }
  float* wm = reinterpret_cast<float*>(smem);  // [4 warps][8 rows] max
  float* wl = wm + 4 * MAXROWS;                // [4][8] sums
  float* wzs = wl + 4 * MAXROWS;               // [4][8][8]: per row, FOLD's p z sums of groups 0-3
  float* wacc = wzs + 4 * MAXROWS * 8;         // [4][8][D]
  if (g == 0) {
    wm[warp * MAXROWS + 2 * qd] = m_r[0]; wm[warp * MAXROWS + 2 * qd + 1] = m_r[1];
    wl[warp * MAXROWS + 2 * qd] = l_r[0]; wl[warp * MAXROWS + 2 * qd + 1] = l_r[1];
  }
  wzs[(warp * MAXROWS + g) * 8 + qd * 2] = zs[0];
  wzs[(warp * MAXROWS + g) * 8 + qd * 2 + 1] = zs[1];
#pragma unroll
  for (int m = 0; m < D / 16; ++m) {
    float* dst = wacc + (warp * MAXROWS + 2 * qd) * D + m * 16 + g;
    dst[0] = acc[m][0]; dst[D] = acc[m][1]; dst[8] = acc[m][2]; dst[D + 8] = acc[m][3];
  }
  __syncthreads();
  for (int idx = threadIdx.x; idx < a.rows * D; idx += THREADS) {
    const int row = idx / D, d = idx % D;
    float M = -INFINITY;
    for (int w = 0; w < 4; ++w) M = fmaxf(M, wm[w * MAXROWS + row]);
    float s = 0.f, lsum = 0.f;
    if (M != -INFINITY) {
      for (int w = 0; w < 4; ++w) {
        const float f = exp2f(wm[w * MAXROWS + row] - M);
        const float* z = wzs + (w * MAXROWS + row) * 8;
        s += f * (wacc[(w * MAXROWS + row) * D + d] + (FOLD ? z[d / 32] : 0.f));
        lsum += f * wl[w * MAXROWS + row];
      }
    }
    a.part_acc[(part + row) * D + d] = s;
    if (d == 0) { a.part_ml[(part + row) * 2] = M; a.part_ml[(part + row) * 2 + 1] = lsum; }
  }
}

// ------------------------------------------------------------------------------------------------ tail

// The tail programs follow the page slices in block order (LOWBIT_PAGED_TAILS_LAST): they fill the slots the slices
// leave and those of the first slices to end. Rows of the staged chunk are 16-byte aligned (KPAD = D + 8: a quarter-warp's 16-byte row reads hit
// distinct banks).
constexpr int KPAD = D + 8;
constexpr int TAIL_CHUNK = 128;

template <int BITS, typename T>
__device__ __forceinline__ float page_elem(const Args& a, int b, int h, int k, int c, bool values) {
  // quantized index k, channel c, dequantized from its page (the tail's slow path: values quantized before keys)
  using L = Lay<BITS>;
  const uint8_t* pg = page_ptr(a, b, h, k / P);
  const int t = k % P;
  const int si = values ? (c / 32) * P + t : (t / 32) * D + c;
  const __half s = reinterpret_cast<const __half*>(pg + (values ? L::VS : L::KS))[si];
  const __half z = reinterpret_cast<const __half*>(pg + (values ? L::VZ : L::KZ))[si];
  return __half2float(__hfma(__int2half_rn(page_code<BITS>(pg, t, c, values)), s, z));
}

template <int BITS, typename T>
__device__ __forceinline__ void stage_tail(const Args& a, int b, int h, const Seq& sq, int c0, int n, bool values,
                                           const T* sink, const T* res, T* kv) {
  // tail tokens c0..c0+n (sinks first, then quantized index n_qk..), 8 channels per step: full-precision rows by
  // cp.async, page-held values element by element
  const int nq = values ? sq.n_qv : sq.n_qk;
  for (int i = threadIdx.x; i < n * (D / 8); i += THREADS) {
    const int u = c0 + i / (D / 8), c = (i % (D / 8)) * 8;
    T* dst = kv + (i / (D / 8)) * KPAD + c;
    if (u < sq.n_sink) { cp_async16(dst, sink + (long long)u * D + c); continue; }
    const int k = sq.n_qk + (u - sq.n_sink);
    if (k >= nq) { cp_async16(dst, res + res_row(a.ring, k, nq) * D + c); continue; }
#pragma unroll
    for (int e = 0; e < 8; ++e) dst[e] = from_f<T>(page_elem<BITS, T>(a, b, h, k, c + e, values));
  }
  cp_commit();
}

template <typename T>
__device__ __forceinline__ void unpack8(uint4 raw, float (&x)[8]) {
  const T* v = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int e = 0; e < 8; ++e) x[e] = to_f(v[e]);
}

template <int BITS, typename T>
__device__ void tail_part(const Args& a, int b, int h, const Seq& sq, uint8_t* smem) {
  const int n_all = sq.total - sq.n_qk;  // sinks, then the tokens whose keys are still full precision
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  float* qs = reinterpret_cast<float*>(smem);        // [MAXROWS][D] scaled queries (rows past a.rows zero)
  float* sc = qs + MAXROWS * D;                      // [MAXROWS][CHUNK] scores, then probabilities, of a chunk
  float* st = sc + MAXROWS * TAIL_CHUNK;             // [MAXROWS][4] running max, sum, chunk rescale
  T* kv = reinterpret_cast<T*>(st + 4 * MAXROWS);    // [CHUNK][KPAD] staged keys, then values
  const T* q = reinterpret_cast<const T*>(a.q);
  for (int idx = threadIdx.x; idx < MAXROWS * D; idx += THREADS) {
    const int row = idx / D, d = idx % D, gi = row / a.nq, qi = row % a.nq;
    qs[idx] = row < a.rows
        ? to_f(q[b * a.q_sb + (long long)(h * a.gqa + gi) * a.q_sh + (long long)qi * a.q_st + d]) * a.scale_log2 : 0.f;
  }
  if (threadIdx.x < MAXROWS) { st[threadIdx.x * 4] = -INFINITY; st[threadIdx.x * 4 + 1] = 0.f; }
  float acc[MAXROWS];
#pragma unroll
  for (int r = 0; r < MAXROWS; ++r) acc[r] = 0.f;
  const T* sk = reinterpret_cast<const T*>(a.sink_k) + b * a.sk_sb + h * a.sk_sh;
  const T* sv = reinterpret_cast<const T*>(a.sink_v) + b * a.sk_sb + h * a.sk_sh;
  const T* rk = reinterpret_cast<const T*>(a.res_k) + b * a.rk_sb + h * a.rk_sh;
  const T* rv = reinterpret_cast<const T*>(a.res_v) + b * a.rv_sb + h * a.rv_sh;
  for (int c0 = 0; c0 < n_all; c0 += TAIL_CHUNK) {
    const int n = min(TAIL_CHUNK, n_all - c0);
    stage_tail<BITS, T>(a, b, h, sq, c0, n, false, sk, rk, kv);
    cp_wait<0>();
    __syncthreads();
    {  // scores: one token per thread, 8 channels per shared-memory read
      const int t = threadIdx.x, u = c0 + t;
      const int pos = u < sq.n_sink ? u : sq.n_qk + u;  // absolute position (sinks hold positions 0..n_sink-1)
      float dots[MAXROWS];
#pragma unroll
      for (int r = 0; r < MAXROWS; ++r) dots[r] = 0.f;
      if (t < n) {
#pragma unroll 2
        for (int c = 0; c < D; c += 8) {
          float x[8];
          unpack8<T>(*reinterpret_cast<const uint4*>(kv + t * KPAD + c), x);
#pragma unroll
          for (int r = 0; r < MAXROWS; ++r) {
            const float4 q0 = *reinterpret_cast<const float4*>(qs + r * D + c);
            const float4 q1 = *reinterpret_cast<const float4*>(qs + r * D + c + 4);
            dots[r] += q0.x * x[0] + q0.y * x[1] + q0.z * x[2] + q0.w * x[3]
                     + q1.x * x[4] + q1.y * x[5] + q1.z * x[6] + q1.w * x[7];
          }
        }
      }
#pragma unroll
      for (int r = 0; r < MAXROWS; ++r) {
        const int qpos = sq.total - a.nq + r % a.nq;
        sc[r * TAIL_CHUNK + t] = (t < n && pos <= qpos && pos >= sq.start) ? dots[r] : -INFINITY;
      }
    }
    __syncthreads();  // keys are no longer read: stage the values while the softmax runs
    stage_tail<BITS, T>(a, b, h, sq, c0, n, true, sv, rv, kv);
    for (int r = warp; r < a.rows; r += THREADS / 32) {  // one warp per row: max, probabilities, running sum
      float s[TAIL_CHUNK / 32], mx = st[r * 4];
#pragma unroll
      for (int j = 0; j < TAIL_CHUNK / 32; ++j) { s[j] = sc[r * TAIL_CHUNK + lane + 32 * j]; mx = fmaxf(mx, s[j]); }
#pragma unroll
      for (int o = 16; o; o >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffff, mx, o));
      const float base = mx == -INFINITY ? 0.f : mx;
      float sum = 0.f;
#pragma unroll
      for (int j = 0; j < TAIL_CHUNK / 32; ++j) {
        const float e = exp2f(s[j] - base);
        sc[r * TAIL_CHUNK + lane + 32 * j] = e;
        sum += e;
      }
#pragma unroll
      for (int o = 16; o; o >>= 1) sum += __shfl_xor_sync(0xffffffff, sum, o);
      if (lane == 0) {
        const float f = exp2f(st[r * 4] - base);
        st[r * 4] = mx; st[r * 4 + 1] = st[r * 4 + 1] * f + sum; st[r * 4 + 2] = f;
      }
    }
    cp_wait<0>();
    __syncthreads();
    const int d = threadIdx.x;  // THREADS == D: one output channel per thread
#pragma unroll
    for (int r = 0; r < MAXROWS; ++r) if (r < a.rows) acc[r] *= st[r * 4 + 2];
    for (int t0 = 0; t0 < n; t0 += 4) {
      float x[4];
#pragma unroll
      for (int j = 0; j < 4; ++j) x[j] = t0 + j < n ? to_f(kv[(t0 + j) * KPAD + d]) : 0.f;
#pragma unroll
      for (int r = 0; r < MAXROWS; ++r) {
        if (r < a.rows) {
          const float4 p = *reinterpret_cast<const float4*>(sc + r * TAIL_CHUNK + t0);
          acc[r] += p.x * x[0] + p.y * x[1] + p.z * x[2] + p.w * x[3];
        }
      }
    }
    __syncthreads();
  }
  const long long part = ((long long)(b * a.hkv + h) * (a.parts + 1) + page_partials(a, b * a.hkv + h)) * a.rows;
#pragma unroll
  for (int r = 0; r < MAXROWS; ++r) if (r < a.rows) a.part_acc[(part + r) * D + threadIdx.x] = acc[r];
  if (threadIdx.x < a.rows) {
    a.part_ml[(part + threadIdx.x) * 2] = st[threadIdx.x * 4];
    a.part_ml[(part + threadIdx.x) * 2 + 1] = st[threadIdx.x * 4 + 1];
  }
}

template <int BITS, int STAGES, bool FOLD, typename T>
__global__ void __launch_bounds__(THREADS, LOWBIT_PAGED_MINBLOCKS) kivi_paged_kernel(Args a) {
  extern __shared__ __align__(16) uint8_t smem[];
  LOWBIT_PDL_TRIGGER();  // the merge kernel may be scheduled once every program has started; it waits for them all
#if LOWBIT_PAGED_TIMELINE
  unsigned long long t0;
  asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t0));
#endif
  const int bhn = a.batch * a.hkv;
  int pages = 0;  // the timeline's record
  const bool is_tail = LOWBIT_PAGED_TAILS_LAST ? (int)blockIdx.x >= a.chunks : (int)blockIdx.x < bhn;
  if (is_tail) {
    const int t = LOWBIT_PAGED_TAILS_LAST ? blockIdx.x - a.chunks : blockIdx.x;
    const int b = t / a.hkv, h = t % a.hkv;
    tail_part<BITS, T>(a, b, h, load_seq(a, b), smem);
  } else {
    const int c = LOWBIT_PAGED_TAILS_LAST ? blockIdx.x : blockIdx.x - bhn, V = a.bh_pages;
    const int v0 = c * a.chunk, v1 = min(v0 + a.chunk, bhn * V);
    for (int bh = v0 / V; bh * V < v1; ++bh) {  // one segment per (sequence x head) the slice touches
      if (bh != v0 / V) __syncthreads();        // the last segment's merge still reads shared memory
      const int b = bh / a.hkv, lo = max(v0, bh * V) - bh * V, hi = min(v1, (bh + 1) * V) - bh * V;
      const Seq sq = load_seq(a, b);
      paged_part<BITS, STAGES, FOLD, T>(a, b, bh % a.hkv, c - bh * V / a.chunk, lo, hi, sq, smem);
      pages += max(0, min(hi, (sq.n_qk + P - 1) / P) - lo);
    }
  }
#if LOWBIT_PAGED_TIMELINE
  __syncthreads();
  if (threadIdx.x == 0 && a.timeline) {
    unsigned long long t1;
    unsigned sm;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t1));
    asm volatile("mov.u32 %0, %%smid;" : "=r"(sm));
    unsigned long long* tl = a.timeline + 4 * blockIdx.x;
    tl[0] = t0; tl[1] = t1; tl[2] = sm; tl[3] = ((unsigned long long)is_tail << 32) | pages;
  }
#else
  (void)pages;
#endif
}

constexpr int COMBINE_WAYS = 4;  // threads per output element, each summing every 4th split (loads in flight)

template <typename T>
__global__ void __launch_bounds__(COMBINE_WAYS * D) combine_kernel(Args a) {
  // One program per (sequence x KV head, row). The splits' loads are independent (a select, not a branch, skips
  // empty ones), so a thread keeps several in flight: a serial, branchy loop over 65 splits cost ~20 us at B1.
  LOWBIT_PDL_WAIT();  // launched early (programmatic dependent launch): the partials are complete past this point
  const int bh = blockIdx.x, row = blockIdx.y, d = threadIdx.x % D, way = threadIdx.x / D;
  const int b = bh / a.hkv, h = bh % a.hkv, gi = row / a.nq, qi = row % a.nq;
  const int n = page_partials(a, bh) + 1;  // the page partials, then the tail's
  const float* ml = a.part_ml + ((long long)bh * (a.parts + 1) * a.rows + row) * 2;  // slot s at ml[s * rows * 2]
  const float* acc = a.part_acc + ((long long)bh * (a.parts + 1) * a.rows + row) * D + d;
  __shared__ float red[COMBINE_WAYS * D / 32];
  __shared__ float sum_num[COMBINE_WAYS][D], sum_den[COMBINE_WAYS];
  float M = -INFINITY;
  for (int s = threadIdx.x; s < n; s += COMBINE_WAYS * D) M = fmaxf(M, ml[(long long)s * a.rows * 2]);
#pragma unroll
  for (int o = 16; o; o >>= 1) M = fmaxf(M, __shfl_xor_sync(0xffffffff, M, o));
  if (threadIdx.x % 32 == 0) red[threadIdx.x / 32] = M;
  __syncthreads();
#pragma unroll
  for (int w = 0; w < COMBINE_WAYS * D / 32; ++w) M = fmaxf(M, red[w]);
  float num = 0.f, den = 0.f;
#pragma unroll 4
  for (int s = way; s < n; s += COMBINE_WAYS) {
    const float m = ml[(long long)s * a.rows * 2];
    const float f = m == -INFINITY ? 0.f : exp2f(m - M);  // every partial is written (empty ones: m = -inf, 0)
    num += f * acc[(long long)s * a.rows * D];
    den += f * ml[(long long)s * a.rows * 2 + 1];
  }
  sum_num[way][d] = num;
  if (d == 0) sum_den[way] = den;
  __syncthreads();
  if (way) return;
#pragma unroll
  for (int w = 1; w < COMBINE_WAYS; ++w) { num += sum_num[w][d]; den += sum_den[w]; }
  T* o = reinterpret_cast<T*>(a.out);
  o[b * a.o_sb + (long long)qi * a.o_st + (long long)(h * a.gqa + gi) * a.o_sh + d] = from_f<T>(num / den);
}

template <int BITS, int STAGES, bool FOLD, typename T>
int launch(const Args& a, cudaStream_t stream) {
  using L = Lay<BITS>;
  size_t main_smem = (size_t)4 * STAGES * L::SLAB;
  size_t merge_smem = (size_t)(8 * MAXROWS + 32 * MAXROWS + 4 * MAXROWS * D) * sizeof(float);
  size_t tail_smem = (size_t)(MAXROWS * D + MAXROWS * TAIL_CHUNK + 4 * MAXROWS) * sizeof(float) + TAIL_CHUNK * KPAD * sizeof(T);
  size_t smem = main_smem > merge_smem ? main_smem : merge_smem;
  if (tail_smem > smem) smem = tail_smem;
  auto kern = kivi_paged_kernel<BITS, STAGES, FOLD, T>;
  static int configured = -1;  // the device whose shared-memory limit was raised for this instantiation
  static bool pdl = false;     // that device runs programmatic dependent launches (sm_90+)
  int dev = 0;
  cudaError_t err = cudaGetDevice(&dev);
  if (err != cudaSuccess) return (int)err;
  if (configured != dev) {
    err = cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem);
    if (err != cudaSuccess) return (int)err;
    int major = 0;
    err = cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, dev);
    if (err != cudaSuccess) return (int)err;
    pdl = LOWBIT_PAGED_PDL && major >= 9;
    configured = dev;
  }
  dim3 grid(a.batch * a.hkv + a.chunks);
  kern<<<grid, THREADS, smem, stream>>>(a);
  err = cudaGetLastError();
  if (err != cudaSuccess) return (int)err;
  cudaLaunchConfig_t cfg = {};
  cfg.gridDim = dim3(a.batch * a.hkv, a.rows);
  cfg.blockDim = dim3(COMBINE_WAYS * D);
  cfg.stream = stream;
  cudaLaunchAttribute attr[1];
  attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
  attr[0].val.programmaticStreamSerializationAllowed = 1;
  cfg.attrs = attr;
  cfg.numAttrs = pdl ? 1 : 0;
  return (int)cudaLaunchKernelEx(&cfg, combine_kernel<T>, a);
}

}  // namespace

extern "C" int lowbit_kivi_paged_decode(
    int bits, int is_bf16, int stages, int variant,
    const void* pool, long long stride_block, long long stride_head, const int* table, int max_pages,
    const void* q, long long q_sb, long long q_sh, long long q_st,
    int batch, int hq, int hkv, int nq, float scale_log2,
    const int* seq, int u_sink, int u_qk, int u_qv, int u_total, const int* start,
    const void* sink_k, const void* sink_v, long long sk_sb, long long sk_sh,
    const void* res_k, long long rk_sb, long long rk_sh, const void* res_v, long long rv_sb, long long rv_sh,
    float* part_acc, float* part_ml, int parts, int bh_pages, int chunk, int chunks,
    void* out, long long o_sb, long long o_st, long long o_sh, void* stream, unsigned long long* timeline) {
  Args a;
  a.pool = reinterpret_cast<const uint8_t*>(pool); a.stride_block = stride_block; a.stride_head = stride_head;
  a.table = table; a.max_pages = max_pages;
  a.q = q; a.q_sb = q_sb; a.q_sh = q_sh; a.q_st = q_st;
  a.batch = batch; a.hq = hq; a.hkv = hkv; a.nq = nq; a.gqa = hq / hkv; a.rows = a.gqa * nq;
  a.scale_log2 = scale_log2;
  a.seq = seq; a.u_sink = u_sink; a.u_qk = u_qk; a.u_qv = u_qv; a.u_total = u_total; a.start = start;
  a.sink_k = sink_k; a.sink_v = sink_v; a.sk_sb = sk_sb; a.sk_sh = sk_sh;
  a.res_k = res_k; a.rk_sb = rk_sb; a.rk_sh = rk_sh; a.res_v = res_v; a.rv_sb = rv_sb; a.rv_sh = rv_sh;
  a.part_acc = part_acc; a.part_ml = part_ml; a.parts = parts;
  a.bh_pages = bh_pages; a.chunk = chunk; a.chunks = chunks; a.timeline = timeline;
  const int ring_rows = variant >> 8;  // variant bits 8..: residuals in a ring of that many rows (the serving engine)
  a.ring = ring_rows ? ring_rows - 1 : -1;
  a.out = out; a.o_sb = o_sb; a.o_st = o_st; a.o_sh = o_sh;
  if (ring_rows & (ring_rows - 1) || ring_rows > P) return -1;
  if (a.rows > MAXROWS || a.rows < 1 || chunk < 1 || (chunks > 0 && bh_pages < 1)) return -1;
  cudaStream_t s = reinterpret_cast<cudaStream_t>(stream);
  const bool fold = variant & 1;
#define LOWBIT_LAUNCH(B, S) \
  if (bits == B && stages == S) { \
    if (fold) return is_bf16 ? launch<B, S, true, __nv_bfloat16>(a, s) : launch<B, S, true, __half>(a, s); \
    return is_bf16 ? launch<B, S, false, __nv_bfloat16>(a, s) : launch<B, S, false, __half>(a, s); \
  }
  LOWBIT_LAUNCH(2, 3)
  LOWBIT_LAUNCH(2, 2)
  LOWBIT_LAUNCH(4, 3)
  LOWBIT_LAUNCH(4, 2)
#undef LOWBIT_LAUNCH
  return -2;
}

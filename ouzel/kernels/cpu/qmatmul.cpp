// ouzel CPU kernels for weights kept in their GGUF blocks.
//
//   qmatmul(x [M, K] f32, raw [N, row_bytes] u8, type, N) -> y [M, N] f32,   y = x @ dequantize(raw).T
//   dequantize(raw [R, row_bytes], type)                  -> [R, K] f32
//   embedding(raw, type, ids [L] i64)                     -> [L, K] f32
//
// Every weight value is produced exactly as ouzel.quant.blocks.dequantize produces it (same float32
// operations, or operations that are provably exact, so the same bits), and all arithmetic on x is
// float32: the products differ from x.double() @ W.double().T by float32 accumulation only.
//
// Small M (decode): a fused GEMV. Each thread (at::parallel_for, torch's pool) takes a range of
// output rows; every block of a row is decoded into 16-float registers (AVX-512) and multiplied into
// M accumulators, so each weight byte is read once. 4-bit and 5-bit formats decode through a
// 16-entry float table per (sub)block held in one register (vpermps): the scale is folded into the
// table, so one permute yields 16 finished weights.
// Larger M (prefill): each thread dequantizes blocks of rows into a float32 buffer that stays in L2
// and multiplies them with x through a 4 x 6 AVX-512 register tile (on the AMD machine this is ~1.7x
// MKL's float32 GEMM); at::mm on dequantized tiles is the other mode (and the portable one).
//
// Without AVX-512 (F, BW, VL, DQ) a portable scalar path computes the same values.
//
// Error messages avoid std::ostream (see cat() below).
//
// Layouts are those of ouzel/quant/blocks.py (which mirrors gguf's reference); comments give them.

#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/cat.h>
#include <ATen/ops/mm.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <string>
#include <type_traits>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define OUZEL_AVX512 1
#include <immintrin.h>
#else
#define OUZEL_AVX512 0
#endif

namespace {

// ggml type ids
enum : int {
  T_F32 = 0, T_F16 = 1, T_Q4_0 = 2, T_Q4_1 = 3, T_Q5_0 = 6, T_Q5_1 = 7, T_Q8_0 = 8,
  T_Q2_K = 10, T_Q3_K = 11, T_Q4_K = 12, T_Q5_K = 13, T_Q6_K = 14, T_IQ2_XXS = 16,
  T_IQ4_NL = 20, T_BF16 = 30, T_MXFP4 = 39,
};

// value tables, handed over from Python (gguf's own tables) by set_tables()
int8_t g_iq4nl[16];
int8_t g_mxfp4[16];
uint8_t g_ksigns[128];
uint64_t g_iq2xxs_grid[256];  // 8 unsigned bytes per entry, element k in byte k
bool g_tables_set = false;

// ---------------------------------------------------------------- scalar helpers

inline uint16_t rd16(const uint8_t* p) { uint16_t v; std::memcpy(&v, p, 2); return v; }
inline uint32_t rd32(const uint8_t* p) { uint32_t v; std::memcpy(&v, p, 4); return v; }
inline uint64_t rd64(const uint8_t* p) { uint64_t v; std::memcpy(&v, p, 8); return v; }
inline float bits_f32(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }

// IEEE half -> float, exact
inline float h2f(uint16_t h) {
#if defined(__F16C__)
  return _cvtsh_ss(h);
#else
  const uint32_t sign = uint32_t(h & 0x8000u) << 16;
  const uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ffu;
  if (e == 0) {
    const float v = float(m) * 5.9604644775390625e-08f;  // m * 2^-24, exact
    return sign ? -v : v;
  }
  if (e == 31) return bits_f32(sign | 0x7f800000u | (m << 13));
  return bits_f32(sign | ((e + 112) << 23) | (m << 13));
#endif
}
inline float f16at(const uint8_t* p) { return h2f(rd16(p)); }

// MXFP4 e8m0 scale, as blocks.py builds it (halved: e < 2 gives the subnormals)
inline float e8m0_half(uint8_t e) {
  return bits_f32(e < 2 ? (0x00200000u << e) : (uint32_t(e - 1) << 23));
}

// Q4_K / Q5_K: 12 bytes -> 8 six-bit scales and 8 six-bit mins
inline void scale_min_k4(const uint8_t* s, int* sc, int* mn) {
  for (int i = 0; i < 4; ++i) {
    sc[i] = s[i] & 63;
    mn[i] = s[4 + i] & 63;
    sc[4 + i] = (s[8 + i] & 15) | ((s[i] >> 2) & 0x30);
    mn[4 + i] = (s[8 + i] >> 4) | ((s[4 + i] >> 2) & 0x30);
  }
}

// ---------------------------------------------------------------- per-type block descriptions
// Each type: BE elements per block, BB bytes per block, a scalar decoder (portable, exact), and
// under AVX-512 a vector decoder `block(b, sink)` that calls sink.put(off, w) for each 16 elements.

template <int ID> struct Dec;

// Q8_0: d f16, qs 32 x int8; w = q * d
template <> struct Dec<T_Q8_0> {
  static constexpr int BE = 32, BB = 34;
  static void scalar(const uint8_t* b, float* out) {
    const float d = f16at(b);
    for (int j = 0; j < 32; ++j) out[j] = float(int8_t(b[2 + j])) * d;
  }
};
// Q4_0: d f16, qs 16 B (low nibbles elements 0..15, high 16..31); w = d * (q - 8)
template <> struct Dec<T_Q4_0> {
  static constexpr int BE = 32, BB = 18;
  static void scalar(const uint8_t* b, float* out) {
    const float d = f16at(b);
    for (int j = 0; j < 16; ++j) {
      out[j] = d * float((b[2 + j] & 15) - 8);
      out[16 + j] = d * float((b[2 + j] >> 4) - 8);
    }
  }
};
// Q4_1: d f16, m f16, qs 16 B; w = d * q + m
template <> struct Dec<T_Q4_1> {
  static constexpr int BE = 32, BB = 20;
  static void scalar(const uint8_t* b, float* out) {
    const float d = f16at(b), m = f16at(b + 2);
    for (int j = 0; j < 16; ++j) {
      out[j] = d * float(b[4 + j] & 15) + m;
      out[16 + j] = d * float(b[4 + j] >> 4) + m;
    }
  }
};
// Q5_0: d f16, qh u32 (bit j = bit 4 of element j), qs 16 B; w = d * (q - 16)
template <> struct Dec<T_Q5_0> {
  static constexpr int BE = 32, BB = 22;
  static void scalar(const uint8_t* b, float* out) {
    const float d = f16at(b);
    const uint32_t qh = rd32(b + 2);
    for (int j = 0; j < 16; ++j) {
      const int lo = (b[6 + j] & 15) | (((qh >> j) & 1) << 4);
      const int hi = (b[6 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      out[j] = d * float(lo - 16);
      out[16 + j] = d * float(hi - 16);
    }
  }
};
// Q5_1: d f16, m f16, qh u32, qs 16 B; w = d * q + m
template <> struct Dec<T_Q5_1> {
  static constexpr int BE = 32, BB = 24;
  static void scalar(const uint8_t* b, float* out) {
    const float d = f16at(b), m = f16at(b + 2);
    const uint32_t qh = rd32(b + 4);
    for (int j = 0; j < 16; ++j) {
      const int lo = (b[8 + j] & 15) | (((qh >> j) & 1) << 4);
      const int hi = (b[8 + j] >> 4) | (((qh >> (j + 16)) & 1) << 4);
      out[j] = d * float(lo) + m;
      out[16 + j] = d * float(hi) + m;
    }
  }
};
// IQ4_NL: d f16, qs 16 B of indices into a 16-value table; w = d * table[q]
template <> struct Dec<T_IQ4_NL> {
  static constexpr int BE = 32, BB = 18;
  static void scalar(const uint8_t* b, float* out) {
    const float d = f16at(b);
    for (int j = 0; j < 16; ++j) {
      out[j] = d * float(g_iq4nl[b[2 + j] & 15]);
      out[16 + j] = d * float(g_iq4nl[b[2 + j] >> 4]);
    }
  }
};
// MXFP4: e u8 (e8m0, halved), qs 16 B of e2m1 indices (table doubled); w = d * table[q]
template <> struct Dec<T_MXFP4> {
  static constexpr int BE = 32, BB = 17;
  static void scalar(const uint8_t* b, float* out) {
    const float d = e8m0_half(b[0]);
    for (int j = 0; j < 16; ++j) {
      out[j] = d * float(g_mxfp4[b[1 + j] & 15]);
      out[16 + j] = d * float(g_mxfp4[b[1 + j] >> 4]);
    }
  }
};
// Q2_K: scales 16 B (low nibble sc, high nibble m, per 16 elements), qs 64 B, d f16 @80, dmin f16 @82.
// qs: two runs of 32 bytes; run r, shift s (0..3) gives elements 128r + 32s + i (i = byte in run).
// w = (d * sc) * q - (dmin * m)
template <> struct Dec<T_Q2_K> {
  static constexpr int BE = 256, BB = 84;
  static void scalar(const uint8_t* b, float* out) {
    const float d = f16at(b + 80), dmin = f16at(b + 82);
    for (int e = 0; e < 256; ++e) {
      const int r = e >> 7, s = (e >> 5) & 3, i = e & 31;
      const int q = (b[16 + 32 * r + i] >> (2 * s)) & 3;
      const int c = e >> 4;
      const float dl = d * float(b[c] & 15), ml = dmin * float(b[c] >> 4);
      out[e] = dl * float(q) - ml;
    }
  }
};
// Q3_K: hmask 32 B (bit s of byte i: element 32s + i has no -4), qs 64 B (Q2_K layout),
// scales 12 B (16 six-bit, -32), d f16 @108; w = (d * sc) * q
template <> struct Dec<T_Q3_K> {
  static constexpr int BE = 256, BB = 110;
  static void scales(const uint8_t* s, int* sc) {
    for (int i = 0; i < 16; ++i) {
      const int lo = i < 8 ? (s[i] & 15) : (s[i - 8] >> 4);
      const int hi = (s[8 + (i & 3)] >> (2 * (i >> 2))) & 3;
      sc[i] = (lo | (hi << 4)) - 32;
    }
  }
  static void scalar(const uint8_t* b, float* out) {
    int sc[16];
    scales(b + 96, sc);
    const float d = f16at(b + 108);
    for (int e = 0; e < 256; ++e) {
      const int r = e >> 7, s = (e >> 5) & 3, i = e & 31;
      const int q2 = (b[32 + 32 * r + i] >> (2 * s)) & 3;
      const int hb = (b[i] >> (e >> 5)) & 1;
      const float dl = d * float(sc[e >> 4]);
      out[e] = dl * float(q2 - ((hb ^ 1) << 2));
    }
  }
};
// Q4_K: d f16, dmin f16, scales 12 B (8 six-bit sc and m), qs 128 B: four runs of 32 bytes, run j
// low nibbles = elements 64j + i, high = 64j + 32 + i; w = (d * sc) * q - (dmin * m)
template <> struct Dec<T_Q4_K> {
  static constexpr int BE = 256, BB = 144;
  static void scalar(const uint8_t* b, float* out) {
    int sc[8], mn[8];
    scale_min_k4(b + 4, sc, mn);
    const float d = f16at(b), dmin = f16at(b + 2);
    for (int e = 0; e < 256; ++e) {
      const int j = e >> 6, hi = (e >> 5) & 1, i = e & 31;
      const int q = (b[16 + 32 * j + i] >> (4 * hi)) & 15;
      const float dd = d * float(sc[e >> 5]), dm = dmin * float(mn[e >> 5]);
      out[e] = dd * float(q) - dm;
    }
  }
};
// Q5_K: Q4_K plus qh 32 B @16 (bit s of byte i = bit 4 of element 32s + i), qs @48
template <> struct Dec<T_Q5_K> {
  static constexpr int BE = 256, BB = 176;
  static void scalar(const uint8_t* b, float* out) {
    int sc[8], mn[8];
    scale_min_k4(b + 4, sc, mn);
    const float d = f16at(b), dmin = f16at(b + 2);
    for (int e = 0; e < 256; ++e) {
      const int j = e >> 6, hi = (e >> 5) & 1, i = e & 31;
      const int q = ((b[48 + 32 * j + i] >> (4 * hi)) & 15) | (((b[16 + i] >> (e >> 5)) & 1) << 4);
      const float dd = d * float(sc[e >> 5]), dm = dmin * float(mn[e >> 5]);
      out[e] = dd * float(q) - dm;
    }
  }
};
// Q6_K: ql 128 B (two runs of 64: low nibbles elements 128r + i, high 128r + 64 + i), qh 64 B @128
// (two runs of 32: shift s gives bits 4-5 of element 128r + 32s + i), scales 16 x int8 @192,
// d f16 @208; w = (d * sc) * (q - 32)
template <> struct Dec<T_Q6_K> {
  static constexpr int BE = 256, BB = 210;
  static void scalar(const uint8_t* b, float* out) {
    const float d = f16at(b + 208);
    for (int e = 0; e < 256; ++e) {
      const int r = e >> 7, k = e & 127;
      const int lo = (b[64 * r + (k & 63)] >> (4 * (k >> 6))) & 15;
      const int hi = (b[128 + 32 * r + (k & 31)] >> (2 * (k >> 5))) & 3;
      const float dd = d * float(int8_t(b[192 + (e >> 4)]));
      out[e] = dd * float((lo | (hi << 4)) - 32);
    }
  }
};
// IQ2_XXS: d f16, then 8 x (4 grid-index bytes, u32 aux: four 7-bit sign indices | 4-bit scale << 28);
// w = ((d * (0.5 + s)) * 0.25) * grid * sign
template <> struct Dec<T_IQ2_XXS> {
  static constexpr int BE = 256, BB = 66;
  static void scalar(const uint8_t* b, float* out) {
    const float d = f16at(b);
    for (int j = 0; j < 8; ++j) {
      const uint8_t* p = b + 2 + 8 * j;
      const uint32_t aux = rd32(p + 4);
      const float db = d * (0.5f + float(aux >> 28)) * 0.25f;
      for (int l = 0; l < 4; ++l) {
        const uint64_t g = g_iq2xxs_grid[p[l]];
        const uint8_t sg = g_ksigns[(aux >> (7 * l)) & 127];
        for (int k = 0; k < 8; ++k) {
          const float v = db * float(uint8_t(g >> (8 * k)));
          out[32 * j + 8 * l + k] = ((sg >> k) & 1) ? v * -1.0f : v;
        }
      }
    }
  }
};
// dense types: BE = 1 in GGUF; here rows are handled 16 elements at a time plus a tail
template <> struct Dec<T_F32> {
  static constexpr int BE = 1, BB = 4;
  static void scalar(const uint8_t* b, float* out) { std::memcpy(out, b, 4); }
};
template <> struct Dec<T_F16> {
  static constexpr int BE = 1, BB = 2;
  static void scalar(const uint8_t* b, float* out) { out[0] = f16at(b); }
};
template <> struct Dec<T_BF16> {
  static constexpr int BE = 1, BB = 2;
  static void scalar(const uint8_t* b, float* out) { out[0] = bits_f32(uint32_t(rd16(b)) << 16); }
};

template <int ID> constexpr bool is_dense() { return ID == T_F32 || ID == T_F16 || ID == T_BF16; }

#if OUZEL_AVX512
// ================================================================= AVX-512 decoders

inline __m512 iota_ps(float base) {
  return _mm512_add_ps(_mm512_set_ps(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0), _mm512_set1_ps(base));
}
inline __m512i load16_u8_epi32(const uint8_t* p) {
  return _mm512_cvtepu8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512i load16_i8_epi32(const uint8_t* p) {
  return _mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
inline __m512 i8_table_ps(const int8_t* t) { return _mm512_cvtepi32_ps(load16_i8_epi32(reinterpret_cast<const uint8_t*>(t))); }
// the f16 at p in every lane; the f16 pair at p as [a, b, a, b, ...] (vcvtph2ps is exact)
inline __m512 bcast_f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_set1_epi16(short(rd16(p)))); }
inline __m512 pair_f16(const uint8_t* p) { return _mm512_cvtph_ps(_mm256_set1_epi32(int(rd32(p)))); }

// A 32-element block of 4-bit indices (16 bytes, Q4_0 layout) through a 16-float table.
template <class S>
inline void nib32(const uint8_t* qs, __m512 tab, S& s) {
  const __m512i v = load16_u8_epi32(qs);
  s.put(0, _mm512_permutexvar_ps(v, tab));  // vpermps reads the low 4 bits of each index
  s.put(16, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tab));
}

// A 32-element block of 4-bit q (Q4_0 layout; with QH a fifth bit per element from a 32-bit mask)
// with linear values, through a 16-entry float table per 16 values of q:
// QOFF > 0: w = (q - QOFF) * d (as the reference computes it: the sign of a zero included);
// QOFF == 0: w = q * d + m (one rounding, like the reference's, since q * d is exact).
template <int QOFF>
inline __m512 lin_table(__m512 d, __m512 m, float base) {
  if constexpr (QOFF > 0) return _mm512_mul_ps(iota_ps(base - QOFF), d);
  else return _mm512_fmadd_ps(iota_ps(base), d, m);
}
template <int QOFF, class S>
inline void nib32_lin(const uint8_t* qs, __m512 d, __m512 m, S& s) {
  nib32(qs, lin_table<QOFF>(d, m, 0.0f), s);
}
template <int QOFF, class S>
inline void nib32_h_lin(const uint8_t* qs, uint32_t qh, __m512 d, __m512 m, S& s) {
  const __m512i v = load16_u8_epi32(qs);
  const __m512i v1 = _mm512_srli_epi32(v, 4);
  const __m512 tab0 = lin_table<QOFF>(d, m, 0.0f), tab1 = lin_table<QOFF>(d, m, 16.0f);
  s.put(0, _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(v, tab0), __mmask16(qh), v, tab1));
  s.put(16, _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(v1, tab0), __mmask16(qh >> 16), v1, tab1));
}

struct VQ8_0 {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    const __m512 d = bcast_f16(b);
    s.put(0, _mm512_mul_ps(_mm512_cvtepi32_ps(load16_i8_epi32(b + 2)), d));
    s.put(16, _mm512_mul_ps(_mm512_cvtepi32_ps(load16_i8_epi32(b + 18)), d));
  }
};
struct VQ4_0 {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    nib32_lin<8>(b + 2, bcast_f16(b), _mm512_setzero_ps(), s);
  }
};
struct VQ4_1 {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    const __m512 dm = pair_f16(b);
    nib32_lin<0>(b + 4, _mm512_moveldup_ps(dm), _mm512_movehdup_ps(dm), s);
  }
};
struct VQ5_0 {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    const __m512 d = bcast_f16(b);
    nib32_h_lin<16>(b + 6, rd32(b + 2), d, _mm512_setzero_ps(), s);
  }
};
struct VQ5_1 {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    const __m512 dm = pair_f16(b);
    const __m512 d = _mm512_moveldup_ps(dm), m = _mm512_movehdup_ps(dm);
    nib32_h_lin<0>(b + 8, rd32(b + 4), d, m, s);
  }
};
struct VIQ4_NL {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    nib32(b + 2, _mm512_mul_ps(i8_table_ps(g_iq4nl), bcast_f16(b)), s);
  }
};
struct VMXFP4 {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    nib32(b + 1, _mm512_mul_ps(i8_table_ps(g_mxfp4), _mm512_set1_ps(e8m0_half(b[0]))), s);
  }
};

// Per-(sub)block scales are computed 16 at a time, stored to a small stack array and broadcast from
// memory (a load, not a shuffle) when needed: the barrier keeps the compiler from turning the
// array into register shuffles, which compete with the permutes of the decoding.
#define SCALE_BARRIER() asm volatile("" ::: "memory")

// Q4_K/Q5_K scales: out[0..7] = d * sc, out[8..15] = -(dmin * m)
inline void k4_scales(const uint8_t* b, float* out) {
  const __m512i sv = load16_u8_epi32(b + 4);  // bytes 4..19, lanes 0..11 are the scales
  const __m512i idxP = _mm512_set_epi32(11, 10, 9, 8, 7, 6, 5, 4, 11, 10, 9, 8, 3, 2, 1, 0);
  const __m512i shP = _mm512_set_epi32(4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0);
  const __m512i mkP = _mm512_set_epi32(15, 15, 15, 15, 63, 63, 63, 63, 15, 15, 15, 15, 63, 63, 63, 63);
  const __m512i idxQ = _mm512_set_epi32(7, 6, 5, 4, 0, 0, 0, 0, 3, 2, 1, 0, 0, 0, 0, 0);
  const __m512i lo = _mm512_and_si512(_mm512_srlv_epi32(_mm512_permutexvar_epi32(idxP, sv), shP), mkP);
  const __m512i hi = _mm512_maskz_and_epi32(0xF0F0, _mm512_srli_epi32(_mm512_permutexvar_epi32(idxQ, sv), 2),
                                            _mm512_set1_epi32(0x30));
  const __m512 f = _mm512_cvtepi32_ps(_mm512_or_si512(lo, hi));
  const __m512 dm = pair_f16(b);
  const __m512 dd = _mm512_mask_blend_ps(0xFF00, _mm512_moveldup_ps(dm), _mm512_sub_ps(_mm512_setzero_ps(), _mm512_movehdup_ps(dm)));
  _mm512_storeu_ps(out, _mm512_mul_ps(f, dd));  // -(dmin * m) == (-dmin) * m exactly
  SCALE_BARRIER();
}

struct VQ4_K {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    alignas(64) float sd[16];
    k4_scales(b, sd);
    const uint8_t* qs = b + 16;
    const __m512 io = iota_ps(0.0f);
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 tA = _mm512_fmadd_ps(io, _mm512_set1_ps(sd[2 * j]), _mm512_set1_ps(sd[8 + 2 * j]));
      const __m512 tB = _mm512_fmadd_ps(io, _mm512_set1_ps(sd[2 * j + 1]), _mm512_set1_ps(sd[9 + 2 * j]));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i v = load16_u8_epi32(qs + 32 * j + 16 * h);
        s.put(64 * j + 16 * h, _mm512_permutexvar_ps(v, tA));
        s.put(64 * j + 32 + 16 * h, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 4), tB));
      }
    }
  }
};
struct VQ5_K {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    alignas(64) float sd[16];
    k4_scales(b, sd);
    const uint8_t* qh = b + 16;
    const uint8_t* qs = b + 48;
    const __m512 io = iota_ps(0.0f), io16 = iota_ps(16.0f);
    const __m128i h0 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh));
    const __m128i h1 = _mm_loadu_si128(reinterpret_cast<const __m128i*>(qh + 16));
#pragma GCC unroll 4
    for (int j = 0; j < 4; ++j) {
      const __m512 dA = _mm512_set1_ps(sd[2 * j]), mA = _mm512_set1_ps(sd[8 + 2 * j]);
      const __m512 dB = _mm512_set1_ps(sd[2 * j + 1]), mB = _mm512_set1_ps(sd[9 + 2 * j]);
      const __m512 tA0 = _mm512_fmadd_ps(io, dA, mA), tA1 = _mm512_fmadd_ps(io16, dA, mA);
      const __m512 tB0 = _mm512_fmadd_ps(io, dB, mB), tB1 = _mm512_fmadd_ps(io16, dB, mB);
      const __m128i bA = _mm_set1_epi8(char(1 << (2 * j))), bB = _mm_set1_epi8(char(1 << (2 * j + 1)));
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m128i hh = h ? h1 : h0;
        const __m512i v = load16_u8_epi32(qs + 32 * j + 16 * h);
        const __m512i v1 = _mm512_srli_epi32(v, 4);
        const __mmask16 kA = _mm_test_epi8_mask(hh, bA), kB = _mm_test_epi8_mask(hh, bB);
        s.put(64 * j + 16 * h, _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(v, tA0), kA, v, tA1));
        s.put(64 * j + 32 + 16 * h, _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(v1, tB0), kB, v1, tB1));
      }
    }
  }
};
struct VQ6_K {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    alignas(64) float sd[16];
    _mm512_storeu_ps(sd, _mm512_mul_ps(_mm512_cvtepi32_ps(load16_i8_epi32(b + 192)), bcast_f16(b + 208)));
    SCALE_BARRIER();
    const __m512i m0f = _mm512_set1_epi8(0x0F), m30 = _mm512_set1_epi8(0x30), c32 = _mm512_set1_epi8(32);
    // per 16-bit word: words 0..15 (bytes 0..31) and 16..31 (bytes 32..63)
    const __m512i shl = _mm512_inserti64x4(_mm512_set1_epi16(4), _mm256_set1_epi16(2), 1);
    const __m512i shr = _mm512_inserti64x4(_mm512_setzero_si512(), _mm256_set1_epi16(2), 1);
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r) {
      const __m512i L = _mm512_loadu_si512(b + 64 * r);
      const __m512i H = _mm512_broadcast_i64x4(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(b + 128 + 32 * r)));
      // elements 128r + i: low nibble | ((qh >> 0 or 2) & 3) << 4;  128r + 64 + i: high nibble | shift 4 or 6
      const __m512i qa = _mm512_sub_epi8(_mm512_ternarylogic_epi32(
          _mm512_and_si512(L, m0f), _mm512_sllv_epi16(H, shl), m30, 0xF8), c32);  // a | (b & c)
      const __m512i qb = _mm512_sub_epi8(_mm512_ternarylogic_epi32(
          _mm512_and_si512(_mm512_srli_epi16(L, 4), m0f), _mm512_srlv_epi16(H, shr), m30, 0xF8), c32);
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512 fa = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(qa, c)));
        s.put(128 * r + 16 * c, _mm512_mul_ps(fa, _mm512_set1_ps(sd[8 * r + c])));
      }
#pragma GCC unroll 4
      for (int c = 0; c < 4; ++c) {
        const __m512 fb = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm512_extracti32x4_epi32(qb, c)));
        s.put(128 * r + 64 + 16 * c, _mm512_mul_ps(fb, _mm512_set1_ps(sd[8 * r + 4 + c])));
      }
    }
  }
};
struct VQ2_K {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    alignas(64) float dl[16], ml[16];
    const __m512i sv = load16_u8_epi32(b);
    _mm512_storeu_ps(dl, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_and_si512(sv, _mm512_set1_epi32(15))), _mm512_set1_ps(f16at(b + 80))));
    _mm512_storeu_ps(ml, _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_srli_epi32(sv, 4)), _mm512_set1_ps(-f16at(b + 82))));
    SCALE_BARRIER();
    const __m512 io4 = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
#pragma GCC unroll 2
    for (int r = 0; r < 2; ++r) {
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m512i v = load16_u8_epi32(b + 16 + 32 * r + 16 * h);
#pragma GCC unroll 4
        for (int sh = 0; sh < 4; ++sh) {
          const int c = 8 * r + 2 * sh + h;
          const __m512 tab = _mm512_fmadd_ps(io4, _mm512_set1_ps(dl[c]), _mm512_set1_ps(ml[c]));
          s.put(128 * r + 32 * sh + 16 * h, _mm512_permutexvar_ps(_mm512_srli_epi32(v, 2 * sh), tab));
        }
      }
    }
  }
};
struct VQ3_K {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    alignas(64) float dl[16];
    {
      const __m512i sv = _mm512_cvtepu8_epi32(_mm_maskz_loadu_epi8(0x0FFF, b + 96));
      const __m512i lo = _mm512_and_si512(
          _mm512_srlv_epi32(_mm512_permutexvar_epi32(_mm512_set_epi32(7, 6, 5, 4, 3, 2, 1, 0, 7, 6, 5, 4, 3, 2, 1, 0), sv),
                            _mm512_set_epi32(4, 4, 4, 4, 4, 4, 4, 4, 0, 0, 0, 0, 0, 0, 0, 0)),
          _mm512_set1_epi32(15));
      const __m512i hi = _mm512_and_si512(
          _mm512_srlv_epi32(_mm512_permutexvar_epi32(_mm512_set_epi32(11, 10, 9, 8, 11, 10, 9, 8, 11, 10, 9, 8, 11, 10, 9, 8), sv),
                            _mm512_set_epi32(6, 6, 6, 6, 4, 4, 4, 4, 2, 2, 2, 2, 0, 0, 0, 0)),
          _mm512_set1_epi32(3));
      const __m512i sc = _mm512_sub_epi32(_mm512_or_si512(lo, _mm512_slli_epi32(hi, 4)), _mm512_set1_epi32(32));
      _mm512_storeu_ps(dl, _mm512_mul_ps(_mm512_cvtepi32_ps(sc), _mm512_set1_ps(f16at(b + 108))));
      SCALE_BARRIER();
    }
    const __m512 io4 = _mm512_set_ps(3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0, 3, 2, 1, 0);
    const __m512 io4m = _mm512_sub_ps(io4, _mm512_set1_ps(4.0f));
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const __m128i hm = _mm_loadu_si128(reinterpret_cast<const __m128i*>(b + 16 * h));
#pragma GCC unroll 2
      for (int r = 0; r < 2; ++r) {
        const __m512i v = load16_u8_epi32(b + 32 + 32 * r + 16 * h);
#pragma GCC unroll 4
        for (int sh = 0; sh < 4; ++sh) {
          const int c = 8 * r + 2 * sh + h;
          const __m512 d = _mm512_set1_ps(dl[c]);
          const __mmask16 k = _mm_test_epi8_mask(hm, _mm_set1_epi8(char(1 << (4 * r + sh))));
          const __m512i vs = _mm512_srli_epi32(v, 2 * sh);
          const __m512 w = _mm512_mask_permutexvar_ps(_mm512_permutexvar_ps(vs, _mm512_mul_ps(io4m, d)), k, vs,
                                                      _mm512_mul_ps(io4, d));
          s.put(128 * r + 32 * sh + 16 * h, w);
        }
      }
    }
  }
};
struct VIQ2_XXS {
  template <class S> static inline void block(const uint8_t* b, S& s) {
    const float d = f16at(b);
    const __m512i sbit = _mm512_set1_epi32(int(0x80000000u));
#pragma GCC unroll 8
    for (int j = 0; j < 8; ++j) {
      const uint8_t* p = b + 2 + 8 * j;
      const uint32_t aux = rd32(p + 4);
      const __m512 db = _mm512_set1_ps(d * (0.5f + float(aux >> 28)) * 0.25f);
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m128i g = _mm_set_epi64x(int64_t(g_iq2xxs_grid[p[2 * h + 1]]), int64_t(g_iq2xxs_grid[p[2 * h]]));
        const __mmask16 k = __mmask16(g_ksigns[(aux >> (14 * h)) & 127] | (g_ksigns[(aux >> (14 * h + 7)) & 127] << 8));
        const __m512 w = _mm512_mul_ps(_mm512_cvtepi32_ps(_mm512_cvtepu8_epi32(g)), db);
        s.put(32 * j + 16 * h, _mm512_castsi512_ps(_mm512_mask_xor_epi32(_mm512_castps_si512(w), k, _mm512_castps_si512(w), sbit)));
      }
    }
  }
};

// dense: 16 elements at a time (masked for a tail of n < 16)
template <int ID> inline __m512 dense_load(const uint8_t* p, __mmask16 k);
template <> inline __m512 dense_load<T_F32>(const uint8_t* p, __mmask16 k) {
  return _mm512_maskz_loadu_ps(k, p);
}
template <> inline __m512 dense_load<T_F16>(const uint8_t* p, __mmask16 k) {
  return _mm512_cvtph_ps(_mm256_maskz_loadu_epi16(k, p));
}
template <> inline __m512 dense_load<T_BF16>(const uint8_t* p, __mmask16 k) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_maskz_loadu_epi16(k, p)), 16));
}

template <int ID> struct VDec;
template <> struct VDec<T_Q8_0> : VQ8_0 {};
template <> struct VDec<T_Q4_0> : VQ4_0 {};
template <> struct VDec<T_Q4_1> : VQ4_1 {};
template <> struct VDec<T_Q5_0> : VQ5_0 {};
template <> struct VDec<T_Q5_1> : VQ5_1 {};
template <> struct VDec<T_IQ4_NL> : VIQ4_NL {};
template <> struct VDec<T_MXFP4> : VMXFP4 {};
template <> struct VDec<T_Q2_K> : VQ2_K {};
template <> struct VDec<T_Q3_K> : VQ3_K {};
template <> struct VDec<T_Q4_K> : VQ4_K {};
template <> struct VDec<T_Q5_K> : VQ5_K {};
template <> struct VDec<T_Q6_K> : VQ6_K {};
template <> struct VDec<T_IQ2_XXS> : VIQ2_XXS {};

// ---------------------------------------------------------------- sinks

// NA accumulators per output (independent FMA chains); BANK offsets the chain for odd blocks.
template <int M, int NA>
struct Accs {
  __m512 a[M][NA];
};

template <int M, int NA, int BANK>
struct DotSink {
  Accs<M, NA>& acc;
  const float* x;  // x[0] at this block's first element
  int64_t ldx;
  inline void put(int off, __m512 w) {
    const int ai = (BANK + (off >> 4)) % NA;
#pragma GCC unroll 8
    for (int m = 0; m < M; ++m)
      acc.a[m][ai] = _mm512_fmadd_ps(w, _mm512_loadu_ps(x + m * ldx + off), acc.a[m][ai]);
  }
};

struct StoreSink {
  float* out;
  inline void put(int off, __m512 w) { _mm512_storeu_ps(out + off, w); }
};

template <int M, int NA>
inline void finish(Accs<M, NA>& acc, float* y, int64_t ldy) {
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m) {
    __m512 s = acc.a[m][0];
#pragma GCC unroll 4
    for (int a = 1; a < NA; ++a) s = _mm512_add_ps(s, acc.a[m][a]);
    y[m * ldy] = _mm512_reduce_add_ps(s);
  }
}

constexpr int num_acc(int M) { return M == 1 ? 4 : (M <= 4 ? 2 : 1); }

// y[m * ldy] = sum_k x[m * ldx + k] * w[k] for one weight row, m < M
template <int ID, int M>
__attribute__((always_inline)) inline void row_dot(const uint8_t* row, int64_t K, const float* x, int64_t ldx,
                                                   float* y, int64_t ldy) {
  constexpr int NA = num_acc(M);
  Accs<M, NA> acc;
#pragma GCC unroll 8
  for (int m = 0; m < M; ++m)
#pragma GCC unroll 4
    for (int a = 0; a < NA; ++a) acc.a[m][a] = _mm512_setzero_ps();
  if constexpr (is_dense<ID>()) {
    constexpr int ES = Dec<ID>::BB;
    int64_t k = 0;
    for (; k + 32 <= K; k += 32) {
      DotSink<M, NA, 0> s0{acc, x + k, ldx};
      s0.put(0, dense_load<ID>(row + k * ES, 0xFFFF));
      s0.put(16, dense_load<ID>(row + (k + 16) * ES, 0xFFFF));
    }
    for (; k < K; k += 16) {
      const int n = int(std::min<int64_t>(16, K - k));
      const __mmask16 km = __mmask16((1u << n) - 1);
      const __m512 w = dense_load<ID>(row + k * ES, km);
      for (int m = 0; m < M; ++m)
        acc.a[m][0] = _mm512_fmadd_ps(w, _mm512_maskz_loadu_ps(km, x + m * ldx + k), acc.a[m][0]);
    }
  } else {
    constexpr int BE = Dec<ID>::BE, BB = Dec<ID>::BB;
    constexpr int CH = BE / 16;  // 16-element chunks per block
    const int64_t nb = K / BE;
    int64_t i = 0;
    if constexpr (CH < NA) {  // short blocks: two per step so that all NA chains are used
      for (; i + 1 < nb; i += 2) {
        DotSink<M, NA, 0> s0{acc, x + i * BE, ldx};
        VDec<ID>::block(row + i * BB, s0);
        DotSink<M, NA, CH> s1{acc, x + (i + 1) * BE, ldx};
        VDec<ID>::block(row + (i + 1) * BB, s1);
      }
    }
    for (; i < nb; ++i) {
      DotSink<M, NA, 0> s0{acc, x + i * BE, ldx};
      VDec<ID>::block(row + i * BB, s0);
    }
  }
  finish<M, NA>(acc, y, ldy);
}

template <int ID>
void dequant_row(const uint8_t* row, int64_t K, float* out) {
  if constexpr (is_dense<ID>()) {
    constexpr int ES = Dec<ID>::BB;
    for (int64_t k = 0; k < K; k += 16) {
      const int n = int(std::min<int64_t>(16, K - k));
      const __mmask16 km = __mmask16((1u << n) - 1);
      _mm512_mask_storeu_ps(out + k, km, dense_load<ID>(row + k * ES, km));
    }
  } else {
    constexpr int BE = Dec<ID>::BE, BB = Dec<ID>::BB;
    const int64_t nb = K / BE;
    for (int64_t i = 0; i < nb; ++i) {
      StoreSink s{out + i * BE};
      VDec<ID>::block(row + i * BB, s);
    }
  }
}

#else  // ================================================================= portable path

template <int ID, int M>
__attribute__((always_inline)) inline void row_dot(const uint8_t* row, int64_t K, const float* x, int64_t ldx,
                                                   float* y, int64_t ldy) {
  constexpr int BE = Dec<ID>::BE, BB = Dec<ID>::BB;
  constexpr int L = 8;
  float acc[M][L] = {};
  if constexpr (BE == 1) {
    int64_t k = 0;
    for (; k + L <= K; k += L) {
      float w[L];
      for (int j = 0; j < L; ++j) Dec<ID>::scalar(row + (k + j) * BB, w + j);
      for (int m = 0; m < M; ++m)
        for (int j = 0; j < L; ++j) acc[m][j] += w[j] * x[m * ldx + k + j];
    }
    for (; k < K; ++k) {
      float w;
      Dec<ID>::scalar(row + k * BB, &w);
      for (int m = 0; m < M; ++m) acc[m][0] += w * x[m * ldx + k];
    }
  } else {
    float w[BE];
    for (int64_t i = 0; i < K / BE; ++i) {
      Dec<ID>::scalar(row + i * BB, w);
      for (int m = 0; m < M; ++m) {
        const float* xb = x + m * ldx + i * BE;
        for (int j = 0; j < BE; j += L)
          for (int l = 0; l < L; ++l) acc[m][l] += w[j + l] * xb[j + l];
      }
    }
  }
  for (int m = 0; m < M; ++m) {
    float s = 0.0f;
    for (int l = 0; l < L; ++l) s += acc[m][l];
    y[m * ldy] = s;
  }
}

template <int ID>
void dequant_row(const uint8_t* row, int64_t K, float* out) {
  constexpr int BE = Dec<ID>::BE, BB = Dec<ID>::BB;
  for (int64_t i = 0; i < K / BE; ++i) Dec<ID>::scalar(row + i * BB, out + i * BE);
}

#endif

// ================================================================= drivers

// rows [r0, r1) of W: y[m * ldy + r] = x[m] . W[r], m < M

template <int ID, int M>
void rows_dot(const uint8_t* W, int64_t rs, int64_t r0, int64_t r1, int64_t K, const float* x, int64_t ldx, float* y,
              int64_t ldy) {
  for (int64_t r = r0; r < r1; ++r) row_dot<ID, M>(W + r * rs, K, x, ldx, y + r, ldy);
}

constexpr int MAXM = 8;  // GEMV register tile: up to 8 rows of x at once
using RowDotFn = void (*)(const uint8_t*, int64_t, int64_t, int64_t, int64_t, const float*, int64_t, float*, int64_t);
using DequantFn = void (*)(const uint8_t*, int64_t, float*);

struct TypeFns {
  int be = 0, bb = 0;
  int gemv_max_m = 12;  // the largest M for the fused GEMV (measured crossover with the blocked kernel)
  RowDotFn dot[MAXM] = {};
  DequantFn deq = nullptr;
};

template <int ID>
TypeFns make_fns() {
  TypeFns f;
  f.be = Dec<ID>::BE;
  f.bb = Dec<ID>::BB;
  // the 256-element types decode more slowly: the blocked kernel wins from M = 8 or so
  f.gemv_max_m = (f.be == 256) ? 6 : 12;
  f.dot[0] = &rows_dot<ID, 1>;
  f.dot[1] = &rows_dot<ID, 2>;
  f.dot[2] = &rows_dot<ID, 3>;
  f.dot[3] = &rows_dot<ID, 4>;
  f.dot[4] = &rows_dot<ID, 5>;
  f.dot[5] = &rows_dot<ID, 6>;
  f.dot[6] = &rows_dot<ID, 7>;
  f.dot[7] = &rows_dot<ID, 8>;
  f.deq = &dequant_row<ID>;
  return f;
}

const TypeFns* type_fns(int64_t t) {
  static const TypeFns f32 = make_fns<T_F32>(), f16 = make_fns<T_F16>(), bf16 = make_fns<T_BF16>(),
                       q8_0 = make_fns<T_Q8_0>(), q4_0 = make_fns<T_Q4_0>(), q4_1 = make_fns<T_Q4_1>(),
                       q5_0 = make_fns<T_Q5_0>(), q5_1 = make_fns<T_Q5_1>(), q2_k = make_fns<T_Q2_K>(),
                       q3_k = make_fns<T_Q3_K>(), q4_k = make_fns<T_Q4_K>(), q5_k = make_fns<T_Q5_K>(),
                       q6_k = make_fns<T_Q6_K>(), iq2_xxs = make_fns<T_IQ2_XXS>(),
                       iq4_nl = make_fns<T_IQ4_NL>(), mxfp4 = make_fns<T_MXFP4>();
  switch (t) {
    case T_F32: return &f32;
    case T_F16: return &f16;
    case T_BF16: return &bf16;
    case T_Q8_0: return &q8_0;
    case T_Q4_0: return &q4_0;
    case T_Q4_1: return &q4_1;
    case T_Q5_0: return &q5_0;
    case T_Q5_1: return &q5_1;
    case T_Q2_K: return &q2_k;
    case T_Q3_K: return &q3_k;
    case T_Q4_K: return &q4_k;
    case T_Q5_K: return &q5_k;
    case T_Q6_K: return &q6_k;
    case T_IQ2_XXS: return &iq2_xxs;
    case T_IQ4_NL: return &iq4_nl;
    case T_MXFP4: return &mxfp4;
    default: return nullptr;
  }
}

// Error messages are built here with std::to_string, never through std::ostream (c10::str with
// numbers): where the compiler links libstdc++ statically into the extension (the GPU machine's
// CXX does), ostream formatting in the extension crashes instead of raising.
inline void cat_into(std::string&) {}
template <class T, class... R>
void cat_into(std::string& s, const T& v, const R&... rest) {
  if constexpr (std::is_arithmetic_v<T>) s += std::to_string(v);
  else s += v;
  cat_into(s, rest...);
}
template <class... A>
std::string cat(const A&... a) {
  std::string s;
  cat_into(s, a...);
  return s;
}
std::string shape_str(const at::Tensor& t) {
  std::string s = "[";
  for (int64_t i = 0; i < t.dim(); ++i) s += (i ? ", " : "") + std::to_string(t.size(i));
  return s + "]";
}

// checks raw [R, row_bytes] (row stride free, bytes contiguous) and returns K
int64_t check_raw(const at::Tensor& raw, const TypeFns* f, int64_t t) {
  TORCH_CHECK(f != nullptr, cat("ouzel qmatmul: unsupported ggml type ", t));
  TORCH_CHECK((t != T_IQ2_XXS && t != T_IQ4_NL && t != T_MXFP4) || g_tables_set, "ouzel qmatmul: tables not set");
  TORCH_CHECK(raw.device().is_cpu() && raw.scalar_type() == at::kByte && raw.dim() == 2,
              cat("ouzel qmatmul: raw must be a 2-D uint8 CPU tensor, got ", c10::toString(raw.scalar_type()), " ",
                  shape_str(raw)));
  TORCH_CHECK(raw.size(1) == 0 || raw.stride(1) == 1, "ouzel qmatmul: raw rows must be contiguous");
  TORCH_CHECK(raw.size(1) % f->bb == 0,
              cat("ouzel qmatmul: a row of ", raw.size(1), " bytes is not whole ", f->bb, "-byte blocks"));
  return raw.size(1) / f->bb * f->be;
}

// rows per parallel task so that each task has at least ~min_bytes of weights
inline int64_t grain_rows(int64_t row_bytes, int64_t min_bytes) {
  return std::max<int64_t>(1, min_bytes / std::max<int64_t>(1, row_bytes));
}

void gemv(const TypeFns* f, const uint8_t* W, int64_t rstride, int64_t N, int64_t K, const float* x, int64_t M,
          float* y) {
  const int64_t grain = grain_rows(rstride, 32 * 1024);
  at::parallel_for(0, N, grain, [&](int64_t r0, int64_t r1) {
    if (M <= MAXM) {
      f->dot[M - 1](W, rstride, r0, r1, K, x, K, y, N);
      return;
    }
    // more rows of x than one register tile: a few weight rows at a time (they stay in L1) times
    // every group of MAXM rows of x
    constexpr int64_t RC = 32;
    for (int64_t rc = r0; rc < r1; rc += RC) {
      const int64_t rend = std::min(rc + RC, r1);
      for (int64_t m0 = 0; m0 < M; m0 += MAXM) {
        const int64_t mm = std::min<int64_t>(MAXM, M - m0);
        f->dot[mm - 1](W, rstride, rc, rend, K, x + m0 * K, K, y + m0 * N, N);
      }
    }
  });
}

#if OUZEL_AVX512
// ---- prefill: W dequantized block by block into a float32 buffer (in L2) and multiplied by x with an
// AVX-512 register tile of R weight rows x MR rows of x (dot products along K, R * MR accumulators)

// the four horizontal sums of a, b, c, d
inline __m128 hsum4(__m512 a, __m512 b, __m512 c, __m512 d) {
  const __m256 a2 = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
  const __m256 b2 = _mm256_add_ps(_mm512_castps512_ps256(b), _mm512_extractf32x8_ps(b, 1));
  const __m256 c2 = _mm256_add_ps(_mm512_castps512_ps256(c), _mm512_extractf32x8_ps(c, 1));
  const __m256 d2 = _mm256_add_ps(_mm512_castps512_ps256(d), _mm512_extractf32x8_ps(d, 1));
  const __m256 t = _mm256_hadd_ps(_mm256_hadd_ps(a2, b2), _mm256_hadd_ps(c2, d2));
  return _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
}

template <int R, int MR>
void tile_dot(const float* w, int64_t ldw, const float* x, int64_t ldx, int64_t K, float* y, int64_t ldy) {
  __m512 acc[MR][R];
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m)
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) acc[m][r] = _mm512_setzero_ps();
  int64_t k = 0;
  for (; k + 16 <= K; k += 16) {
    __m512 wv[R];
#pragma GCC unroll 4
    for (int r = 0; r < R; ++r) wv[r] = _mm512_loadu_ps(w + r * ldw + k);
#pragma GCC unroll 8
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_loadu_ps(x + m * ldx + k);
#pragma GCC unroll 4
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
  if (k < K) {
    const __mmask16 km = __mmask16((1u << (K - k)) - 1);
    __m512 wv[R];
    for (int r = 0; r < R; ++r) wv[r] = _mm512_maskz_loadu_ps(km, w + r * ldw + k);
    for (int m = 0; m < MR; ++m) {
      const __m512 xv = _mm512_maskz_loadu_ps(km, x + m * ldx + k);
      for (int r = 0; r < R; ++r) acc[m][r] = _mm512_fmadd_ps(wv[r], xv, acc[m][r]);
    }
  }
#pragma GCC unroll 8
  for (int m = 0; m < MR; ++m) {
    __m512 v[4];
#pragma GCC unroll 4
    for (int r = 0; r < 4; ++r) v[r] = r < R ? acc[m][r] : _mm512_setzero_ps();
    const __m128 sums = hsum4(v[0], v[1], v[2], v[3]);
    if constexpr (R == 4) _mm_storeu_ps(y + m * ldy, sums);
    else _mm_mask_storeu_ps(y + m * ldy, __mmask8((1u << R) - 1), sums);
  }
}

constexpr int TR = 4, TM = 6;  // register tile: 24 accumulators
using TileFn = void (*)(const float*, int64_t, const float*, int64_t, int64_t, float*, int64_t);

template <int R>
constexpr std::array<TileFn, TM> tile_row() {
  return {&tile_dot<R, 1>, &tile_dot<R, 2>, &tile_dot<R, 3>, &tile_dot<R, 4>, &tile_dot<R, 5>, &tile_dot<R, 6>};
}
constexpr std::array<std::array<TileFn, TM>, TR> kTiles = {tile_row<1>(), tile_row<2>(), tile_row<3>(), tile_row<4>()};

int64_t g_block_bytes = 256 << 10;  // float32 bytes of dequantized W per block (fits L2)

void gemm_blocked(const TypeFns* f, const uint8_t* W, int64_t rstride, int64_t N, int64_t K, const float* x, int64_t M,
                  float* y) {
  // rows per block: the float32 block fits L2, and every thread gets a couple of blocks
  int64_t nb_rows = std::min<int64_t>(1024, g_block_bytes / (4 * K));
  nb_rows = std::min<int64_t>(nb_rows, (N + 2 * at::get_num_threads() - 1) / (2 * at::get_num_threads()));
  nb_rows = std::max<int64_t>(TR, (nb_rows + TR - 1) / TR * TR);
  const int64_t nblocks = (N + nb_rows - 1) / nb_rows;
  at::parallel_for(0, nblocks, 1, [&](int64_t b0, int64_t b1) {
    std::vector<float> buf(size_t(std::min(nb_rows, N) * K));
    for (int64_t b = b0; b < b1; ++b) {
      const int64_t r0 = b * nb_rows, nr = std::min(nb_rows, N - r0);
      for (int64_t r = 0; r < nr; ++r) f->deq(W + (r0 + r) * rstride, K, buf.data() + r * K);
      for (int64_t m0 = 0; m0 < M; m0 += TM) {
        const int mr = int(std::min<int64_t>(TM, M - m0));
        for (int64_t rr = 0; rr < nr; rr += TR) {
          const int rn = int(std::min<int64_t>(TR, nr - rr));
          kTiles[rn - 1][mr - 1](buf.data() + rr * K, K, x + m0 * K, K, K, y + m0 * N + r0 + rr, N);
        }
      }
    }
  });
}
#endif

void dequant_rows_into(const TypeFns* f, const uint8_t* W, int64_t rstride, int64_t R, int64_t K, float* out,
                       int64_t ldo) {
  const int64_t grain = grain_rows(rstride, 16 * 1024);
  at::parallel_for(0, R, grain, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) f->deq(W + r * rstride, K, out + r * ldo);
  });
}

int64_t g_gemv_max_m = -1;       // M above this: the prefill path; -1: each type's own default
int64_t g_tile_bytes = 4 << 20;  // float32 bytes of W dequantized per at::mm call
int64_t g_prefill_mode = OUZEL_AVX512 ? 0 : 1;  // 0: own blocked AVX-512 kernel, 1: at::mm on tiles

at::Tensor qmatmul(const at::Tensor& x_in, const at::Tensor& raw, int64_t t, int64_t out_features) {
  const TypeFns* f = type_fns(t);
  const int64_t K = check_raw(raw, f, t);
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              cat("ouzel qmatmul: x must be a 2-D float32 CPU tensor, got ", c10::toString(x_in.scalar_type()), " ",
                  shape_str(x_in)));
  const at::Tensor x = x_in.contiguous();
  TORCH_CHECK(x.size(1) == K, cat("ouzel qmatmul: x has ", x.size(1), " features, the weight rows have ", K));
  TORCH_CHECK(raw.size(0) == out_features,
              cat("ouzel qmatmul: raw has ", raw.size(0), " rows, expected ", out_features));
  const int64_t M = x.size(0), N = out_features;
  at::Tensor y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  if (K == 0) return y.zero_();
  const uint8_t* W = raw.const_data_ptr<uint8_t>();
  const int64_t rs = raw.stride(0);
  if (M <= (g_gemv_max_m >= 0 ? g_gemv_max_m : f->gemv_max_m)) {
    gemv(f, W, rs, N, K, x.const_data_ptr<float>(), M, y.mutable_data_ptr<float>());
    return y;
  }
#if OUZEL_AVX512
  if (g_prefill_mode == 0) {
    gemm_blocked(f, W, rs, N, K, x.const_data_ptr<float>(), M, y.mutable_data_ptr<float>());
    return y;
  }
#endif
  // prefill through at::mm: tiles of rows dequantized into a float32 buffer, one at::mm each
  const int64_t tile = std::min<int64_t>(N, std::max<int64_t>(64, (g_tile_bytes / (4 * K)) / 16 * 16));
  at::Tensor wbuf = at::empty({tile, K}, x.options());
  for (int64_t r0 = 0; r0 < N; r0 += tile) {
    const int64_t n = std::min(tile, N - r0);
    dequant_rows_into(f, W + r0 * rs, rs, n, K, wbuf.mutable_data_ptr<float>(), K);
    at::Tensor wt = wbuf.narrow(0, 0, n).t();
    if (n == N) {
      at::mm_out(y, x, wt);
    } else {
      at::Tensor ys = y.narrow(1, r0, n);
      at::mm_out(ys, x, wt);
    }
  }
  return y;
}

// x [M, K] (M <= MAXM) times several weights that read the same x (q/k/v, gate/up), possibly of
// different block types: y [M, sum of their rows], the weights' outputs side by side. One parallel
// loop over all their rows (one call and one wake of the thread pool instead of one per weight);
// each output is computed as qmatmul computes it alone (same kernel, same arithmetic; where one of
// them would take the prefill path at this M, each runs through qmatmul).
at::Tensor qmatmul_multi(const at::Tensor& x_in, at::TensorList raws, at::IntArrayRef types) {
  TORCH_CHECK(!raws.empty() && raws.size() == types.size(), "ouzel qmatmul_multi: one type per weight");
  TORCH_CHECK(x_in.device().is_cpu() && x_in.scalar_type() == at::kFloat && x_in.dim() == 2,
              "ouzel qmatmul_multi: x must be a 2-D float32 CPU tensor");
  const at::Tensor x = x_in.contiguous();
  const int64_t M = x.size(0), n = int64_t(raws.size());
  TORCH_CHECK(M >= 1 && M <= MAXM, cat("ouzel qmatmul_multi: 1 to ", MAXM, " rows of x, got ", M));
  std::vector<const TypeFns*> fs(n);
  std::vector<int64_t> first(n + 1, 0);
  for (int64_t i = 0; i < n; ++i) {
    fs[i] = type_fns(types[i]);
    const int64_t K = check_raw(raws[i], fs[i], types[i]);
    TORCH_CHECK(K == x.size(1), cat("ouzel qmatmul_multi: x has ", x.size(1), " features, weight ", i, " rows have ", K));
    first[i + 1] = first[i] + raws[i].size(0);
  }
  const int64_t N = first[n], K = x.size(1);
  for (int64_t i = 0; i < n; ++i) {  // a weight whose qmatmul takes the prefill path at this M: as it would
    if (M > (g_gemv_max_m >= 0 ? g_gemv_max_m : fs[i]->gemv_max_m)) {
      std::vector<at::Tensor> ys;
      for (int64_t j = 0; j < n; ++j) ys.push_back(qmatmul(x, raws[j], types[j], raws[j].size(0)));
      return at::cat(ys, 1);
    }
  }
  at::Tensor y = at::empty({M, N}, x.options());
  if (N == 0) return y;
  if (K == 0) return y.zero_();
  float* yp = y.mutable_data_ptr<float>();
  const float* xp = x.const_data_ptr<float>();
  at::parallel_for(0, N, grain_rows(raws[0].stride(0), 32 * 1024), [&](int64_t r0, int64_t r1) {
    for (int64_t i = 0; i < n; ++i) {
      const int64_t a = std::max(r0, first[i]), b = std::min(r1, first[i + 1]);
      if (a < b)
        fs[i]->dot[M - 1](raws[i].const_data_ptr<uint8_t>(), raws[i].stride(0), a - first[i], b - first[i], K, xp, K,
                          yp + first[i], N);
    }
  });
  return y;
}

at::Tensor dequantize(const at::Tensor& raw, int64_t t) {
  const TypeFns* f = type_fns(t);
  const int64_t K = check_raw(raw, f, t);
  const int64_t R = raw.size(0);
  at::Tensor out = at::empty({R, K}, at::TensorOptions().dtype(at::kFloat));
  if (R == 0 || K == 0) return out;
  dequant_rows_into(f, raw.const_data_ptr<uint8_t>(), raw.stride(0), R, K, out.mutable_data_ptr<float>(), K);
  return out;
}

at::Tensor embedding(const at::Tensor& raw, int64_t t, const at::Tensor& ids_in) {
  const TypeFns* f = type_fns(t);
  const int64_t K = check_raw(raw, f, t);
  TORCH_CHECK(ids_in.device().is_cpu() && ids_in.dim() == 1 && !at::isFloatingType(ids_in.scalar_type()),
              "ouzel embedding: ids must be a 1-D integer CPU tensor");
  const at::Tensor ids = ids_in.scalar_type() == at::kLong ? ids_in.contiguous() : ids_in.to(at::kLong).contiguous();
  const int64_t L = ids.size(0), R = raw.size(0);
  const int64_t* id = ids.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < L; ++i)
    TORCH_CHECK(id[i] >= 0 && id[i] < R, cat("ouzel embedding: id ", id[i], " out of range for ", R, " rows"));
  at::Tensor out = at::empty({L, K}, at::TensorOptions().dtype(at::kFloat));
  if (L == 0 || K == 0) return out;
  const uint8_t* W = raw.const_data_ptr<uint8_t>();
  const int64_t rs = raw.stride(0);
  float* o = out.mutable_data_ptr<float>();
  at::parallel_for(0, L, grain_rows(rs, 16 * 1024), [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) f->deq(W + id[i] * rs, K, o + i * K);
  });
  return out;
}

// ---------------------------------------------------------------- decode attention
// One query row per head over keys [first, n) of a KV cache [C, Hkv, D] (float32, float16 or
// bfloat16), heads h of group h / (H / Hkv): softmax(scale * q.k) . v in float32, two passes over
// the keys (scores, then the weighted sum of v). A head per task of at::parallel_for.

inline float bf2f(uint16_t b) { return bits_f32(uint32_t(b) << 16); }

template <typename T> inline float elem(const T* p, int64_t i) {
  if constexpr (std::is_same_v<T, float>) return p[i];
  else if constexpr (std::is_same_v<T, at::Half>) return h2f(reinterpret_cast<const uint16_t*>(p)[i]);
  else return bf2f(reinterpret_cast<const uint16_t*>(p)[i]);
}

#if OUZEL_AVX512
template <typename T> inline __m512 load16f(const T* p) {
  if constexpr (std::is_same_v<T, float>) return _mm512_loadu_ps(p);
  else if constexpr (std::is_same_v<T, at::Half>)
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  else
    return _mm512_castsi512_ps(_mm512_slli_epi32(
        _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))), 16));
}
#endif

#if OUZEL_AVX512
// e^x for 16 floats, x <= 0 (scores less their max), within 2 ulp: n = round(x log2 e), r = x - n ln 2 (in
// two parts), e^r by Cephes' expf polynomial, times 2^n. Below -87.3 (where e^x leaves the normal floats)
// the clamp gives ~1e-38 instead of a denormal or 0: nothing a softmax's sum notices.
inline __m512 exp512(__m512 x) {
  x = _mm512_max_ps(x, _mm512_set1_ps(-87.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}
#endif

template <typename T>
void attend_head(const float* q, const T* k, const T* v, float* out, int64_t first, int64_t n, int64_t row,
                 int64_t D, float scale, float* s) {
  float m = -INFINITY;
  for (int64_t j = first; j < n; ++j) {
    const T* kj = k + j * row;
    float dot = 0.f;
#if OUZEL_AVX512
    if (D % 16 == 0) {
      __m512 acc = _mm512_setzero_ps();
      for (int64_t d = 0; d < D; d += 16) acc = _mm512_fmadd_ps(_mm512_loadu_ps(q + d), load16f(kj + d), acc);
      dot = _mm512_reduce_add_ps(acc);
    } else
#endif
      for (int64_t d = 0; d < D; ++d) dot += q[d] * elem(kj, d);
    s[j - first] = dot * scale;
    m = std::max(m, s[j - first]);
  }
  float l = 0.f;
  int64_t j0 = 0;
#if OUZEL_AVX512
  {
    const __m512 mv = _mm512_set1_ps(m);
    __m512 lv = _mm512_setzero_ps();
    for (; j0 + 16 <= n - first; j0 += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(s + j0), mv));
      _mm512_storeu_ps(s + j0, e);
      lv = _mm512_add_ps(lv, e);
    }
    l = _mm512_reduce_add_ps(lv);
  }
#endif
  for (int64_t j = j0; j < n - first; ++j) {
    s[j] = std::exp(s[j] - m);
    l += s[j];
  }
#if OUZEL_AVX512
  if (D % 16 == 0 && D <= 256) {
    __m512 acc[16];
    for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t j = first; j < n; ++j) {
      const T* vj = v + j * row;
      const __m512 p = _mm512_set1_ps(s[j - first]);
      for (int64_t c = 0; c < D / 16; ++c) acc[c] = _mm512_fmadd_ps(p, load16f(vj + 16 * c), acc[c]);
    }
    const __m512 inv = _mm512_set1_ps(1.f / l);
    for (int64_t c = 0; c < D / 16; ++c) _mm512_storeu_ps(out + 16 * c, _mm512_mul_ps(acc[c], inv));
    return;
  }
#endif
  std::fill(out, out + D, 0.f);
  for (int64_t j = first; j < n; ++j) {
    const T* vj = v + j * row;
    const float p = s[j - first];
    for (int64_t d = 0; d < D; ++d) out[d] += p * elem(vj, d);
  }
  for (int64_t d = 0; d < D; ++d) out[d] /= l;
}

// q float32 [H, D]; k, v [C, Hkv, D] with C >= n_keys, rows contiguous; keys first_key .. n_keys - 1.
// A head per task of at::parallel_for (two passes over its keys: scores, then the sum of v).
at::Tensor decode_attention(const at::Tensor& q_in, const at::Tensor& k, const at::Tensor& v, int64_t first_key,
                            int64_t n_keys, double scale) {
  TORCH_CHECK(q_in.dim() == 2 && k.dim() == 3 && v.sizes() == k.sizes() && k.scalar_type() == v.scalar_type(),
              "ouzel decode_attention: q [H, D], k and v [C, Hkv, D] of one dtype");
  TORCH_CHECK(k.is_contiguous() && v.is_contiguous(), "ouzel decode_attention: k and v must be contiguous");
  const at::Tensor q = q_in.to(at::kFloat).contiguous();
  const int64_t H = q.size(0), D = q.size(1), Hkv = k.size(1);
  TORCH_CHECK(k.size(2) == D && Hkv > 0 && H % Hkv == 0, "ouzel decode_attention: head shapes do not match");
  TORCH_CHECK(0 <= first_key && first_key < n_keys && n_keys <= k.size(0), "ouzel decode_attention: bad key range");
  at::Tensor out = at::empty({H, D}, q.options());
  const int64_t group = H / Hkv, row = Hkv * D;
  const float* qp = q.const_data_ptr<float>();
  float* op = out.data_ptr<float>();
  auto run = [&](auto* kp, auto* vp) {
    at::parallel_for(0, H, 1, [&](int64_t h0, int64_t h1) {
      std::vector<float> s(n_keys - first_key);
      for (int64_t h = h0; h < h1; ++h) {
        const int64_t g = h / group;
        attend_head(qp + h * D, kp + g * D, vp + g * D, op + h * D, first_key, n_keys, row, D, float(scale), s.data());
      }
    });
  };
  switch (k.scalar_type()) {
    case at::kFloat: run(k.const_data_ptr<float>(), v.const_data_ptr<float>()); break;
    case at::kHalf: run(k.const_data_ptr<at::Half>(), v.const_data_ptr<at::Half>()); break;
    case at::kBFloat16: run(k.const_data_ptr<at::BFloat16>(), v.const_data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "ouzel decode_attention: KV dtype must be float32, float16 or bfloat16");
  }
  return out;
}

// float -> the cache's element, rounded to nearest even as torch's .to() rounds
template <typename T> inline void store_elem(T* p, float x) {
  if constexpr (std::is_same_v<T, float>) *p = x;
  else if constexpr (std::is_same_v<T, at::Half>) *p = at::Half(x);
  else *p = at::BFloat16(x);
}

// rotate-half RoPE of x[0:d] (x[d:] untouched), as layers/rope.py computes it: out = x * cos + rot * sin,
// rot = [-x2, x1]; the products and their sum rounded one at a time (no contraction, -ffp-contract=off)
inline void rope_half(float* x, const float* cos, const float* sin, int64_t d) {
  const int64_t h = d / 2;
  for (int64_t i = 0; i < h; ++i) {
    const float x1 = x[i], x2 = x[i + h];
    const float a = x1 * cos[i], b = (-x2) * sin[i];
    const float c = x2 * cos[i + h], e = x1 * sin[i + h];
    x[i] = a + b;
    x[i + h] = c + e;
  }
}

// One decode step's attention with its RoPE and cache write: q [H, D], k, v [Hkv, D] (float32) of the new
// token; q and k rotated over their first d dims by cos, sin [d]; k, v stored at row `row` of the caches
// (in their dtype); then softmax(scale q.k) . v over keys first_key .. row. float32 [H, D].
at::Tensor decode_attention_rope(const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
                                 const at::Tensor& kc, const at::Tensor& vc, int64_t row, const at::Tensor& cos_in,
                                 const at::Tensor& sin_in, int64_t first_key, double scale) {
  TORCH_CHECK(kc.dim() == 3 && vc.sizes() == kc.sizes() && kc.scalar_type() == vc.scalar_type() && kc.is_contiguous() &&
              vc.is_contiguous(), "ouzel decode_attention_rope: k and v caches [C, Hkv, D] of one dtype, contiguous");
  const int64_t Hkv = kc.size(1), D = kc.size(2);
  at::Tensor q = q_in.to(at::kFloat).contiguous().clone();
  at::Tensor k = k_in.to(at::kFloat).contiguous().clone();
  const at::Tensor v = v_in.to(at::kFloat).contiguous();
  const at::Tensor cs = cos_in.to(at::kFloat).contiguous(), sn = sin_in.to(at::kFloat).contiguous();
  const int64_t d = cs.numel();
  TORCH_CHECK(q.dim() == 2 && q.size(1) == D && k.sizes() == v.sizes() && k.dim() == 2 && k.size(0) == Hkv &&
              k.size(1) == D, "ouzel decode_attention_rope: q [H, D], k and v [Hkv, D] for the caches' heads");
  TORCH_CHECK(sn.numel() == d && d % 2 == 0 && d <= D, "ouzel decode_attention_rope: cos, sin [d], d even, d <= D");
  TORCH_CHECK(0 <= row && row < kc.size(0), "ouzel decode_attention_rope: the row is outside the cache");
  float* qp = q.data_ptr<float>();
  float* kp = k.data_ptr<float>();
  for (int64_t h = 0; h < q.size(0); ++h) rope_half(qp + h * D, cs.const_data_ptr<float>(), sn.const_data_ptr<float>(), d);
  for (int64_t h = 0; h < Hkv; ++h) rope_half(kp + h * D, cs.const_data_ptr<float>(), sn.const_data_ptr<float>(), d);
  const float* vp = v.const_data_ptr<float>();
  auto write = [&](auto* kd, auto* vd) {
    for (int64_t i = 0; i < Hkv * D; ++i) {
      store_elem(kd + row * Hkv * D + i, kp[i]);
      store_elem(vd + row * Hkv * D + i, vp[i]);
    }
  };
  switch (kc.scalar_type()) {
    case at::kFloat: write(kc.data_ptr<float>(), vc.data_ptr<float>()); break;
    case at::kHalf: write(kc.data_ptr<at::Half>(), vc.data_ptr<at::Half>()); break;
    case at::kBFloat16: write(kc.data_ptr<at::BFloat16>(), vc.data_ptr<at::BFloat16>()); break;
    default: TORCH_CHECK(false, "ouzel decode_attention_rope: KV dtype must be float32, float16 or bfloat16");
  }
  return decode_attention(q, kc, vc, first_key, row + 1, scale);
}

void set_tables(const at::Tensor& iq4nl, const at::Tensor& mxfp4, const at::Tensor& ksigns, const at::Tensor& grid) {
  TORCH_CHECK(iq4nl.numel() == 16 && mxfp4.numel() == 16 && ksigns.numel() == 128 && grid.numel() == 256 * 8,
              "ouzel set_tables: wrong sizes");
  const at::Tensor a = iq4nl.to(at::kChar).contiguous(), b = mxfp4.to(at::kChar).contiguous();
  const at::Tensor c = ksigns.to(at::kByte).contiguous(), g = grid.to(at::kByte).contiguous();
  std::memcpy(g_iq4nl, a.const_data_ptr<int8_t>(), 16);
  std::memcpy(g_mxfp4, b.const_data_ptr<int8_t>(), 16);
  std::memcpy(g_ksigns, c.const_data_ptr<uint8_t>(), 128);
  const uint8_t* gp = g.const_data_ptr<uint8_t>();
  for (int i = 0; i < 256; ++i) g_iq2xxs_grid[i] = rd64(gp + 8 * i);
  g_tables_set = true;
}

// gemv_max_m: -1 each type's default, >= 0 for all types, < -1 unchanged; tile_bytes: > 0 sets;
// prefill_mode: 0 blocked (AVX-512 builds only), 1 at::mm, 2 the build's default, else unchanged
void configure(int64_t gemv_max_m, int64_t tile_bytes, int64_t prefill_mode) {
  if (gemv_max_m >= -1) g_gemv_max_m = gemv_max_m;
  if (tile_bytes > 0) g_tile_bytes = tile_bytes;
  if (prefill_mode == 2) g_prefill_mode = OUZEL_AVX512 ? 0 : 1;
  if (prefill_mode == 1 || (prefill_mode == 0 && OUZEL_AVX512)) g_prefill_mode = prefill_mode;
}

std::string build_info() {
  return std::string(OUZEL_AVX512 ? "avx512" : "scalar") +
         " gemv_max_m=" + (g_gemv_max_m < 0 ? std::string("per-type(12, 6 for 256-blocks)") : std::to_string(g_gemv_max_m)) +
         " prefill=" + (g_prefill_mode == 0 ? "blocked" : "at::mm") + " tile_bytes=" + std::to_string(g_tile_bytes);
}

}  // namespace

TORCH_LIBRARY(ouzel_cpu, m) {
  m.def("qmatmul(Tensor x, Tensor raw, int ggml_type, int out_features) -> Tensor", &qmatmul);
  m.def("dequantize(Tensor raw, int ggml_type) -> Tensor", &dequantize);
  m.def("qmatmul_multi(Tensor x, Tensor[] raws, int[] ggml_types) -> Tensor", &qmatmul_multi);
  m.def("embedding(Tensor raw, int ggml_type, Tensor ids) -> Tensor", &embedding);
  m.def("set_tables(Tensor iq4nl, Tensor mxfp4, Tensor ksigns, Tensor grid) -> ()", &set_tables);
  m.def("configure(int gemv_max_m, int tile_bytes, int prefill_mode) -> ()", &configure);
  m.def("build_info() -> str", &build_info);
  m.def("decode_attention(Tensor q, Tensor k, Tensor v, int first_key, int n_keys, float scale) -> Tensor",
        &decode_attention);
  m.def("decode_attention_rope(Tensor q, Tensor k, Tensor v, Tensor(a!) k_cache, Tensor(b!) v_cache, int row, "
        "Tensor cos, Tensor sin, int first_key, float scale) -> Tensor", &decode_attention_rope);
}

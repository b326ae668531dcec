// qcompile sparse/dense linear kernels in the SparAMX layout (backends/amx/format.py):
//   (1) AVX-512 sparse GEMV/GEMM: bf16 rows expanded with vpexpandw and multiplied by
//       vdpbf16ps; int8 rows expanded with vpexpandb and multiplied by vpdpbusd on activations
//       offset by +128 (corrected by 128·Σw per output);
//   (1b) AVX2 sparse kernels for CPUs without AVX-512: a 256-entry pshufb table per mask byte
//       does the expansion, bf16 -> fp32 by shift/mask + FMA, int8 by vpmaddwd;
//   (2) the same kernels on the dense layout (plain loads);
//   (3) AMX kernels (tileloadd, tdpbf16ps, tdpbssd; 2×2 accumulator blocking: tiles 0–3 hold
//       C, 4–5 A, 6–7 B) written once against QC_TILE_* macros, instantiated twice: on the
//       hardware tiles, and on a C emulation of the tile registers that follows the Intel SDM
//       (configuration checks, zero fill, int32 wraparound, bf16 DAZ/FTZ/RNE), so the very same
//       kernel source runs where AMX is missing.
// A runtime gate (CPUID, then arch_prctl(ARCH_REQ_XCOMP_PERM)) decides whether the hardware
// tiles may be used; callers fall back to AVX-512 when it says no. Nothing here exits.
#include <immintrin.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#include <cpuid.h>
#include <unistd.h>
#include <sys/syscall.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#define QC_EXPORT extern "C" __attribute__((visibility("default")))
#define QC_AVX512 __attribute__((target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx512vnni,avx512vpopcntdq")))
#define QC_AMX __attribute__((target( \
    "avx512f,avx512bw,avx512vl,avx512dq,avx512bf16,avx512vbmi2,avx512vnni,avx512vpopcntdq," \
    "amx-tile,amx-int8,amx-bf16")))

// ---------------------------------------------------------------------------------------
// activations

// float32 -> bf16, round to nearest even (what ml_dtypes does; no flush of subnormals)
static inline uint16_t qc_bf16(float f) {
  uint32_t u;
  memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  // quiet NaN
  u += 0x7fffu + ((u >> 16) & 1u);
  return (uint16_t)(u >> 16);
}

static inline float qc_f32(uint16_t b) {
  uint32_t u = (uint32_t)b << 16;
  float f;
  memcpy(&f, &u, 4);
  return f;
}

// x[m][k] -> xb[m][kp] bf16 bits, zero padded
QC_EXPORT void qc_sp_prep_bf16(const float* x, int64_t m, int64_t k, int64_t kp, uint16_t* xb) {
  for (int64_t i = 0; i < m; ++i) {
    for (int64_t j = 0; j < k; ++j) xb[i * kp + j] = qc_bf16(x[i * k + j]);
    for (int64_t j = k; j < kp; ++j) xb[i * kp + j] = 0;
  }
}

// per-token symmetric int8 (scale = amax/127, round half to even, clamp [-128, 127]): the
// interpreter's fake quantization of an int8 per_token activation
QC_EXPORT void qc_sp_prep_int8(const float* x, int64_t m, int64_t k, int64_t kp, int8_t* xq,
                               float* sx) {
  for (int64_t i = 0; i < m; ++i) {
    float a = 0.0f;
    for (int64_t j = 0; j < k; ++j) a = fmaxf(a, fabsf(x[i * k + j]));
    const float s = a / 127.0f;
    sx[i] = s;
    for (int64_t j = 0; j < k; ++j) {
      float q = s > 0.0f ? nearbyintf(x[i * k + j] / s) : 0.0f;
      q = q > 127.0f ? 127.0f : (q < -128.0f ? -128.0f : q);
      xq[i * kp + j] = (int8_t)q;
    }
    for (int64_t j = k; j < kp; ++j) xq[i * kp + j] = 0;
  }
}

static inline void qc_store16(float* y, int64_t n, int64_t col0, __m512 v, const float* bias)
    QC_AVX512;
static inline void qc_store16(float* y, int64_t n, int64_t col0, __m512 v, const float* bias) {
  const int64_t left = n - col0;
  const __mmask16 mk = left >= 16 ? (__mmask16)0xffff : (__mmask16)((1u << left) - 1u);
  if (bias) v = _mm512_add_ps(v, _mm512_maskz_loadu_ps(mk, bias + col0));
  _mm512_mask_storeu_ps(y + col0, mk, v);
}

// Where each of JT column tiles starting at j reads its values and (sparse) row masks.
template <int JT, typename V, typename M>
static inline void qc_tile_streams(const V* vals, const M* masks, const int64_t* offs, int64_t j,
                                   int64_t rows, const V* (&v)[JT], const M* (&mk)[JT]) {
  for (int a = 0; a < JT; ++a) {
    v[a] = vals + offs[j + a];
    mk[a] = masks ? masks + (j + a) * rows : 0;
  }
}

// ---------------------------------------------------------------------------------------
// (1)+(2) AVX-512 kernels over column tiles j0..j1, all m rows (MT at a time)

// JT column tiles × MT rows per pass: JT·MT independent accumulator chains (the latency of
// vdpbf16ps / vpdpbusd is hidden), each column tile's mask and value stream read once per pass
template <bool SPARSE, int JT, int MT>
QC_AVX512 static inline void qc_bf16_block(const uint16_t* xb, int64_t kp, int64_t m0,
                                           const uint32_t* masks, const uint16_t* vals,
                                           const int64_t* offs, const float* bias, float* y,
                                           int64_t n, int64_t j) {
  const int64_t rows = kp / 2;
  __m512 acc[JT][MT];
#pragma GCC unroll 8
  for (int a = 0; a < JT; ++a)
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) acc[a][t] = _mm512_setzero_ps();
  const uint16_t* v[JT];
  const uint32_t* mk[JT];
  qc_tile_streams<JT>(vals, masks, offs, j, rows, v, mk);
  for (int64_t r = 0; r < rows; ++r) {
    __m512i xp[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      uint32_t pair;
      memcpy(&pair, xb + (m0 + t) * kp + 2 * r, 4);
      xp[t] = _mm512_set1_epi32((int)pair);
    }
#pragma GCC unroll 8
    for (int a = 0; a < JT; ++a) {
      __m512i w;
      if (SPARSE) {
        const uint32_t bits = mk[a][r];
        w = _mm512_maskz_expandloadu_epi16((__mmask32)bits, v[a]);
        v[a] += __builtin_popcount(bits);
      } else {
        w = _mm512_loadu_si512((const void*)v[a]);
        v[a] += 32;
      }
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t)
        acc[a][t] = _mm512_dpbf16_ps(acc[a][t], (__m512bh)xp[t], (__m512bh)w);
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < JT; ++a)
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) qc_store16(y + (m0 + t) * n, n, 16 * (j + a), acc[a][t], bias);
}

template <bool SPARSE>
QC_AVX512 static void qc_bf16_avx512(const uint16_t* xb, int64_t m, int64_t kp,
                                     const uint32_t* masks, const uint16_t* vals,
                                     const int64_t* offs, const float* bias, float* y,
                                     int64_t n, int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1;) {
    const bool four = j + 4 <= j1;
    for (int64_t m0 = 0; m0 < m;) {
      if (m - m0 >= 4) {
        if (four) qc_bf16_block<SPARSE, 4, 4>(xb, kp, m0, masks, vals, offs, bias, y, n, j);
        else qc_bf16_block<SPARSE, 1, 4>(xb, kp, m0, masks, vals, offs, bias, y, n, j);
        m0 += 4;
      } else {
        if (four) qc_bf16_block<SPARSE, 4, 1>(xb, kp, m0, masks, vals, offs, bias, y, n, j);
        else qc_bf16_block<SPARSE, 1, 1>(xb, kp, m0, masks, vals, offs, bias, y, n, j);
        m0 += 1;
      }
    }
    j += four ? 4 : 1;
  }
}

template <bool SPARSE, int JT, int MT>
QC_AVX512 static inline void qc_int8_block(const int8_t* xq, const float* sx, int64_t kp,
                                           int64_t m0, const uint64_t* masks, const int8_t* vals,
                                           const int64_t* offs, const int32_t* colsum,
                                           const float* sw, const float* bias, float* y,
                                           int64_t n, int64_t j) {
  const int64_t rows = kp / 4;
  __m512i acc[JT][MT];
#pragma GCC unroll 8
  for (int a = 0; a < JT; ++a)
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) acc[a][t] = _mm512_setzero_si512();
  const int8_t* v[JT];
  const uint64_t* mk[JT];
  qc_tile_streams<JT>(vals, masks, offs, j, rows, v, mk);
  for (int64_t r = 0; r < rows; ++r) {
    __m512i xp[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      uint32_t quad;
      memcpy(&quad, xq + (m0 + t) * kp + 4 * r, 4);
      xp[t] = _mm512_set1_epi32((int)(quad ^ 0x80808080u));  // s8 -> u8 + 128
    }
#pragma GCC unroll 8
    for (int a = 0; a < JT; ++a) {
      __m512i w;
      if (SPARSE) {
        const uint64_t bits = mk[a][r];
        w = _mm512_maskz_expandloadu_epi8((__mmask64)bits, v[a]);
        v[a] += __builtin_popcountll(bits);
      } else {
        w = _mm512_loadu_si512((const void*)v[a]);
        v[a] += 64;
      }
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[a][t] = _mm512_dpbusd_epi32(acc[a][t], xp[t], w);
    }
  }
  const __m512i off = _mm512_set1_epi32(128);
#pragma GCC unroll 8
  for (int a = 0; a < JT; ++a) {
    const __m512i cs = _mm512_mullo_epi32(_mm512_loadu_si512((const void*)(colsum + 16 * (j + a))), off);
    const __m512 s = _mm512_loadu_ps(sw + 16 * (j + a));
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      const __m512i yi = _mm512_sub_epi32(acc[a][t], cs);
      __m512 f = _mm512_mul_ps(_mm512_cvtepi32_ps(yi), _mm512_set1_ps(sx[m0 + t]));
      f = _mm512_mul_ps(f, s);
      qc_store16(y + (m0 + t) * n, n, 16 * (j + a), f, bias);
    }
  }
}

template <bool SPARSE>
QC_AVX512 static void qc_int8_avx512(const int8_t* xq, const float* sx, int64_t m, int64_t kp,
                                     const uint64_t* masks, const int8_t* vals,
                                     const int64_t* offs, const int32_t* colsum,
                                     const float* sw, const float* bias, float* y, int64_t n,
                                     int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1;) {
    const bool four = j + 4 <= j1;
    for (int64_t m0 = 0; m0 < m;) {
      if (m - m0 >= 4) {
        if (four) qc_int8_block<SPARSE, 4, 4>(xq, sx, kp, m0, masks, vals, offs, colsum, sw, bias, y, n, j);
        else qc_int8_block<SPARSE, 1, 4>(xq, sx, kp, m0, masks, vals, offs, colsum, sw, bias, y, n, j);
        m0 += 4;
      } else {
        if (four) qc_int8_block<SPARSE, 4, 1>(xq, sx, kp, m0, masks, vals, offs, colsum, sw, bias, y, n, j);
        else qc_int8_block<SPARSE, 1, 1>(xq, sx, kp, m0, masks, vals, offs, colsum, sw, bias, y, n, j);
        m0 += 1;
      }
    }
    j += four ? 4 : 1;
  }
}

// ---------------------------------------------------------------------------------------
// (1b) AVX2 kernels (no vpexpand): a mask byte picks a pshufb control from a 256-entry table
//      that moves the packed non-zeros to their places (zeros elsewhere). Same layout, same
//      results as the AVX-512 kernels: bf16 pairs multiplied exactly in fp32 and added odd
//      product first, then even (vdpbf16ps' order), int8 products summed exactly in int32
//      (vpmaddwd on sign-extended codes: no vpmaddubsw saturation), the same float epilogue.
//      A sparse layout carries QC_SP_PAD zero values past its last non-zero, so the 16-byte
//      loads of the last row stay inside the array.

#define QC_AVX2 __attribute__((target("avx2,fma,bmi,bmi2,popcnt")))
#define QC_SP_PAD 32

struct QcExpandTables {
  alignas(16) uint8_t w16[256][16];  // bf16: mask byte -> control for 8 two-byte elements
  uint64_t lo[256], hi[256];         // int8: mask byte -> control for 8 bytes (low/high half)
  QcExpandTables() {
    for (int b = 0; b < 256; ++b) {
      int s = 0;
      uint8_t c8[8];
      for (int i = 0; i < 8; ++i) {
        if (b >> i & 1) {
          w16[b][2 * i] = (uint8_t)(2 * s);
          w16[b][2 * i + 1] = (uint8_t)(2 * s + 1);
          c8[i] = (uint8_t)s++;
        } else {
          w16[b][2 * i] = w16[b][2 * i + 1] = 0x80;
          c8[i] = 0x80;
        }
      }
      uint64_t l = 0, h = 0;
      for (int i = 0; i < 8; ++i) {
        l |= (uint64_t)c8[i] << (8 * i);
        h |= (uint64_t)(c8[i] == 0x80 ? 0x80 : c8[i] + 8) << (8 * i);
      }
      lo[b] = l;
      hi[b] = h;
    }
  }
};
static const QcExpandTables qc_expand;

// 8 bf16 values from the packed stream at v; `at` = 16 x the mask byte (the control's offset)
QC_AVX2 static inline __m128i qc_expand_bf16x8(const uint16_t* v, uint32_t at) {
  const __m128i d = _mm_loadu_si128((const __m128i*)v);
  return _mm_shuffle_epi8(d, _mm_load_si128((const __m128i*)((const uint8_t*)qc_expand.w16 + at)));
}

// 16 int8 values (mask bits 0..15 of `bits`) from the packed stream at v
QC_AVX2 static inline __m128i qc_expand_i8x16(const int8_t* v, unsigned bits) {
  const unsigned b0 = bits & 0xff, b1 = bits >> 8 & 0xff;
  const __m128i d = _mm_unpacklo_epi64(_mm_loadl_epi64((const __m128i*)v),
                                       _mm_loadl_epi64((const __m128i*)(v + __builtin_popcount(b0))));
  const __m128i c = _mm_set_epi64x((long long)qc_expand.hi[b1], (long long)qc_expand.lo[b0]);
  return _mm_shuffle_epi8(d, c);
}

QC_AVX2 static inline void qc_store8(float* y, int64_t n, int64_t col0, __m256 v,
                                     const float* bias) {
  const int64_t left = n - col0;
  if (left <= 0) return;
  if (left >= 8) {
    if (bias) v = _mm256_add_ps(v, _mm256_loadu_ps(bias + col0));
    _mm256_storeu_ps(y + col0, v);
    return;
  }
  const __m256i mk = _mm256_cmpgt_epi32(_mm256_set1_epi32((int)left),
                                        _mm256_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7));
  if (bias) v = _mm256_add_ps(v, _mm256_maskload_ps(bias + col0, mk));
  _mm256_maskstore_ps(y + col0, mk, v);
}

// JT column tiles x MT activation rows: a 64-byte row is two halves of 8 outputs, each 32-bit
// lane one output's (even, odd) bf16 pair: even = lane << 16, odd = lane & 0xffff0000 as fp32
template <bool SPARSE, int JT, int MT>
QC_AVX2 static inline void qc_bf16_block2(const uint16_t* xb, int64_t kp, int64_t m0,
                                          const uint32_t* masks, const uint16_t* vals,
                                          const int64_t* offs, const float* bias, float* y,
                                          int64_t n, int64_t j) {
  const int64_t rows = kp / 2;
  const __m256i odd = _mm256_set1_epi32((int)0xffff0000u);
  __m256 acc[JT][2][MT];
#pragma GCC unroll 8
  for (int a = 0; a < JT; ++a)
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[a][h][t] = _mm256_setzero_ps();
  const uint16_t* v[JT];
  const uint32_t* mk[JT];
  qc_tile_streams<JT>(vals, masks, offs, j, rows, v, mk);
  for (int64_t r = 0; r < rows; ++r) {
    __m256 xe[MT], xo[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {  // the activation pair, broadcast, split as the weights are
      int32_t pair;
      memcpy(&pair, xb + (m0 + t) * kp + 2 * r, 4);
      const __m256i xp = _mm256_set1_epi32(pair);
      xe[t] = _mm256_castsi256_ps(_mm256_slli_epi32(xp, 16));
      xo[t] = _mm256_castsi256_ps(_mm256_and_si256(xp, odd));
    }
#pragma GCC unroll 8
    for (int a = 0; a < JT; ++a) {
      __m256i w[2];
      if (SPARSE) {
        const uint32_t bits = mk[a][r];
        const uint16_t* p = v[a];
        // the mask's bytes (bextr: no copies) and where quarters 1..3 start in the stream
        const uint32_t b0 = bits & 0xff, b1 = _bextr_u32(bits, 8, 8), b2 = _bextr_u32(bits, 16, 8),
                       b3 = bits >> 24;
        // (independent popcounts: the stream pointer's chain from row to row stays one add)
        const int c1 = __builtin_popcount(b0), c2 = __builtin_popcount(bits & 0xffffu),
                  c3 = __builtin_popcount(bits & 0xffffffu);
        w[0] = _mm256_set_m128i(qc_expand_bf16x8(p + c1, b1 << 4), qc_expand_bf16x8(p, b0 << 4));
        w[1] = _mm256_set_m128i(qc_expand_bf16x8(p + c3, b3 << 4),
                                qc_expand_bf16x8(p + c2, b2 << 4));
        v[a] = p + __builtin_popcount(bits);
      } else {
        w[0] = _mm256_loadu_si256((const __m256i*)v[a]);
        w[1] = _mm256_loadu_si256((const __m256i*)(v[a] + 16));
        v[a] += 32;
      }
#pragma GCC unroll 2
      for (int h = 0; h < 2; ++h) {
        const __m256 we = _mm256_castsi256_ps(_mm256_slli_epi32(w[h], 16));
        const __m256 wo = _mm256_castsi256_ps(_mm256_and_si256(w[h], odd));
        // bf16 x bf16 is exact in fp32, so each FMA rounds once, as the add of vdpbf16ps
#pragma GCC unroll 8
        for (int t = 0; t < MT; ++t) {
          acc[a][h][t] = _mm256_fmadd_ps(xo[t], wo, acc[a][h][t]);
          acc[a][h][t] = _mm256_fmadd_ps(xe[t], we, acc[a][h][t]);
        }
      }
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < JT; ++a)
    for (int h = 0; h < 2; ++h)
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t)
        qc_store8(y + (m0 + t) * n, n, 16 * (j + a) + 8 * h, acc[a][h][t], bias);
}

template <bool SPARSE>
QC_AVX2 static void qc_bf16_avx2(const uint16_t* xb, int64_t m, int64_t kp,
                                 const uint32_t* masks, const uint16_t* vals,
                                 const int64_t* offs, const float* bias, float* y, int64_t n,
                                 int64_t j0, int64_t j1) {
  // groups of four column tiles: row pairs two tiles at a time (8 accumulators), a single
  // row four at a time (8 independent FMA chains hide the latency)
  for (int64_t j = j0; j < j1; j += 4) {
    const int64_t g = j1 - j < 4 ? j1 - j : 4;
    int64_t m0 = 0;
    for (; m - m0 >= 2; m0 += 2)
      for (int64_t jj = j; jj < j + g; jj += 2) {
        if (jj + 2 <= j + g) qc_bf16_block2<SPARSE, 2, 2>(xb, kp, m0, masks, vals, offs, bias, y, n, jj);
        else qc_bf16_block2<SPARSE, 1, 2>(xb, kp, m0, masks, vals, offs, bias, y, n, jj);
      }
    if (m0 == m) continue;
    if (g == 4) {
      qc_bf16_block2<SPARSE, 4, 1>(xb, kp, m0, masks, vals, offs, bias, y, n, j);
      continue;
    }
    for (int64_t jj = j; jj < j + g; jj += 2) {
      if (jj + 2 <= j + g) qc_bf16_block2<SPARSE, 2, 1>(xb, kp, m0, masks, vals, offs, bias, y, n, jj);
      else qc_bf16_block2<SPARSE, 1, 1>(xb, kp, m0, masks, vals, offs, bias, y, n, jj);
    }
  }
}

// int8: a 64-byte row is four quarters of 4 outputs x 4 K; a quarter's 16 codes, sign-extended
// to int16, times the activation quad (x0, x1, x2, x3) by vpmaddwd gives each output two
// int32 partial sums (k0+k1, k2+k3), added up exactly; the pairs are summed at the end
template <bool SPARSE, int JT, int MT>
QC_AVX2 static inline void qc_int8_block2(const int8_t* xq, const float* sx, int64_t kp,
                                          int64_t m0, const uint64_t* masks, const int8_t* vals,
                                          const int64_t* offs, const float* sw,
                                          const float* bias, float* y, int64_t n, int64_t j) {
  const int64_t rows = kp / 4;
  __m256i acc[JT][4][MT];
#pragma GCC unroll 8
  for (int a = 0; a < JT; ++a)
    for (int q = 0; q < 4; ++q)
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) acc[a][q][t] = _mm256_setzero_si256();
  const int8_t* v[JT];
  const uint64_t* mk[JT];
  qc_tile_streams<JT>(vals, masks, offs, j, rows, v, mk);
  for (int64_t r = 0; r < rows; ++r) {
    __m256i xs[MT];
#pragma GCC unroll 8
    for (int t = 0; t < MT; ++t) {
      int32_t quad;
      memcpy(&quad, xq + (m0 + t) * kp + 4 * r, 4);
      xs[t] = _mm256_broadcastq_epi64(_mm_cvtepi8_epi16(_mm_cvtsi32_si128(quad)));
    }
#pragma GCC unroll 8
    for (int a = 0; a < JT; ++a) {
      __m128i w[4];
      if (SPARSE) {
        const uint64_t bits = mk[a][r];
        const int8_t* p = v[a];
        const int c1 = __builtin_popcountll(bits & 0xffffull),
                  c2 = __builtin_popcountll(bits & 0xffffffffull),
                  c3 = __builtin_popcountll(bits & 0xffffffffffffull);
        w[0] = qc_expand_i8x16(p, (unsigned)(bits & 0xffff));
        w[1] = qc_expand_i8x16(p + c1, (unsigned)(bits >> 16 & 0xffff));
        w[2] = qc_expand_i8x16(p + c2, (unsigned)(bits >> 32 & 0xffff));
        w[3] = qc_expand_i8x16(p + c3, (unsigned)(bits >> 48));
        v[a] = p + __builtin_popcountll(bits);
      } else {
#pragma GCC unroll 4
        for (int q = 0; q < 4; ++q) w[q] = _mm_loadu_si128((const __m128i*)(v[a] + 16 * q));
        v[a] += 64;
      }
#pragma GCC unroll 4
      for (int q = 0; q < 4; ++q) {
        const __m256i w16 = _mm256_cvtepi8_epi16(w[q]);
#pragma GCC unroll 8
        for (int t = 0; t < MT; ++t)
          acc[a][q][t] = _mm256_add_epi32(acc[a][q][t], _mm256_madd_epi16(w16, xs[t]));
      }
    }
  }
#pragma GCC unroll 8
  for (int a = 0; a < JT; ++a)
#pragma GCC unroll 2
    for (int h = 0; h < 2; ++h) {
      const int64_t col0 = 16 * (j + a) + 8 * h;
      const __m256 s = _mm256_loadu_ps(sw + col0);  // scales are padded to whole tiles
#pragma GCC unroll 8
      for (int t = 0; t < MT; ++t) {
        // lanes (o0: k01, k23), (o1: ...): hadd pairs them, per 128-bit half
        const __m256i yi = _mm256_permute4x64_epi64(
            _mm256_hadd_epi32(acc[a][2 * h][t], acc[a][2 * h + 1][t]), 0xd8);
        __m256 f = _mm256_mul_ps(_mm256_cvtepi32_ps(yi), _mm256_set1_ps(sx[m0 + t]));
        f = _mm256_mul_ps(f, s);
        qc_store8(y + (m0 + t) * n, n, col0, f, bias);
      }
    }
}

template <bool SPARSE>
QC_AVX2 static void qc_int8_avx2(const int8_t* xq, const float* sx, int64_t m, int64_t kp,
                                 const uint64_t* masks, const int8_t* vals, const int64_t* offs,
                                 const float* sw, const float* bias, float* y, int64_t n,
                                 int64_t j0, int64_t j1) {
  for (int64_t j = j0; j < j1; j += 2) {
    const bool two = j + 2 <= j1;
    int64_t m0 = 0;
    for (; m - m0 >= 2; m0 += 2)
      for (int64_t jj = j; jj < j + (two ? 2 : 1); ++jj)
        qc_int8_block2<SPARSE, 1, 2>(xq, sx, kp, m0, masks, vals, offs, sw, bias, y, n, jj);
    if (m0 == m) continue;
    if (two) qc_int8_block2<SPARSE, 2, 1>(xq, sx, kp, m0, masks, vals, offs, sw, bias, y, n, j);
    else qc_int8_block2<SPARSE, 1, 1>(xq, sx, kp, m0, masks, vals, offs, sw, bias, y, n, j);
  }
}

// ---------------------------------------------------------------------------------------
// (3) AMX: hardware tiles and the emulation, behind one set of macros

struct QcTileConfig {  // the 64-byte operand of ldtilecfg (SDM vol. 1, figure 20-1)
  uint8_t palette_id;
  uint8_t start_row;
  uint8_t reserved[14];
  uint16_t colsb[16];
  uint8_t rows[16];
};

// The emulation: a thread's tile state, following the SDM's pseudo-code for LDTILECFG,
// TILELOADD, TILESTORED, TILEZERO, TDPBF16PS and TDPBSSD.
struct QcEmuState {
  int configured;
  uint8_t rows[8];
  uint16_t colsb[8];
  alignas(64) uint8_t t[8][16 * 64];
  int err;  // first error: 1 bad config, 2 unconfigured tile, 3 shape mismatch
};
static thread_local QcEmuState qc_emu;

static inline float qc_daz(float f) { return fpclassify(f) == FP_SUBNORMAL ? copysignf(0.0f, f) : f; }

static void qc_emu_fail(int code) {
  if (!qc_emu.err) qc_emu.err = code;
}
static void qc_emu_config(const QcTileConfig* c) {
  memset(&qc_emu, 0, sizeof(qc_emu) - sizeof(int));
  if (c->palette_id != 1) { qc_emu_fail(1); return; }
  for (int i = 0; i < 8; ++i) {
    if (c->rows[i] > 16 || c->colsb[i] > 64 || (c->rows[i] == 0) != (c->colsb[i] == 0)) {
      qc_emu_fail(1);
      return;
    }
    qc_emu.rows[i] = c->rows[i];
    qc_emu.colsb[i] = c->colsb[i];
  }
  qc_emu.configured = 1;
}
static bool qc_emu_ok(int T) {
  if (!qc_emu.configured || T < 0 || T > 7 || qc_emu.rows[T] == 0) { qc_emu_fail(2); return false; }
  return true;
}
static void qc_emu_zero(int T) {
  if (qc_emu_ok(T)) memset(qc_emu.t[T], 0, sizeof(qc_emu.t[T]));
}
static void qc_emu_load(int T, const void* p, int64_t stride) {
  if (!qc_emu_ok(T)) return;
  const uint8_t* b = (const uint8_t*)p;
  for (int r = 0; r < 16; ++r)
    for (int c = 0; c < 64; ++c)  // rows and bytes past the configured shape read as zero
      qc_emu.t[T][r * 64 + c] = (r < qc_emu.rows[T] && c < qc_emu.colsb[T]) ? b[r * stride + c] : 0;
}
static void qc_emu_store(int T, void* p, int64_t stride) {
  if (!qc_emu_ok(T)) return;
  for (int r = 0; r < qc_emu.rows[T]; ++r)
    memcpy((uint8_t*)p + r * stride, qc_emu.t[T] + r * 64, qc_emu.colsb[T]);
}
static bool qc_emu_shapes(int C, int A, int B) {
  if (!qc_emu_ok(C) || !qc_emu_ok(A) || !qc_emu_ok(B)) return false;
  if (qc_emu.rows[A] != qc_emu.rows[C] || qc_emu.colsb[A] / 4 != qc_emu.rows[B] ||
      qc_emu.colsb[B] != qc_emu.colsb[C] || qc_emu.colsb[C] % 4 || qc_emu.colsb[A] % 4) {
    qc_emu_fail(3);
    return false;
  }
  return true;
}
// TDPBF16PS: per output, the even then the odd bf16 product added in fp32 (a product of two
// bf16 is exact in fp32), inputs DAZ, results FTZ, round to nearest even
static void qc_emu_dpbf16ps(int C, int A, int B) {
  if (!qc_emu_shapes(C, A, B)) return;
  const int M = qc_emu.rows[C], K = qc_emu.colsb[A] / 4, N = qc_emu.colsb[C] / 4;
  float* c = (float*)qc_emu.t[C];
  const uint16_t* a = (const uint16_t*)qc_emu.t[A];
  const uint16_t* b = (const uint16_t*)qc_emu.t[B];
  for (int mm = 0; mm < M; ++mm)
    for (int k = 0; k < K; ++k)
      for (int nn = 0; nn < N; ++nn) {
        float acc = c[mm * 16 + nn];
        for (int h = 0; h < 2; ++h) {
          const float p = qc_daz(qc_f32(a[mm * 32 + 2 * k + h])) * qc_daz(qc_f32(b[k * 32 + 2 * nn + h]));
          acc = qc_daz(acc + p);  // FTZ
        }
        c[mm * 16 + nn] = acc;
      }
}
// TDPBSSD: signed x signed bytes, four products per int32, wrapping
static void qc_emu_dpbssd(int C, int A, int B) {
  if (!qc_emu_shapes(C, A, B)) return;
  const int M = qc_emu.rows[C], K = qc_emu.colsb[A] / 4, N = qc_emu.colsb[C] / 4;
  uint32_t* c = (uint32_t*)qc_emu.t[C];
  const int8_t* a = (const int8_t*)qc_emu.t[A];
  const int8_t* b = (const int8_t*)qc_emu.t[B];
  for (int mm = 0; mm < M; ++mm)
    for (int k = 0; k < K; ++k)
      for (int nn = 0; nn < N; ++nn) {
        uint32_t acc = c[mm * 16 + nn];
        for (int h = 0; h < 4; ++h)
          acc += (uint32_t)((int32_t)a[mm * 64 + 4 * k + h] * (int32_t)b[k * 64 + 4 * nn + h]);
        c[mm * 16 + nn] = acc;
      }
}
static void qc_emu_release(void) { qc_emu.configured = 0; }
static int qc_emu_error(void) { int e = qc_emu.err; qc_emu.err = 0; return e; }

// the kernel source, instantiated on the hardware tiles and on the emulation
#define QC_TILE_CONFIG(cfg) _tile_loadconfig(cfg)
#define QC_TILE_ZERO(t) _tile_zero(t)
#define QC_TILE_LOAD(t, p, s) _tile_loadd(t, p, s)
#define QC_TILE_STORE(t, p, s) _tile_stored(t, p, s)
#define QC_TILE_DPBF16PS(c, a, b) _tile_dpbf16ps(c, a, b)
#define QC_TILE_DPBSSD(c, a, b) _tile_dpbssd(c, a, b)
#define QC_TILE_RELEASE() _tile_release()
#define QC_TILE_ERROR() 0
#define QC_AMX_KERNEL qc_amx_kernel_hw
#define QC_AMX_TARGET QC_AMX
#include "amx_kernel.inc"
#undef QC_TILE_CONFIG
#undef QC_TILE_ZERO
#undef QC_TILE_LOAD
#undef QC_TILE_STORE
#undef QC_TILE_DPBF16PS
#undef QC_TILE_DPBSSD
#undef QC_TILE_RELEASE
#undef QC_TILE_ERROR
#undef QC_AMX_KERNEL
#undef QC_AMX_TARGET
#define QC_TILE_CONFIG(cfg) qc_emu_config(cfg)
#define QC_TILE_ZERO(t) qc_emu_zero(t)
#define QC_TILE_LOAD(t, p, s) qc_emu_load(t, p, s)
#define QC_TILE_STORE(t, p, s) qc_emu_store(t, p, s)
#define QC_TILE_DPBF16PS(c, a, b) qc_emu_dpbf16ps(c, a, b)
#define QC_TILE_DPBSSD(c, a, b) qc_emu_dpbssd(c, a, b)
#define QC_TILE_RELEASE() qc_emu_release()
#define QC_TILE_ERROR() qc_emu_error()
#define QC_AMX_KERNEL qc_amx_kernel_emu
#define QC_AMX_TARGET QC_AVX512
#include "amx_kernel.inc"

// The emulation's own checks, for the tests: 0..3 expect the error they provoke (1 bad
// configuration, 2 unconfigured tile, 3 mismatched shapes); 4 checks the zero fill of a load
// past the configured shape, 5 the int32 wraparound of TDPBSSD (1 = as the SDM says).
QC_EXPORT int qc_amx_emu_check(int which) {
  QcTileConfig c;
  memset(&c, 0, sizeof(c));
  c.palette_id = 1;
  alignas(64) uint8_t buf[16 * 64];
  memset(buf, 0xff, sizeof(buf));
  qc_emu_error();
  switch (which) {
    case 0: c.palette_id = 0; qc_emu_config(&c); break;
    case 1: c.rows[0] = 17; c.colsb[0] = 64; qc_emu_config(&c); break;
    case 2: c.rows[0] = 4; c.colsb[0] = 64; qc_emu_config(&c); qc_emu_load(3, buf, 64); break;
    case 3:
      for (int t = 0; t < 3; ++t) { c.rows[t] = 16; c.colsb[t] = 64; }
      c.rows[2] = 8;  // B has 8 rows, A's 64 bytes need 16
      qc_emu_config(&c); qc_emu_dpbssd(0, 1, 2); break;
    case 4: {
      c.rows[0] = 2; c.colsb[0] = 8; qc_emu_config(&c); qc_emu_load(0, buf, 64);
      int ok = 1;
      for (int r = 0; r < 16; ++r)
        for (int b = 0; b < 64; ++b)
          ok &= qc_emu.t[0][r * 64 + b] == ((r < 2 && b < 8) ? 0xff : 0);
      qc_emu_release();
      return ok;
    }
    case 5: {
      for (int t = 0; t < 3; ++t) { c.rows[t] = 1; c.colsb[t] = 4; }
      c.rows[2] = 1;
      qc_emu_config(&c);
      alignas(64) int32_t cv[16] = {2147483600};
      alignas(64) int8_t av[64], bv[64];
      memset(av, -128, sizeof(av)); memset(bv, -128, sizeof(bv));  // 4 · 16384 = 65536
      qc_emu_load(0, cv, 64); qc_emu_load(1, av, 64); qc_emu_load(2, bv, 64);
      qc_emu_dpbssd(0, 1, 2);
      int32_t out;
      memcpy(&out, qc_emu.t[0], 4);
      qc_emu_release();
      return out == (int32_t)(2147483600u + 65536u);
    }
  }
  qc_emu_release();
  return qc_emu_error();
}

// ---------------------------------------------------------------------------------------
// the runtime gate

QC_EXPORT int qc_amx_available(void) {
  static int v = -1;
  if (v >= 0) return v;
  const char* no = getenv("QCOMPILE_NO_AMX");
  if (no && *no && *no != '0') return v = 0;
  unsigned a, b, c, d;
  if (!__get_cpuid_count(7, 0, &a, &b, &c, &d)) return v = 0;
  const unsigned need = (1u << 24) | (1u << 25) | (1u << 22);  // AMX-TILE, AMX-INT8, AMX-BF16
  if ((d & need) != need) return v = 0;
  // Linux >= 5.16: ask for the tile data state (ARCH_REQ_XCOMP_PERM, XFEATURE_XTILEDATA)
  if (syscall(SYS_arch_prctl, 0x1023, 18) != 0) return v = 0;
  return v = 1;
}

QC_EXPORT int qc_sp_has_avx512(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512bf16") && __builtin_cpu_supports("avx512vbmi2") &&
         __builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512vl");
}

QC_EXPORT int qc_sp_has_avx2(void) {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
         __builtin_cpu_supports("popcnt") && __builtin_cpu_supports("bmi2");
}

// The kernel kind that runs here: 1 AMX tiles, 0 AVX-512, 3 AVX2, -1 none. The hardware's
// answer is cached; QCOMPILE_ISA (qcompile.isa: generic < avx2 < avx512 < amx) caps it on
// every call, so a process can test each level in turn.
QC_EXPORT int qc_sp_kind(void) {
  static int hw = -2;
  if (hw == -2)
    hw = qc_sp_has_avx512() ? (qc_amx_available() ? 1 : 0) : (qc_sp_has_avx2() ? 3 : -1);
  int k = hw;
  const char* cap = getenv("QCOMPILE_ISA");
  int lv = 3;
  if (cap && *cap) {
    if (!strcmp(cap, "generic")) lv = 0;
    else if (!strcmp(cap, "avx2")) lv = 1;
    else if (!strcmp(cap, "avx512")) lv = 2;
  }
  if (k == 1 && lv < 3) k = 0;
  if (k == 0 && lv < 2) k = qc_sp_has_avx2() ? 3 : -1;
  if (k == 3 && lv < 1) k = -1;
  return k;
}

// ---------------------------------------------------------------------------------------
// entry points: kind 0 = AVX-512, 1 = AMX (hardware), 2 = AMX (emulated), 3 = AVX2;
// tiles j0..j1

QC_EXPORT int qc_sp_bf16_run(int kind, int sparse, const uint16_t* xb, int64_t m, int64_t kp,
                             const uint32_t* masks, const uint16_t* vals, const int64_t* offs,
                             const float* bias, float* y, int64_t n, int64_t j0, int64_t j1) {
  if (kind == 3) {
    if (sparse) qc_bf16_avx2<true>(xb, m, kp, masks, vals, offs, bias, y, n, j0, j1);
    else qc_bf16_avx2<false>(xb, m, kp, masks, vals, offs, bias, y, n, j0, j1);
    return 0;
  }
  if (kind == 0) {
    if (sparse) qc_bf16_avx512<true>(xb, m, kp, masks, vals, offs, bias, y, n, j0, j1);
    else qc_bf16_avx512<false>(xb, m, kp, masks, vals, offs, bias, y, n, j0, j1);
    return 0;
  }
  if (kind == 1) {
    if (!qc_amx_available()) return -10;
    return sparse ? qc_amx_kernel_hw<true, false>(xb, 0, m, kp, masks, vals, offs, 0, 0, bias, y, n, j0, j1)
                  : qc_amx_kernel_hw<false, false>(xb, 0, m, kp, masks, vals, offs, 0, 0, bias, y, n, j0, j1);
  }
  return sparse ? qc_amx_kernel_emu<true, false>(xb, 0, m, kp, masks, vals, offs, 0, 0, bias, y, n, j0, j1)
                : qc_amx_kernel_emu<false, false>(xb, 0, m, kp, masks, vals, offs, 0, 0, bias, y, n, j0, j1);
}

QC_EXPORT int qc_sp_int8_run(int kind, int sparse, const int8_t* xq, const float* sx, int64_t m,
                             int64_t kp, const uint64_t* masks, const int8_t* vals,
                             const int64_t* offs, const int32_t* colsum, const float* sw,
                             const float* bias, float* y, int64_t n, int64_t j0, int64_t j1) {
  if (kind == 3) {
    if (sparse) qc_int8_avx2<true>(xq, sx, m, kp, masks, vals, offs, sw, bias, y, n, j0, j1);
    else qc_int8_avx2<false>(xq, sx, m, kp, masks, vals, offs, sw, bias, y, n, j0, j1);
    return 0;
  }
  if (kind == 0) {
    if (sparse) qc_int8_avx512<true>(xq, sx, m, kp, masks, vals, offs, colsum, sw, bias, y, n, j0, j1);
    else qc_int8_avx512<false>(xq, sx, m, kp, masks, vals, offs, colsum, sw, bias, y, n, j0, j1);
    return 0;
  }
  if (kind == 1) {
    if (!qc_amx_available()) return -10;
    return sparse ? qc_amx_kernel_hw<true, true>(xq, sx, m, kp, masks, vals, offs, colsum, sw, bias, y, n, j0, j1)
                  : qc_amx_kernel_hw<false, true>(xq, sx, m, kp, masks, vals, offs, colsum, sw, bias, y, n, j0, j1);
  }
  return sparse ? qc_amx_kernel_emu<true, true>(xq, sx, m, kp, masks, vals, offs, colsum, sw, bias, y, n, j0, j1)
                : qc_amx_kernel_emu<false, true>(xq, sx, m, kp, masks, vals, offs, colsum, sw, bias, y, n, j0, j1);
}

// standalone (ctypes): prepare activations, then OpenMP over column tiles
QC_EXPORT int qc_sp_matmul(int kind, int sparse, int int8, const float* x, int64_t m, int64_t k,
                           int64_t kp, const void* masks, const void* vals, const int64_t* offs,
                           const int32_t* colsum, const float* sw, const float* bias, float* y,
                           int64_t n, int nthreads) {
  const int64_t tiles = (n + 15) / 16;
  void* xa = aligned_alloc(64, (size_t)((m * kp * (int8 ? 1 : 2) + 63) / 64 * 64 + 64));
  float* sx = (float*)malloc(sizeof(float) * (size_t)(m + 1));
  if (!xa || !sx) { free(xa); free(sx); return -20; }
  if (int8) qc_sp_prep_int8(x, m, k, kp, (int8_t*)xa, sx);
  else qc_sp_prep_bf16(x, m, k, kp, (uint16_t*)xa);
  if (nthreads <= 0) nthreads = 1;
  // AMX pairs column tiles: split on even boundaries
  const bool amx = kind == 1 || kind == 2;
  const int64_t units = amx ? (tiles + 1) / 2 : tiles;
  if (nthreads > units) nthreads = (int)(units > 0 ? units : 1);
  int rc = 0;
#pragma omp parallel for num_threads(nthreads) schedule(static) reduction(min : rc)
  for (int t = 0; t < nthreads; ++t) {
    int64_t a = units * t / nthreads, b = units * (t + 1) / nthreads;
    if (amx) { a *= 2; b = b * 2 > tiles ? tiles : b * 2; }
    int r = int8 ? qc_sp_int8_run(kind, sparse, (const int8_t*)xa, sx, m, kp, (const uint64_t*)masks,
                                  (const int8_t*)vals, offs, colsum, sw, bias, y, n, a, b)
                 : qc_sp_bf16_run(kind, sparse, (const uint16_t*)xa, m, kp, (const uint32_t*)masks,
                                  (const uint16_t*)vals, offs, bias, y, n, a, b);
    rc = r < rc ? r : rc;
  }
  free(xa);
  free(sx);
  return rc;
}

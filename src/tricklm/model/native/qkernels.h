// Block-quantized weights times 8-bit activations, for every step: one compact copy of the weights
// serves a 1-row decode step, a 16-row batch and a 256-row prefill chunk alike.
//
// A weight is stored in blocks of 32 along k: an unsigned level per weight, and a scale d and an offset m
// per block, w = d * level + m. Levels are 4 bits (GGUF's Q4_0, Q4_1 and Q4_K levels: Q4_0 is the case
// m = -8 d) or 8 bits (Q5_0, Q5_1, Q5_K and Q8_0 levels: Q8_0 is levels q + 128 with m = -128 d); the
// K-quants' d and m are products of two factors, rounded to fp16 here.
// Both are repacked at load the way llama.cpp repacks Q4_0 for AVX-512: 16 output columns interleaved, so
// that one 64-byte load holds 4 consecutive levels of each of 16 columns. For column group g and block b,
// `levels[g][b][p]` is 64 bytes; byte 4 c + i of it holds
//   4-bit (p < 4): in its low nibble the level of column c at element 4 p + i of the block, and in its
//                  high nibble the level at element 4 (p + 4) + i;
//   8-bit (p < 8): the level of column c at element 4 p + i.
// `d[g][b]` and `m[g][b]` are the 16 columns' scales and offsets in fp16, as GGUF keeps them (a quarter
// of a bit per weight each, against half a bit in float32).
//
// Activations are quantized per block of 32 to int8 with a scale s, as llama.cpp's Q8_1 does, so each
// block's dot product is an integer one:
//
//   sum_j w_j x_j ~= d s sum_j level_j q_j + m s sum_j q_j
//
// One VNNI vpdpbusd multiplies 4 levels of 16 columns by the same 4 activations (broadcast) and adds:
// a block of 16 columns is 8 of them, and a tile of activation rows shares each loaded weight block.
// AVX2 does the same on 8 columns at a time with vpmaddubsw + vpmaddwd; its 16-bit pair sums cannot
// overflow with 4-bit levels, and 8-bit levels are recentred to signed (level - 128, whose magnitude and
// sign vpmaddubsw takes separately, as llama.cpp's Q8_0 code does). Plain C++ without either. The choice
// is made at run time, and where the CPU has AMX, chunks of many rows take bfloat16 tiles instead (both in
// `qmatmul.h`, which includes this file).

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace tricklm_q {

constexpr int64_t kBlock = 32;
constexpr int64_t kRowTile = 4;   // activation rows that share one unpacked weight block

// Rows of activations, quantized: int8 values, and per block its scale and scale * sum of values.
struct QuantizedRows {
  std::vector<int8_t> q;
  std::vector<float> scale;
  std::vector<float> scaled_sum;
};

// One block of 32 values: int8 levels into `dst`, and (scale, scale * sum of levels). The vector version
// rounds as std::nearbyint does (to nearest even, the default rounding mode) and gives the same levels.
inline void quantize_block_scalar(const float* src, int8_t* dst, float* scale, float* scaled_sum) {
  float amax = 0.0f;
  for (int64_t j = 0; j < kBlock; ++j) amax = std::max(amax, std::fabs(src[j]));
  const float s = amax / 127.0f;
  const float inv = amax > 0.0f ? 127.0f / amax : 0.0f;
  int sum = 0;
  for (int64_t j = 0; j < kBlock; ++j) {
    dst[j] = static_cast<int8_t>(std::nearbyint(src[j] * inv));
    sum += dst[j];
  }
  *scale = s;
  *scaled_sum = s * static_cast<float>(sum);
}

__attribute__((target("avx512f,avx512bw"))) inline void quantize_block_avx512(const float* src, int8_t* dst,
                                                                               float* scale, float* scaled_sum) {
  const __m512 lo = _mm512_loadu_ps(src), hi = _mm512_loadu_ps(src + 16);
  const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(lo), _mm512_abs_ps(hi)));
  const float s = amax / 127.0f;
  const __m512 inv = _mm512_set1_ps(amax > 0.0f ? 127.0f / amax : 0.0f);
  const __m512i qlo = _mm512_cvtps_epi32(_mm512_mul_ps(lo, inv)), qhi = _mm512_cvtps_epi32(_mm512_mul_ps(hi, inv));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst), _mm512_cvtepi32_epi8(qlo));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(dst + 16), _mm512_cvtepi32_epi8(qhi));
  *scale = s;
  *scaled_sum = s * static_cast<float>(_mm512_reduce_add_epi32(_mm512_add_epi32(qlo, qhi)));
}

// wide: 16 floats at a time (where the CPU has AVX-512BW; the kernels' choice decides, so the tests that
// force the AVX2 or scalar kernel check the scalar quantizer too). `out` is reused: a decode step quantizes
// the input of every projection of every layer into the same buffers, which only ever grow.
inline void quantize_rows(const float* x, int64_t rows, int64_t k, bool wide, QuantizedRows& out) {
  const int64_t blocks = k / kBlock;
  out.q.resize(std::max<size_t>(out.q.size(), rows * k));
  out.scale.resize(std::max<size_t>(out.scale.size(), rows * blocks));
  out.scaled_sum.resize(std::max<size_t>(out.scaled_sum.size(), rows * blocks));
  at::parallel_for(0, rows, 1, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) {
      for (int64_t b = 0; b < blocks; ++b) {
        const int64_t at = r * blocks + b;
        const float* src = x + r * k + b * kBlock;
        int8_t* dst = out.q.data() + r * k + b * kBlock;
        if (wide) {
          quantize_block_avx512(src, dst, &out.scale[at], &out.scaled_sum[at]);
        } else {
          quantize_block_scalar(src, dst, &out.scale[at], &out.scaled_sum[at]);
        }
      }
    }
  });
}

constexpr int64_t kCols = 16;  // output columns interleaved in one group
constexpr int64_t kLine = 64;  // bytes of one load: 4 levels (or 8, packed in nibbles) of 16 columns
constexpr int64_t kAhead = 8;  // blocks between a prefetch and the loads it serves

// Four int8 activations as one int32, the operand vpdpbusd broadcasts (memcpy: no aliasing assumption).
inline int32_t quad_at(const int8_t* q) {
  int32_t v;
  std::memcpy(&v, q, sizeof v);
  return v;
}

struct Problem {
  const QuantizedRows* x;
  const uint8_t* levels;  // [groups, blocks, bits, 64]
  const at::Half* d;      // [groups, blocks, 16]
  const at::Half* m;      // [groups, blocks, 16]
  float* out;             // [rows, n]
  int64_t rows, n, k;
  int64_t bits;  // 4 or 8: a block of a group is `bits` lines of 64 bytes

  int64_t block_bytes() const { return bits * kLine; }
};

inline void store_columns(const Problem& p, int64_t row, int64_t group, const float* values) {
  const int64_t first = group * kCols;
  const int64_t count = std::min(kCols, p.n - first);  // the last group may be padding past n
  std::memcpy(p.out + row * p.n + first, values, count * sizeof(float));
}

// The level of column c at element j of a block (the layouts above, spelled out).
inline int level_at(const uint8_t* w, int64_t bits, int64_t c, int64_t j) {
  if (bits == 8) return w[(j / 4) * kLine + c * 4 + j % 4];
  const uint8_t byte = w[(j / 4 % 4) * kLine + c * 4 + j % 4];
  return j < 16 ? byte & 0x0F : byte >> 4;
}

inline void kernel_scalar(const Problem& p, int64_t group_begin, int64_t group_end) {
  const int64_t blocks = p.k / kBlock;
  for (int64_t g = group_begin; g < group_end; ++g) {
    for (int64_t row = 0; row < p.rows; ++row) {
      float acc[kCols] = {};
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* w = p.levels + (g * blocks + b) * p.block_bytes();
        const int8_t* q = p.x->q.data() + row * p.k + b * kBlock;
        const float s = p.x->scale[row * blocks + b], ss = p.x->scaled_sum[row * blocks + b];
        for (int64_t c = 0; c < kCols; ++c) {
          int dot = 0;
          for (int64_t j = 0; j < kBlock; ++j) dot += level_at(w, p.bits, c, j) * q[j];
          const int64_t at = (g * blocks + b) * kCols + c;
          const float d = static_cast<float>(p.d[at]), m = static_cast<float>(p.m[at]);
          acc[c] += d * s * static_cast<float>(dot) + m * ss;
        }
      }
      store_columns(p, row, g, acc);
    }
  }
}

__attribute__((target("avx2,fma,f16c"))) inline __m256i dot_avx2(__m256i acc, __m256i w, __m256i x) {
  return _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_maddubs_epi16(w, x), _mm256_set1_epi16(1)));
}

// One block of 8 columns (`half` of a group) as 8 registers of unsigned operands, one per quad of
// elements; for 8-bit levels `signs` gets their recentred values, whose signs go onto the activations.
template <int BITS>
__attribute__((target("avx2,fma,f16c"))) inline void load_avx2(const uint8_t* w, int64_t half, __m256i* ops,
                                                               __m256i* signs) {
  for (int quad = 0; quad < (BITS == 4 ? 4 : 8); ++quad) {
    const __m256i v = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(w + quad * kLine + half * 32));
    if constexpr (BITS == 4) {
      const __m256i nibble = _mm256_set1_epi8(0x0F);
      ops[quad] = _mm256_and_si256(v, nibble);
      ops[quad + 4] = _mm256_and_si256(_mm256_srli_epi16(v, 4), nibble);
    } else {
      signs[quad] = _mm256_xor_si256(v, _mm256_set1_epi8(static_cast<char>(0x80)));  // level - 128
      ops[quad] = _mm256_abs_epi8(signs[quad]);  // |level - 128| <= 128: read unsigned, it fits
    }
  }
}

// AVX2: a group is two halves of 8 columns (32 bytes of each 64-byte load).
template <int BITS>
__attribute__((target("avx2,fma,f16c"))) void kernel_avx2(const Problem& p, int64_t group_begin, int64_t group_end) {
  const int64_t blocks = p.k / kBlock;
  for (int64_t g = group_begin; g < group_end; ++g) {
    for (int64_t row0 = 0; row0 < p.rows; row0 += kRowTile) {
      const int64_t tile = std::min(kRowTile, p.rows - row0);
      __m256 acc[kRowTile][2];
      for (auto& a : acc) a[0] = a[1] = _mm256_setzero_ps();
      for (int64_t b = 0; b < blocks; ++b) {
        const uint8_t* w = p.levels + (g * blocks + b) * p.block_bytes();
        for (int line = 0; line < BITS; ++line) {  // as in the VNNI kernel: stream the next blocks in ahead
          _mm_prefetch(reinterpret_cast<const char*>(w + kAhead * BITS * kLine + line * kLine), _MM_HINT_T0);
        }
        const auto* d = reinterpret_cast<const uint16_t*>(p.d + (g * blocks + b) * kCols);
        const auto* m = reinterpret_cast<const uint16_t*>(p.m + (g * blocks + b) * kCols);
        for (int64_t half = 0; half < 2; ++half) {
          __m256i ops[8], signs[8];
          load_avx2<BITS>(w, half, ops, signs);
          const __m256 dv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(d + half * 8)));
          __m256 mv = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(m + half * 8)));
          // The products were of level - 128: the 128 sum_j q_j left out goes into the offset term
          if constexpr (BITS == 8) mv = _mm256_fmadd_ps(dv, _mm256_set1_ps(128.0f), mv);
          for (int64_t t = 0; t < tile; ++t) {
            const int64_t row = row0 + t;
            const int8_t* q = p.x->q.data() + row * p.k + b * kBlock;
            __m256i isum = _mm256_setzero_si256();
            if constexpr (BITS == 4) {
              // A pair of 4-bit levels times int8 activations is at most 2 * 15 * 127 = 3810: eight such
              // sums still fit in int16, so the block's pairs add up there and widen once (one vpmaddwd a
              // block instead of eight; the same integers)
              __m256i pairs = _mm256_maddubs_epi16(ops[0], _mm256_set1_epi32(quad_at(q)));
              for (int quad = 1; quad < 8; ++quad) {
                const __m256i xq = _mm256_set1_epi32(quad_at(q + 4 * quad));
                pairs = _mm256_add_epi16(pairs, _mm256_maddubs_epi16(ops[quad], xq));
              }
              isum = _mm256_madd_epi16(pairs, _mm256_set1_epi16(1));
            } else {
              for (int quad = 0; quad < 8; ++quad) {
                const __m256i xq = _mm256_sign_epi8(_mm256_set1_epi32(quad_at(q + 4 * quad)), signs[quad]);
                isum = dot_avx2(isum, ops[quad], xq);
              }
            }
            const __m256 s = _mm256_set1_ps(p.x->scale[row * blocks + b]);
            const __m256 ss = _mm256_set1_ps(p.x->scaled_sum[row * blocks + b]);
            acc[t][half] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(isum), _mm256_mul_ps(dv, s), acc[t][half]);
            acc[t][half] = _mm256_fmadd_ps(mv, ss, acc[t][half]);
          }
        }
      }
      for (int64_t t = 0; t < tile; ++t) {
        alignas(32) float values[kCols];
        _mm256_store_ps(values, acc[t][0]);
        _mm256_store_ps(values + 8, acc[t][1]);
        store_columns(p, row0 + t, g, values);
      }
    }
  }
}

// TILE rows of one column group: a compile-time tile lets every row's dot products run as independent
// chains (vpdpbusd has a latency of several cycles: one chain per row would wait on itself).
template <int TILE, int BITS>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void vnni_tile(const Problem& p, int64_t g, int64_t row0) {
  const int64_t blocks = p.k / kBlock;
  constexpr int64_t bytes = BITS * kLine;
  __m512 acc[TILE];
  for (int t = 0; t < TILE; ++t) acc[t] = _mm512_setzero_ps();
  for (int64_t b = 0; b < blocks; ++b) {
    const uint8_t* w = p.levels + (g * blocks + b) * bytes;
    // A decode step streams every weight once from memory: ask for the next blocks ahead of time
    for (int line = 0; line < BITS; ++line) {
      _mm_prefetch(reinterpret_cast<const char*>(w + kAhead * bytes + line * kLine), _MM_HINT_T0);
    }
    __m512i ops[8];  // one per quad of elements
    for (int quad = 0; quad < BITS; ++quad) {
      const __m512i v = _mm512_loadu_si512(w + quad * kLine);
      if constexpr (BITS == 4) {
        const __m512i nibble = _mm512_set1_epi8(0x0F);
        ops[quad] = _mm512_and_si512(v, nibble);
        ops[quad + 4] = _mm512_and_si512(_mm512_srli_epi32(v, 4), nibble);
      } else {
        ops[quad] = v;
      }
    }
    const int64_t at = (g * blocks + b) * kCols;
    const __m512 dv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.d + at)));
    const __m512 mv = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.m + at)));
    // Small tiles split each row's sum in two chains; 8 rows are 8 chains already (and registers run out)
    constexpr int kChains = TILE >= 8 ? 1 : 2;
    __m512i sums[TILE][kChains];
    for (int t = 0; t < TILE; ++t) {
      for (int c = 0; c < kChains; ++c) sums[t][c] = _mm512_setzero_si512();
    }
    for (int quad = 0; quad < 8; ++quad) {
      for (int t = 0; t < TILE; ++t) {
        const int8_t* q = p.x->q.data() + (row0 + t) * p.k + b * kBlock;
        __m512i& sum = sums[t][quad % kChains];
        sum = _mm512_dpbusd_epi32(sum, ops[quad], _mm512_set1_epi32(quad_at(q + 4 * quad)));
      }
    }
    for (int t = 0; t < TILE; ++t) {
      const int64_t at = (row0 + t) * blocks + b;
      const __m512i total = kChains == 2 ? _mm512_add_epi32(sums[t][0], sums[t][kChains - 1]) : sums[t][0];
      const __m512 isum = _mm512_cvtepi32_ps(total);
      acc[t] = _mm512_fmadd_ps(isum, _mm512_mul_ps(dv, _mm512_set1_ps(p.x->scale[at])), acc[t]);
      acc[t] = _mm512_fmadd_ps(mv, _mm512_set1_ps(p.x->scaled_sum[at]), acc[t]);
    }
  }
  for (int t = 0; t < TILE; ++t) {
    alignas(64) float values[kCols];
    _mm512_store_ps(values, acc[t]);
    store_columns(p, row0 + t, g, values);
  }
}

template <int BITS>
__attribute__((target("avx512f,avx512bw,avx512vnni"))) void kernel_vnni(const Problem& p, int64_t group_begin,
                                                                          int64_t group_end) {
  for (int64_t g = group_begin; g < group_end; ++g) {
    int64_t row = 0;
    // A prefill chunk: 8 rows share each loaded and unpacked weight block
    for (; row + 2 * kRowTile <= p.rows; row += 2 * kRowTile) vnni_tile<2 * kRowTile, BITS>(p, g, row);
    for (; row + kRowTile <= p.rows; row += kRowTile) vnni_tile<kRowTile, BITS>(p, g, row);
    switch (p.rows - row) {
      case 3: vnni_tile<3, BITS>(p, g, row); break;
      case 2: vnni_tile<2, BITS>(p, g, row); break;
      case 1: vnni_tile<1, BITS>(p, g, row); break;
      default: break;
    }
  }
}

}  // namespace tricklm_q

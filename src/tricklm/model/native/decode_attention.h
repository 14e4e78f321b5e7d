// Attention over the paged fp16 KV cache, the loops `DecoderStack::attend` runs for one (sequence, KV
// head): a query's dot products with the cached keys and the weighted sum of the values, 8 wide (AVX2) or,
// where the CPU has AVX-512, 16 keys at a time with the rows fetched ahead. Only `decode.cpp` includes it
// (an anonymous namespace, as there).
#pragma once

#include "decode_ops.h"

#include <algorithm>
#include <cstdint>

namespace {

#if defined(TRICKLM_AVX2) && defined(__GNUC__)
// Attention with 16-wide vectors, compiled for AVX-512 whatever the build flags and run only where the
// CPU has it (checked at construction): a score is a 64-wide dot product, and at 16 sequences the
// 8-wide loops spent a fifth of the step there, most of it reducing each product to one number.
#define TRICKLM_AVX512 __attribute__((target("avx512f,avx512dq,avx2,fma,f16c")))

// out[i] = the sum of v[i]'s 16 lanes, for 16 vectors: a transpose-and-add tree, ~3 ops per vector
// instead of a full horizontal reduction each.
TRICKLM_AVX512 inline __m512 sum_lanes16(const __m512* v) {
  __m512 t[8], u[4];
  for (int i = 0; i < 8; ++i) {  // per 128-bit chunk: [a0+a2, b0+b2, a1+a3, b1+b3]
    t[i] = _mm512_add_ps(_mm512_unpacklo_ps(v[2 * i], v[2 * i + 1]), _mm512_unpackhi_ps(v[2 * i], v[2 * i + 1]));
  }
  for (int i = 0; i < 4; ++i) {  // per chunk: that chunk's sums of v[4i] .. v[4i+3]
    u[i] = _mm512_add_ps(_mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(1, 0, 1, 0)),
                         _mm512_shuffle_ps(t[2 * i], t[2 * i + 1], _MM_SHUFFLE(3, 2, 3, 2)));
  }
  // chunk i of the result: the four chunks of u[i] added
  const __m512 x01 = _mm512_add_ps(_mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[0], u[1], _MM_SHUFFLE(3, 2, 3, 2)));
  const __m512 x23 = _mm512_add_ps(_mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(1, 0, 1, 0)),
                                   _mm512_shuffle_f32x4(u[2], u[3], _MM_SHUFFLE(3, 2, 3, 2)));
  return _mm512_add_ps(_mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(2, 0, 2, 0)),
                       _mm512_shuffle_f32x4(x01, x23, _MM_SHUFFLE(3, 1, 3, 1)));
}

inline bool cpu_has_avx512() { return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq"); }
#endif

inline float dot_half(const float* q, const half* k, int64_t d) {
  int64_t i = 0;
  float sum = 0.f;
#ifdef TRICKLM_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= d; i += 8) {
    const __m256 kf = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(k + i)));
    acc = _mm256_fmadd_ps(_mm256_loadu_ps(q + i), kf, acc);
  }
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(acc), _mm256_extractf128_ps(acc, 1));
  s = _mm_hadd_ps(s, s);
  s = _mm_hadd_ps(s, s);
  sum = _mm_cvtss_f32(s);
#endif
  for (; i < d; ++i) sum += q[i] * static_cast<float>(k[i]);
  return sum;
}

inline void axpy_half(float* out, float p, const half* v, int64_t d) {
  int64_t i = 0;
#ifdef TRICKLM_AVX2
  const __m256 pv = _mm256_set1_ps(p);
  for (; i + 8 <= d; i += 8) {
    const __m256 vf = _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(v + i)));
    _mm256_storeu_ps(out + i, _mm256_fmadd_ps(pv, vf, _mm256_loadu_ps(out + i)));
  }
#endif
  for (; i < d; ++i) out[i] += p * static_cast<float>(v[i]);
}

#ifdef TRICKLM_AVX512
constexpr int64_t kMaxChunks = 16;  // head_dim up to 256 in 16-wide vectors

// Attention reads every cached key and value of a step once, 60 MB a 16-sequence step of the default model
// at 160 positions, and in its profile the time sat on those loads: the cache's blocks are scattered, so
// the hardware prefetcher loses the stream every block. Rows are fetched this many positions ahead.
constexpr int64_t kPrefetchAhead = 16;

inline void prefetch_row(const half* row, int64_t d) {
  const char* bytes = reinterpret_cast<const char*>(row);
  for (int64_t off = 0; off < d * static_cast<int64_t>(sizeof(half)); off += 64) _mm_prefetch(bytes + off, _MM_HINT_T0);
}

// ROWS query heads' attention-weighted sums of the values: `weights` [ROWS, n] (row stride n) over the
// values at `slots` -> `dst` [ROWS, d].
template <typename Out, int CHUNKS, int ROWS>
TRICKLM_AVX512 void weigh_values(const float* weights, int64_t n, int64_t d, const half* values,
                                 const int64_t* slots, Out* dst) {
  const int64_t chunks = CHUNKS > 0 ? CHUNKS : d / 16;
  __m512 acc[ROWS][kMaxChunks];
  for (int r = 0; r < ROWS; ++r) {
    for (int64_t c = 0; c < chunks; ++c) acc[r][c] = _mm512_setzero_ps();
  }
  for (int64_t p = 0; p < n; ++p) {
    const half* v = values + slots[p] * d;
    if (p + kPrefetchAhead < n) prefetch_row(values + slots[p + kPrefetchAhead] * d, d);
    __m512 vf[kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) {
      vf[c] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * c)));
    }
    for (int r = 0; r < ROWS; ++r) {
      const __m512 weight = _mm512_set1_ps(weights[r * n + p]);
      for (int64_t c = 0; c < chunks; ++c) acc[r][c] = _mm512_fmadd_ps(weight, vf[c], acc[r][c]);
    }
  }
  for (int r = 0; r < ROWS; ++r) {
    for (int64_t c = 0; c < chunks; ++c) {
      store8(dst + r * d + 16 * c, _mm512_castps512_ps256(acc[r][c]));
      store8(dst + r * d + 16 * c + 8, _mm512_extractf32x8_ps(acc[r][c], 1));
    }
  }
}

// One (sequence, KV head) of attention, as `DecoderStack::attend` does it 8 wide: the group's query
// heads `qg` [group, d] over n cached positions (`slots`) -> `dst` [group, d]. Scores go 16 keys at a
// time through `sum_lanes16`; `scores` holds group x n floats, `partial` group x 256. CHUNKS is d / 16
// where a head size is compiled for (the vectors of a key or value then stay in registers), else 0.
template <typename Out, int CHUNKS>
TRICKLM_AVX512 void attend_group_avx512(const float* qg, int64_t group, int64_t d, const half* keys,
                                        const half* values, const int64_t* slots, int64_t n, float scale,
                                        float softcap, float* scores, float* partial, Out* dst) {
  const int64_t chunks = CHUNKS > 0 ? CHUNKS : d / 16;
  for (int64_t p0 = 0; p0 < n; p0 += 16) {
    const int64_t count = std::min<int64_t>(16, n - p0);
    for (int64_t p = p0 + 16; p < std::min(p0 + 32, n); ++p) prefetch_row(keys + slots[p] * d, d);
    for (int64_t i = 0; i < 16; ++i) {
      if (i >= count) {  // past the last key: zeros, so the tree sums nothing stale
        for (int64_t j = 0; j < group; ++j) _mm512_storeu_ps(partial + (j * 16 + i) * 16, _mm512_setzero_ps());
        continue;
      }
      const half* k = keys + slots[p0 + i] * d;
      __m512 kf[kMaxChunks];
      for (int64_t c = 0; c < chunks; ++c) {
        kf[c] = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(k + 16 * c)));
      }
      for (int64_t j = 0; j < group; ++j) {
        __m512 acc = _mm512_setzero_ps();
        for (int64_t c = 0; c < chunks; ++c) acc = _mm512_fmadd_ps(_mm512_loadu_ps(qg + j * d + 16 * c), kf[c], acc);
        _mm512_storeu_ps(partial + (j * 16 + i) * 16, acc);
      }
    }
    const auto valid = static_cast<__mmask16>((1u << count) - 1);
    for (int64_t j = 0; j < group; ++j) {
      __m512 lanes[16];
      for (int i = 0; i < 16; ++i) lanes[i] = _mm512_loadu_ps(partial + (j * 16 + i) * 16);
      _mm512_mask_storeu_ps(scores + j * n + p0, valid, _mm512_mul_ps(sum_lanes16(lanes), _mm512_set1_ps(scale)));
    }
  }
  for (int64_t j = 0; j < group; ++j) cap_and_softmax_(scores + j * n, n, softcap);
  // Weighted values: each value vector is loaded and widened once for as many query heads as registers
  // allow (at most 16 accumulators), not once per head.
  int64_t j = 0;
  if constexpr (CHUNKS > 0 && CHUNKS <= 4) {
    for (; j + 4 <= group; j += 4) weigh_values<Out, CHUNKS, 4>(scores + j * n, n, d, values, slots, dst + j * d);
    if (group - j == 3) {
      weigh_values<Out, CHUNKS, 3>(scores + j * n, n, d, values, slots, dst + j * d);
      return;
    }
  }
  if constexpr (CHUNKS > 0 && CHUNKS <= 8) {
    for (; j + 2 <= group; j += 2) weigh_values<Out, CHUNKS, 2>(scores + j * n, n, d, values, slots, dst + j * d);
  }
  for (; j < group; ++j) weigh_values<Out, CHUNKS, 1>(scores + j * n, n, d, values, slots, dst + j * d);
}
#endif

}  // namespace

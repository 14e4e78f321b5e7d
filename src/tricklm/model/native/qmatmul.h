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
// is made at run time, and where the CPU has AMX, chunks of many rows take bfloat16 tiles instead (below).

#pragma once

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cmath>
#include <functional>
#include <cstdint>
#include <cctype>
#include <cstdlib>
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

using Kernel = void (*)(const Problem&, int64_t, int64_t);

// TRICKLM_ISA forces a path below the best this CPU has ("avx2", "scalar", ...), so that one machine runs
// and measures the paths of the CPUs it is not; unset or "auto", the best. It is read at every call (a
// test switches it), and a value this CPU cannot run falls back to the best here: Python refuses it at
// start-up with a message (`tricklm.model.native.isa`).
inline int isa_rank(const std::string& isa) {
  if (isa == "scalar") return 0;
  if (isa == "avx2") return 1;
  if (isa == "avx512vnni") return 2;
  if (isa == "amx") return 3;
  return -1;
}

inline std::string forced_isa() {
  const char* env = std::getenv("TRICKLM_ISA");
  std::string value;
  for (const char* c = env == nullptr ? "" : env; *c != '\0'; ++c) {
    if (*c != ' ' && *c != '\t') value += static_cast<char>(std::tolower(static_cast<unsigned char>(*c)));
  }
  return value.empty() ? std::string("auto") : value;  // as `isa.forced` reads it: trimmed, lower-case
}

// Whether TRICKLM_ISA leaves paths of this rank (or above) to run, where the CPU has them.
inline bool isa_allows(int rank) {
  const int forced = isa_rank(forced_isa());
  return forced < 0 || forced >= rank;
}

// The best int8 kernel this CPU has, whatever TRICKLM_ISA says.
inline std::string cpu_isa() {
  if (__builtin_cpu_supports("avx512vnni") && __builtin_cpu_supports("avx512bw") &&
      __builtin_cpu_supports("f16c")) {
    return "avx512vnni";
  }
  if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c")) {
    return "avx2";
  }
  return "scalar";
}

// The int8 kernel that runs: the CPU's best, or the one TRICKLM_ISA forces below it.
inline std::string isa_name() {
  const std::string best = cpu_isa(), forced = forced_isa();
  const int rank = isa_rank(forced);
  return rank >= 0 && rank < isa_rank(best) ? forced : best;
}

inline Kernel pick(const std::string& isa, int64_t bits) {
  if (isa == "avx512vnni") return bits == 4 ? kernel_vnni<4> : kernel_vnni<8>;
  if (isa == "avx2") return bits == 4 ? kernel_avx2<4> : kernel_avx2<8>;
  return kernel_scalar;
}

// The block weight of an [n, k] matrix, as `Problem` reads it.
inline void check_weight(const torch::Tensor& levels, const torch::Tensor& d, const torch::Tensor& m, int64_t n,
                         int64_t k) {
  const int64_t groups = (n + kCols - 1) / kCols, blocks = k / kBlock;
  TORCH_CHECK(k % kBlock == 0 && k > 0 && n > 0, "k must be a positive multiple of 32, n positive");
  const int64_t bits = levels.dim() == 4 ? levels.size(2) : 0;
  TORCH_CHECK(levels.scalar_type() == torch::kUInt8 && levels.is_contiguous() && (bits == 4 || bits == 8) &&
                  levels.sizes() == torch::IntArrayRef({groups, blocks, bits, kLine}),
              "levels must be contiguous uint8 [ceil(n / 16), k / 32, 4 or 8 (bits), 64]");
  for (const auto* t : {&d, &m}) {
    TORCH_CHECK(t->scalar_type() == torch::kFloat16 && t->is_contiguous() &&
                    t->sizes() == torch::IntArrayRef({groups, blocks, kCols}),
                "scales and minimums must be contiguous float16 [ceil(n / 16), k / 32, 16]");
  }
}

inline void check_inputs(const torch::Tensor& x, const torch::Tensor& levels, const torch::Tensor& d,
                         const torch::Tensor& m, int64_t n) {
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == torch::kFloat32 && x.is_contiguous(),
              "x must be a contiguous float32 [rows, k] tensor");
  check_weight(levels, d, m, n, x.size(1));
}

// Rows `ids` [r] of the block weight [n, k] as float32 [r, k] (d * level + m, exactly as the torch path
// computes it): an embedding lookup, one call where unpacking the rows with torch ops took ten, each
// with its dispatch, a twentieth of a one-sequence decode step.
inline torch::Tensor weight_rows(const torch::Tensor& ids, const torch::Tensor& levels, const torch::Tensor& d,
                                 const torch::Tensor& m, int64_t n) {
  TORCH_CHECK(ids.dim() == 1 && ids.scalar_type() == torch::kLong, "ids must be a 1-D int64 tensor");
  TORCH_CHECK(levels.dim() == 4, "levels must be [groups, blocks, bits, 64]");
  const int64_t k = levels.size(1) * kBlock;
  check_weight(levels, d, m, n, k);
  const torch::Tensor wanted = ids.contiguous();
  const int64_t rows = wanted.size(0), blocks = k / kBlock, bits = levels.size(2);
  const int64_t* ip = wanted.data_ptr<int64_t>();
  for (int64_t r = 0; r < rows; ++r) TORCH_CHECK(ip[r] >= 0 && ip[r] < n, "row ", ip[r], " out of range [0, ", n, ")");
  auto out = torch::empty({rows, k}, torch::kFloat32);
  float* op = out.data_ptr<float>();
  const uint8_t* ls = levels.data_ptr<uint8_t>();
  const at::Half* ds = d.data_ptr<at::Half>();
  const at::Half* ms = m.data_ptr<at::Half>();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t g = ip[r] / kCols, c = ip[r] % kCols;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* w = ls + (g * blocks + b) * bits * kLine;
      const int64_t at = (g * blocks + b) * kCols + c;
      const float scale = static_cast<float>(ds[at]), offset = static_cast<float>(ms[at]);
      for (int64_t j = 0; j < kBlock; ++j) {
        // the product in double is exact, so rounding it to float gives torch's float product, and
        // nothing can fuse it with the add (an FMA would round differently)
        const auto product = static_cast<float>(static_cast<double>(scale) * level_at(w, bits, c, j));
        op[r * k + b * kBlock + j] = product + offset;
      }
    }
  }
  return out;
}

// The `top` largest entries of each row of `out` (= x times the block weight, from an int8 kernel)
// recomputed with float32 activations, in place: an output head's candidates for the next token get
// exact logits for a few thousand multiply-adds a row, where a second int8 pass over the whole
// vocabulary (the earlier way) doubled the head's cost. The rest of the row keeps int8's rounding.
inline void refine_top(const torch::Tensor& x, torch::Tensor& out, const torch::Tensor& levels, const torch::Tensor& d,
                       const torch::Tensor& m, int64_t top) {
  const int64_t n = out.size(-1);
  check_inputs(x, levels, d, m, n);
  TORCH_CHECK(out.dim() == 2 && out.scalar_type() == torch::kFloat32 && out.is_contiguous() &&
                  out.size(0) == x.size(0),
              "out must be a contiguous float32 [rows, n] tensor");
  TORCH_CHECK(top >= 0, "top must not be negative");
  top = std::min(top, n);
  const int64_t k = x.size(1), blocks = k / kBlock, bits = levels.size(2);
  const float* xs = x.data_ptr<float>();
  float* os = out.data_ptr<float>();
  const uint8_t* ls = levels.data_ptr<uint8_t>();
  const at::Half* ds = d.data_ptr<at::Half>();
  const at::Half* ms = m.data_ptr<at::Half>();
  at::parallel_for(0, out.size(0), 1, [&](int64_t r0, int64_t r1) {
    using Entry = std::pair<float, int64_t>;
    std::vector<Entry> heap;  // a min-heap of the row's largest `top` so far
    std::vector<float> xsums(blocks);
    for (int64_t r = r0; r < r1; ++r) {
      float* row = os + r * n;
      const float* xr = xs + r * k;
      heap.clear();
      for (int64_t c = 0; c < n; ++c) {
        if (static_cast<int64_t>(heap.size()) < top) {
          heap.emplace_back(row[c], c);
          std::push_heap(heap.begin(), heap.end(), std::greater<Entry>());
        } else if (top > 0 && row[c] > heap.front().first) {
          std::pop_heap(heap.begin(), heap.end(), std::greater<Entry>());
          heap.back() = Entry(row[c], c);
          std::push_heap(heap.begin(), heap.end(), std::greater<Entry>());
        }
      }
      for (int64_t b = 0; b < blocks; ++b) {
        xsums[b] = 0.0f;
        for (int64_t j = 0; j < kBlock; ++j) xsums[b] += xr[b * kBlock + j];
      }
      for (const Entry& e : heap) {
        const int64_t g = e.second / kCols, c = e.second % kCols;
        float sum = 0.0f;
        for (int64_t b = 0; b < blocks; ++b) {
          // line p holds elements 4 p + i (8-bit), or 4 p + i and 4 p + 16 + i in its nibbles (4-bit)
          const uint8_t* w = ls + (g * blocks + b) * bits * kLine + c * 4;
          const float* xb = xr + b * kBlock;
          float dot = 0.0f;
          for (int64_t p = 0; p < (bits == 8 ? 8 : 4); ++p) {
            for (int64_t i = 0; i < 4; ++i) {
              const uint8_t level = w[p * kLine + i];
              if (bits == 8) {
                dot += static_cast<float>(level) * xb[4 * p + i];
              } else {
                dot += static_cast<float>(level & 0x0F) * xb[4 * p + i] + static_cast<float>(level >> 4) * xb[4 * p + 16 + i];
              }
            }
          }
          const int64_t at = (g * blocks + b) * kCols + c;
          sum += static_cast<float>(ds[at]) * dot + static_cast<float>(ms[at]) * xsums[b];
        }
        row[e.second] = sum;
      }
    }
  });
}

// --- Prefill chunks on AMX: the weights widened to bfloat16 a few columns at a time ---
//
// Where the CPU has AMX (Xeons from Sapphire Rapids on), its bfloat16 tiles multiply about 4x as fast as
// the int8 VNNI kernel above at its peak, and a chunk of many rows runs faster end to end, widening
// included (benchmarks/README.md). So a chunk
// of many rows widens each 64-column slice of the block weight to bfloat16 (d * level + m, rounded to
// nearest even) in a scratch of the thread's own and multiplies it with oneDNN's batch-reduce GEMM, which
// torch exports and which runs on AMX tiles. The scratch (64 columns x k) stays in the core's cache and is
// the only copy: the weights in memory stay the compact blocks, as llama.cpp's GPU back-ends widen
// quantized weights per call for large batches.
// Widening costs a pass over k x n per call whatever the rows, so a few rows stay on the int8 kernel.
// Activations go in as bfloat16 (about as precise as int8 per block of 32), outputs come out float32.

constexpr int64_t kAmxCols = 64;     // columns widened at once: 4 groups
constexpr int64_t kAmxRows = 64;     // activation rows per GEMM call
constexpr int64_t kAmxMinRows = 32;  // fewer rows run on the int8 kernel: the crossover on the 135M model's shapes

// AMX tiles and bfloat16 products exist (CPUID) and the OS saves tile state (XCR0); oneDNN asks Linux for
// the permission itself.
inline bool cpu_has_amx() {
  static const bool usable = [] {
    unsigned a = 0, b = 0, c = 0, d = 0;
    if (__get_cpuid_max(0, nullptr) < 7) return false;
    __cpuid(1, a, b, c, d);
    if (!((c >> 27) & 1)) return false;  // no OSXSAVE: xgetbv would fault
    __cpuid_count(7, 0, a, b, c, d);
    if (!(((d >> 24) & 1) && ((d >> 22) & 1) && ((b >> 30) & 1))) return false;  // AMX-TILE, AMX-BF16, AVX512BW
    __cpuid_count(7, 1, a, b, c, d);
    if (!((a >> 5) & 1)) return false;  // AVX512-BF16 (the widening's rounding)
    unsigned lo = 0, hi = 0;
    __asm__("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    return ((lo >> 17) & 3) == 3;  // XTILECFG and XTILEDATA
  }();
  return usable;
}

// AMX where the CPU has it and TRICKLM_ISA does not force a path below it.
inline bool amx_usable() { return isa_allows(isa_rank("amx")) && cpu_has_amx(); }

// The kernel for a step of `rows` rows: AMX for chunks of many rows where the CPU has it, else the best int8
// kernel, as TRICKLM_ISA allows; one read of the variable (a decode step makes a call per projection).
inline std::string auto_isa(int64_t rows) {
  const std::string forced = forced_isa(), best = cpu_isa();
  const int rank = isa_rank(forced);
  if (rows >= kAmxMinRows && (rank < 0 || rank >= isa_rank("amx")) && cpu_has_amx()) return "amx";
  return rank >= 0 && rank < isa_rank(best) ? forced : best;
}

#define TRICKLM_AMX_TARGET __attribute__((target("avx512f,avx512bw,avx512bf16,f16c")))

// Four elements (4 j + i, i < 4) of 16 columns whose levels are bytes i of `quads`' dwords, widened into
// rows 2 j and 2 j + 1 of the VNNI scratch [k / 2][ld][2] at column `col` (vcvtne2ps2bf16 rounds to
// nearest even, as torch does; a word permutation interleaves each pair).
TRICKLM_AMX_TARGET inline void widen_quads(__m512i quads, __m512 d, __m512 m, uint32_t* scratch, int64_t ld,
                                           int64_t j, int64_t col) {
  const __m512i byte = _mm512_set1_epi32(0xFF);
  // word 2 c <- word c (the first element's column c), word 2 c + 1 <- word 16 + c (the second's)
  const __m512i pairs = _mm512_set_epi16(31, 15, 30, 14, 29, 13, 28, 12, 27, 11, 26, 10, 25, 9, 24, 8, 23, 7, 22, 6,
                                         21, 5, 20, 4, 19, 3, 18, 2, 17, 1, 16, 0);
  __m512 e[4];
  for (int i = 0; i < 4; ++i) {
    const __m512i level = _mm512_and_si512(_mm512_srli_epi32(quads, 8 * i), byte);
    e[i] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(level), d, m);
  }
  for (int half = 0; half < 2; ++half) {
    const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(e[2 * half + 1], e[2 * half]);
    _mm512_storeu_si512(scratch + (2 * j + half) * ld + col, _mm512_permutexvar_epi16(pairs, both));
  }
}

// Groups [g0, g1) of the block weight as bfloat16 in brgemm's VNNI layout: element kk of column c at
// scratch[kk / 2][c][kk % 2] (one uint32_t holds a pair), ld = 16 (g1 - g0) columns.
TRICKLM_AMX_TARGET inline void widen_groups(const Problem& p, int64_t g0, int64_t g1, uint32_t* scratch) {
  const int64_t blocks = p.k / kBlock, ld = (g1 - g0) * kCols;
  const __m512i nibble = _mm512_set1_epi8(0x0F);
  for (int64_t g = g0; g < g1; ++g) {
    const int64_t col = (g - g0) * kCols;
    for (int64_t b = 0; b < blocks; ++b) {
      const uint8_t* w = p.levels + (g * blocks + b) * p.block_bytes();
      const __m512 d = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.d + (g * blocks + b) * kCols)));
      const __m512 m = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p.m + (g * blocks + b) * kCols)));
      const int64_t quad0 = b * (kBlock / 4);  // the block's first group of 4 elements
      for (int64_t line = 0; line < p.bits; ++line) {
        const __m512i v = _mm512_loadu_si512(w + line * kLine);
        if (p.bits == 8) {
          widen_quads(v, d, m, scratch, ld, quad0 + line, col);
        } else {  // low nibbles: elements 4 line + i; high: 4 (line + 4) + i
          widen_quads(_mm512_and_si512(v, nibble), d, m, scratch, ld, quad0 + line, col);
          widen_quads(_mm512_and_si512(_mm512_srli_epi32(v, 4), nibble), d, m, scratch, ld, quad0 + line + 4, col);
        }
      }
    }
  }
}

// out [rows, n] = x [rows, k] (bfloat16) times the block weight, on AMX tiles.
inline void matmul_amx(const Problem& p, const at::BFloat16* x) {
  const int64_t groups = (p.n + kCols - 1) / kCols, per_slice = kAmxCols / kCols;
  // each thread an even share of the groups (a slice each would leave one idle for a ninth of a 576-column call)
  const int64_t share = (groups + at::get_num_threads() - 1) / at::get_num_threads();
  at::parallel_for(0, groups, share, [&](int64_t begin, int64_t end) {
    std::vector<uint32_t> scratch(p.k / 2 * kAmxCols);
    for (int64_t g0 = begin; g0 < end; g0 += per_slice) {
      const int64_t g1 = std::min(end, g0 + per_slice);
      const int64_t first = g0 * kCols, ld = (g1 - g0) * kCols, cols = std::min(ld, p.n - first);
      widen_groups(p, g0, g1, scratch.data());
      const auto* weights = reinterpret_cast<const at::BFloat16*>(scratch.data());
      for (int64_t row = 0; row < p.rows; row += kAmxRows) {
        at::native::cpublas::brgemm(std::min(kAmxRows, p.rows - row), cols, p.k, p.k, ld, p.n, false,
                                    x + row * p.k, weights, p.out + row * p.n + first, true);
      }
    }
    at::native::cpublas::brgemm_release(true);
  });
}

// out [rows, n] float32 = x [rows, k] float32 times the repacked weight [n, k]; `isa` "" picks the best.
// `scratch` holds the quantized activations (the decode step passes one for all its projections).
inline void qmatmul_into(const torch::Tensor& x, const torch::Tensor& levels, const torch::Tensor& d,
                         const torch::Tensor& m, int64_t n, const std::string& isa, torch::Tensor& out,
                         QuantizedRows& scratch) {
  check_inputs(x, levels, d, m, n);
  const int64_t rows = x.size(0), k = x.size(1);
  TORCH_CHECK(out.scalar_type() == torch::kFloat32 && out.is_contiguous() &&
                  out.sizes() == torch::IntArrayRef({rows, n}),
              "out must be a contiguous float32 [rows, n] tensor");
  // "" the best for these rows; "int8" the best int8 kernel whatever the rows (tests, benchmarks)
  std::string chosen = isa;
  if (isa.empty()) chosen = auto_isa(rows);
  if (isa == "int8") chosen = isa_name();
  TORCH_CHECK(chosen == "scalar" || chosen == "avx2" || chosen == "avx512vnni" || chosen == "amx", "unknown isa ",
              chosen);
  // a kernel asked for by name runs wherever the CPU has it, whatever TRICKLM_ISA says (tests compare them)
  TORCH_CHECK(chosen == "amx" ? cpu_has_amx() : isa_rank(chosen) <= isa_rank(cpu_isa()), "this CPU cannot run the ",
              chosen, " kernel");
  if (rows == 0) return;
  Problem problem{nullptr, levels.data_ptr<uint8_t>(), d.data_ptr<at::Half>(), m.data_ptr<at::Half>(),
                  out.data_ptr<float>(), rows, n, k, levels.size(2)};
  if (chosen == "amx") {
    const torch::Tensor wide = x.to(torch::kBFloat16);
    matmul_amx(problem, reinterpret_cast<const at::BFloat16*>(wide.data_ptr()));
    return;
  }
  quantize_rows(x.data_ptr<float>(), rows, k, chosen == "avx512vnni", scratch);
  problem.x = &scratch;
  const Kernel kernel = pick(chosen, problem.bits);
  at::parallel_for(0, levels.size(0), 1, [&](int64_t begin, int64_t end) { kernel(problem, begin, end); });
}

inline torch::Tensor qmatmul(const torch::Tensor& x, const torch::Tensor& levels, const torch::Tensor& d,
                             const torch::Tensor& m, int64_t n, const std::string& isa) {
  TORCH_CHECK(x.dim() == 2, "x must be a contiguous float32 [rows, k] tensor");
  auto out = torch::empty({x.size(0), n}, x.options());
  QuantizedRows scratch;
  qmatmul_into(x, levels, d, m, n, isa, out, scratch);
  return out;
}

}  // namespace tricklm_q


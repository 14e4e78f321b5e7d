// Decode steps of a Llama-family decoder stack with compact projections, in C++: torch's 4-bit kernel
// (--quantization int4), or the one-copy 4- and 8-bit blocks of `qmatmul.h` (gguf, q4_1, q8_0, ...).
// The family's variants are options of the stack or of a layer: Qwen3's and Gemma 3's per-head q/k norms,
// Gemma's norms around the attention and MLP outputs, GeGLU, a window and RoPE table per layer, a query
// scale, attention soft-capping (Gemma 2), partial rotary (Phi-3). What is not here runs in Python
// (`missing_operations` in __init__.py names it).
//
// A decode step does little arithmetic per op. At one row the Python path spent more time dispatching
// ~45 small torch ops per layer than computing them. Here the projections still go through torch's
// 4-bit kernel, and everything between them (norms, RoPE, the cache write, attention, SiLU, residuals)
// is one plain loop each, reading and writing the dtypes the kernel wants (bfloat16 in, bfloat16 out)
// so no conversion op runs on its own. The numerics follow the Python path: float32 activations, an
// fp16 KV cache, bfloat16 only at the projections' inputs and outputs.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "qmatmul.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define TRICKLM_AVX2 1
#endif

namespace {

using bf16 = c10::BFloat16;
using half = c10::Half;

constexpr int64_t kGroup = 32;  // weights per scale in torch's CPU 4-bit layout

// Attention work items (sequence x KV head) below this run on the calling thread, unless a context is at
// least kLongContext positions long: then even one sequence's few KV heads are worth sharing out (one
// sequence of a model with 3 KV heads at 2,000 positions spent most of its step in one thread's attention).
constexpr int64_t kAttentionGrain = 4;
constexpr int64_t kLongContext = 256;

#ifdef TRICKLM_AVX2
// exp of 8 floats: the Cephes polynomial after reduction by ln 2, relative error ~1e-7. Inputs are
// clamped so that 2^n stays a normal float: below -87 the result is ~1e-38 instead of smaller. The
// constant goes first: max/min return their second operand when one is NaN, so NaN passes through.
inline __m256 exp8(__m256 x) {
  x = _mm256_min_ps(_mm256_set1_ps(88.0f), _mm256_max_ps(_mm256_set1_ps(-87.0f), x));
  const __m256 n = _mm256_round_ps(_mm256_mul_ps(x, _mm256_set1_ps(1.44269504088896341f)),
                                   _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(0.693359375f), x);
  x = _mm256_fnmadd_ps(n, _mm256_set1_ps(-2.12194440e-4f), x);
  __m256 y = _mm256_set1_ps(1.9875691500e-4f);
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.3981999507e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(8.3334519073e-3f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(4.1665795894e-2f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(1.6666665459e-1f));
  y = _mm256_fmadd_ps(y, x, _mm256_set1_ps(5.0000001201e-1f));
  y = _mm256_fmadd_ps(y, _mm256_mul_ps(x, x), _mm256_add_ps(x, _mm256_set1_ps(1.0f)));
  const __m256i pow2 = _mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23);
  return _mm256_mul_ps(y, _mm256_castsi256_ps(pow2));
}

inline __m256 load8(const bf16* p) {
  const __m128i v = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(v), 16));
}

// Rounds to nearest even, as torch's float -> bfloat16 conversion does (NaN stays NaN).
inline void store8(bf16* p, __m256 v) {
  const __m256i bits = _mm256_castps_si256(v);
  const __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(lsb, _mm256_set1_epi32(0x7FFF))), 16);
  const __m256 nan = _mm256_cmp_ps(v, v, _CMP_UNORD_Q);
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), _mm256_castps_si256(nan));
  const __m128i packed = _mm_packus_epi32(_mm256_castsi256_si128(r), _mm256_extracti128_si256(r, 1));
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), packed);
}

// The one-copy block kernels take and give float32 (they round their inputs to int8 themselves).
inline void store8(float* p, __m256 v) { _mm256_storeu_ps(p, v); }
inline __m256 load8(const float* p) { return _mm256_loadu_ps(p); }
#endif

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

// s[i] = exp(s[i] - max) / sum: one softmax over n scores, in place.
void softmax_(float* s, int64_t n) {
  const float mx = *std::max_element(s, s + n);
  float sum = 0.f;
  int64_t i = 0;
#ifdef TRICKLM_AVX2
  __m256 acc = _mm256_setzero_ps();
  for (; i + 8 <= n; i += 8) {
    const __m256 e = exp8(_mm256_sub_ps(_mm256_loadu_ps(s + i), _mm256_set1_ps(mx)));
    _mm256_storeu_ps(s + i, e);
    acc = _mm256_add_ps(acc, e);
  }
  alignas(32) float lanes[8];
  _mm256_store_ps(lanes, acc);
  for (float lane : lanes) sum += lane;
#endif
  for (; i < n; ++i) sum += (s[i] = std::exp(s[i] - mx));
  const float inv = 1.f / sum;
  for (int64_t j = 0; j < n; ++j) s[j] *= inv;
}

// Gemma 2's soft-capped scores (softcap * tanh(score / softcap); 0 for none), then the softmax.
void cap_and_softmax_(float* s, int64_t n, float softcap) {
  if (softcap > 0.f) {
    for (int64_t i = 0; i < n; ++i) s[i] = softcap * std::tanh(s[i] / softcap);
  }
  softmax_(s, n);
}

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

// Rows of a step below this run the loops between the projections on the calling thread; a prefill chunk's
// hundreds of rows are shared out (else the other threads waited through them, a fifth of a prefill step).
constexpr int64_t kRowGrain = 32;

// f(r) for every row r < rows, on the intra-op threads where there are enough rows.
template <typename F>
void for_rows(int64_t rows, const F& f) {
  at::parallel_for(0, rows, kRowGrain, [&](int64_t begin, int64_t end) {
    for (int64_t r = begin; r < end; ++r) f(r);
  });
}

// out = rms_norm(x) * w, row by row, in the dtype the next projection reads (Out: bf16 or float).
template <typename Out>
void rms_norm_to(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out) {
  const int64_t rows = x.size(0), h = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  Out* op = out.data_ptr<Out>();
  for_rows(rows, [&](int64_t r) {
    const float* xr = xp + r * h;
    Out* o = op + r * h;
    float ss = 0.f;
    for (int64_t i = 0; i < h; ++i) ss += xr[i] * xr[i];
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
    int64_t i = 0;
#ifdef TRICKLM_AVX2
    const __m256 scale = _mm256_set1_ps(inv);
    for (; i + 8 <= h; i += 8) {
      store8(o + i, _mm256_mul_ps(_mm256_mul_ps(_mm256_loadu_ps(xr + i), scale), _mm256_loadu_ps(wp + i)));
    }
#endif
    for (; i < h; ++i) o[i] = Out(xr[i] * inv * wp[i]);
  });
}

// x = rms_norm(x) * w over one head of d values, in place (Qwen3's per-head q/k norms).
inline void rms_norm_head_(float* x, const float* w, int64_t d, float eps) {
  float ss = 0.f;
  for (int64_t i = 0; i < d; ++i) ss += x[i] * x[i];
  const float inv = 1.f / std::sqrt(ss / static_cast<float>(d) + eps);
  for (int64_t i = 0; i < d; ++i) x[i] = x[i] * inv * w[i];
}

// x += float(y): a projection's output (bfloat16 or float32) added to the float32 residual stream.
template <typename T>
void add_(at::Tensor& x, const at::Tensor& y) {
  const int64_t h = x.size(1);
  for_rows(x.size(0), [&, xp = x.data_ptr<float>(), yp = y.data_ptr<T>()](int64_t r) {
    float* xr = xp + r * h;
    const T* yr = yp + r * h;
    int64_t i = 0;
#ifdef TRICKLM_AVX2
    for (; i + 8 <= h; i += 8) _mm256_storeu_ps(xr + i, _mm256_add_ps(_mm256_loadu_ps(xr + i), load8(yr + i)));
#endif
    for (; i < h; ++i) xr[i] += static_cast<float>(yr[i]);
  });
}

// x += rms_norm(y) * w, row by row: a projection's output normed before the residual (Gemma's
// post-attention and post-feedforward norms).
template <typename T>
void add_normed_(at::Tensor& x, const at::Tensor& y, const at::Tensor& w, double eps) {
  const int64_t rows = x.size(0), h = x.size(1);
  float* xp = x.data_ptr<float>();
  const T* yp = y.data_ptr<T>();
  const float* wp = w.data_ptr<float>();
  for_rows(rows, [&](int64_t r) {
    const T* yr = yp + r * h;
    float* xr = xp + r * h;
    float ss = 0.f;
    for (int64_t i = 0; i < h; ++i) ss += static_cast<float>(yr[i]) * static_cast<float>(yr[i]);
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(h) + static_cast<float>(eps));
    for (int64_t i = 0; i < h; ++i) xr[i] += static_cast<float>(yr[i]) * inv * wp[i];
  });
}

// The MLP's gate activation: SiLU (Llama, Qwen, Phi) or GELU with the tanh approximation (Gemma's GeGLU).
enum class Gate { kSilu, kGeluTanh };

// Both are a / (1 + exp(-k(a))): SiLU with k(a) = a, and tanh-GELU with k(a) = 2 sqrt(2 / pi) (a + 0.044715 a^3),
// since 0.5 (1 + tanh(u)) = sigmoid(2u).
constexpr float kGeluC = 1.5957691216057308f;  // 2 sqrt(2 / pi)
constexpr float kGeluA = 0.044715f;

#ifdef TRICKLM_AVX2
inline __m256 gate8(__m256 a, Gate gate) {
  __m256 k = a;
  if (gate == Gate::kGeluTanh) {
    const __m256 a3 = _mm256_mul_ps(_mm256_mul_ps(a, a), a);
    k = _mm256_mul_ps(_mm256_set1_ps(kGeluC), _mm256_fmadd_ps(_mm256_set1_ps(kGeluA), a3, a));
  }
  return _mm256_div_ps(a, _mm256_add_ps(_mm256_set1_ps(1.f), exp8(_mm256_sub_ps(_mm256_setzero_ps(), k))));
}
#endif

inline float gate1(float a, Gate gate) {
  const float k = gate == Gate::kGeluTanh ? kGeluC * (a + kGeluA * a * a * a) : a;
  return a / (1.f + std::exp(-k));
}

// out = act(gate) * up, from the fused gate/up projection's output, all in T (bf16 or float).
template <typename T>
void gated_to(const at::Tensor& gate_up, int64_t inter, Gate gate, at::Tensor& out) {
  const int64_t rows = gate_up.size(0);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for_rows(rows, [&](int64_t r) {
    const T* g = gp + r * 2 * inter;
    T* o = op + r * inter;
    int64_t i = 0;
#ifdef TRICKLM_AVX2
    for (; i + 8 <= inter; i += 8) store8(o + i, _mm256_mul_ps(gate8(load8(g + i), gate), load8(g + inter + i)));
#endif
    for (; i < inter; ++i) o[i] = T(gate1(static_cast<float>(g[i]), gate) * static_cast<float>(g[inter + i]));
  });
}

// Torch's 4-bit kernel takes and gives bfloat16; the block one float32 (it rounds its input to int8
// itself, and a bfloat16 rounding before or after it doubled the difference from the Python path).
struct Projection {
  at::Tensor packed, scales_and_zeros;  // torch's layout
  at::Tensor levels, d, m;              // or blocks (qmatmul.h), `n` outputs
  int64_t n = 0;

  // x times the weight. The block kernel writes into `out`, a [rows, n] float32 view of a buffer the step
  // reuses for every layer (a fresh tensor per projection cost a page fault per 4 KiB of it when malloc
  // handed the large ones back to the kernel between layers); torch's kernel makes its own.
  const at::Tensor& operator()(const at::Tensor& x, at::Tensor& out, tricklm_q::QuantizedRows& scratch) const {
    if (levels.defined()) {
      tricklm_q::qmatmul_into(x, levels, d, m, n, "", out, scratch);
    } else {
      out = at::_weight_int4pack_mm_for_cpu(x, packed, kGroup, scales_and_zeros);
    }
    return out;
  }
};

// A step runs through each layer in pieces of rows whose widest buffer (the gate/up output) stays within
// this, so a prefill chunk's buffers are sized by the piece, not by the chunk (a 1.7B-shape model runs a
// 256-row chunk in 32-row pieces). A row needs only its own values and earlier rows' K/V. Prefill time did
// not change against larger pieces, for the 1.7B shape or the 135M model, in alternating
// `benchmarks/engine_steps.py` runs (the figures: benchmarks/README.md).
constexpr int64_t kPieceBytes = 2 << 20;

// What one piece's projections write into: `wide` the qkv and gate/up outputs (one after the other, so one
// buffer of the larger), `narrow` the o and down outputs, and the quantized activations of each input.
struct StepBuffers {
  at::Tensor wide_storage, narrow_storage;
  tricklm_q::QuantizedRows scratch;

  at::Tensor wide(int64_t rows, int64_t n) const {
    if (!wide_storage.defined()) return at::Tensor();
    return wide_storage.narrow(0, 0, rows * n).view({rows, n});
  }

  at::Tensor narrow(int64_t rows) const {
    return narrow_storage.defined() ? narrow_storage.narrow(0, 0, rows) : at::Tensor();
  }
};

// Every norm but `input` and `mlp` may be undefined (the layer has none there).
struct Norms {
  at::Tensor input, mlp;          // before the attention and before the MLP
  at::Tensor q, k;                // per head, before the rotation: both [head_dim], or neither
  at::Tensor attn_out, mlp_out;   // on the attention's and the MLP's outputs, before each residual (Gemma)
};

struct Layer {
  Norms norms;
  at::Tensor kv_cache, qkv_bias;  // qkv_bias may be undefined
  int64_t window;                 // positions attended, counting the new one; -1: the whole context
  bool local_rope;                // rotated by the step's second table (Gemma 3's sliding layers)
  Projection qkv, o, gate_up, down;
};

struct Step {
  const float* cos;  // [B, rotary_dim], sin with its first half negated (see RotaryEmbedding)
  const float* sin;
  const float* cos_local;  // the same for layers with `local_rope` (null when none has it)
  const float* sin_local;
  const int64_t* slots;   // [B] where each row's new K/V go
  const int64_t* tables;  // [B, blocks_per_row] block tables
  int64_t blocks_per_row;
  const int64_t* lens;  // [B] context length including the new token
  int64_t max_len;

  // The rows from `row` on (rotary_dim: the width of a cos/sin row)
  Step from_row(int64_t row, int64_t rotary_dim) const {
    Step s = *this;
    s.cos += row * rotary_dim;
    s.sin += row * rotary_dim;
    if (s.cos_local != nullptr) {
      s.cos_local += row * rotary_dim;
      s.sin_local += row * rotary_dim;
    }
    s.slots += row;
    s.tables += row * blocks_per_row;
    s.lens += row;
    return s;
  }
};

class DecoderStack {
 public:
  // rotary_dim: the leading dimensions of each head that are rotated; attention_scale: on q.k;
  // attn_softcap: 0 for none; gate: "silu" or "gelu_tanh".
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t rotary_dim, int64_t intermediate,
               double eps, int64_t block_size, double attention_scale, double attn_softcap, const std::string& gate,
               at::Tensor final_norm)
      : hq_(num_heads),
        hkv_(num_kv_heads),
        d_(head_dim),
        rot_(rotary_dim),
        inter_(intermediate),
        eps_(eps),
        block_size_(block_size),
        scale_(static_cast<float>(attention_scale)),
        softcap_(static_cast<float>(attn_softcap)),
        gate_(gate == "gelu_tanh" ? Gate::kGeluTanh : Gate::kSilu),
        final_norm_(std::move(final_norm)) {
#ifdef TRICKLM_AVX512
    // TRICKLM_ISA=avx2 or scalar keeps the 8-wide loops, as a CPU without AVX-512 runs them
    avx512_ = cpu_has_avx512() && tricklm_q::isa_allows(tricklm_q::isa_rank("avx512vnni")) && head_dim % 16 == 0 &&
              head_dim <= 16 * kMaxChunks;
#endif
    TORCH_CHECK(hq_ > 0 && hkv_ > 0 && d_ > 0 && inter_ > 0 && block_size_ > 0, "sizes must be positive");
    TORCH_CHECK(hq_ % hkv_ == 0, "query heads must be a multiple of KV heads");
    TORCH_CHECK(rot_ > 0 && rot_ <= d_ && rot_ % 2 == 0, "rotary_dim must be even and at most head_dim");
    TORCH_CHECK(scale_ > 0.f && softcap_ >= 0.f, "the attention scale must be positive, the soft cap not negative");
    TORCH_CHECK(gate == "silu" || gate == "gelu_tanh", "the gate activation must be silu or gelu_tanh, not ", gate);
    TORCH_CHECK(final_norm_.device().is_cpu() && final_norm_.scalar_type() == at::kFloat && final_norm_.dim() == 1,
                "the final norm weight must be a float32 vector");
    final_norm_ = final_norm_.contiguous();
  }

  // norms: "input" and "mlp", and "q" with "k", "attn_out", "mlp_out" where the layer has them.
  void add_layer(const std::map<std::string, at::Tensor>& norms, at::Tensor kv_cache, int64_t window,
                 bool local_rope, at::Tensor qkv_packed, at::Tensor qkv_sz, c10::optional<at::Tensor> qkv_bias,
                 at::Tensor o_packed, at::Tensor o_sz, at::Tensor gate_up_packed, at::Tensor gate_up_sz,
                 at::Tensor down_packed, at::Tensor down_sz) {
    TORCH_CHECK(!blocks_, "a stack's layers must all use one weight layout");
    const int64_t hidden = final_norm_.numel();
    check_projection("qkv", qkv_packed, qkv_sz, hidden, (hq_ + 2 * hkv_) * d_);
    check_projection("o", o_packed, o_sz, hq_ * d_, hidden);
    check_projection("gate_up", gate_up_packed, gate_up_sz, hidden, 2 * inter_);
    check_projection("down", down_packed, down_sz, inter_, hidden);
    add(layer_norms(norms), std::move(kv_cache), window, local_rope, qkv_bias,
        Projection{std::move(qkv_packed), std::move(qkv_sz)}, Projection{std::move(o_packed), std::move(o_sz)},
        Projection{std::move(gate_up_packed), std::move(gate_up_sz)},
        Projection{std::move(down_packed), std::move(down_sz)});
  }

  // The same with projections in qmatmul.h's blocks (levels, d, m each, as `QWeight` holds them).
  void add_layer_blocks(const std::map<std::string, at::Tensor>& norms, at::Tensor kv_cache, int64_t window,
                        bool local_rope, std::vector<at::Tensor> qkv, c10::optional<at::Tensor> qkv_bias,
                        std::vector<at::Tensor> o, std::vector<at::Tensor> gate_up, std::vector<at::Tensor> down) {
    const int64_t hidden = final_norm_.numel();
    TORCH_CHECK(layers_.empty() || blocks_, "a stack's layers must all use one weight layout");
    blocks_ = true;
    auto qkv_p = block_projection("qkv", qkv, hidden, (hq_ + 2 * hkv_) * d_);
    auto o_p = block_projection("o", o, hq_ * d_, hidden);
    auto gate_up_p = block_projection("gate_up", gate_up, hidden, 2 * inter_);
    auto down_p = block_projection("down", down, inter_, hidden);
    add(layer_norms(norms), std::move(kv_cache), window, local_rope, qkv_bias, std::move(qkv_p), std::move(o_p),
        std::move(gate_up_p), std::move(down_p));
  }

  // x [B, H] float32, one row per token -> final-normed hidden states [B, H] float32. cos/sin [B, rotary_dim];
  // cos_local/sin_local the same for layers added with `local_rope` (required if there are any).
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                     const at::Tensor& block_tables, const at::Tensor& context_lens,
                     const c10::optional<at::Tensor>& cos_local, const c10::optional<at::Tensor>& sin_local) const {
    c10::InferenceMode guard;
    TORCH_CHECK(!layers_.empty(), "no layers");
    const std::initializer_list<const at::Tensor*> inputs{&x, &cos, &sin, &slots, &block_tables, &context_lens};
    for (const at::Tensor* t : inputs) {
      TORCH_CHECK(t->device().is_cpu(), "every input must be on the CPU");
    }
    TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(1) == final_norm_.numel(),
                "x must be [sequences, hidden size]");
    const int64_t b = x.size(0);
    const auto cos_c = rope_table(cos, b), sin_c = rope_table(sin, b);
    at::Tensor cos_l, sin_l;
    TORCH_CHECK(cos_local.has_value() == sin_local.has_value(), "local cos and sin go together");
    TORCH_CHECK(cos_local.has_value() || !any_local_rope_, "this stack's sliding layers need local cos/sin tables");
    if (cos_local) cos_l = rope_table(*cos_local, b), sin_l = rope_table(*sin_local, b);
    TORCH_CHECK(x.scalar_type() == at::kFloat, "activations must be float32");
    TORCH_CHECK(slots.numel() == b && context_lens.numel() == b && block_tables.dim() == 2 &&
                    block_tables.size(0) == b,
                "slots, block tables and context lengths must hold one row per token");
    x = x.contiguous().clone();
    const auto slots_c = slots.to(at::kLong).contiguous(), tables = block_tables.to(at::kLong).contiguous();
    const auto lens = context_lens.to(at::kLong).contiguous();
    const int64_t* lp = lens.data_ptr<int64_t>();
    check_tables(tables, lp, b);
    check_slots(slots_c);
    const int64_t max_len = *std::max_element(lp, lp + b);
    const Step step{cos_c.data_ptr<float>(),
                    sin_c.data_ptr<float>(),
                    cos_l.defined() ? cos_l.data_ptr<float>() : nullptr,
                    sin_l.defined() ? sin_l.data_ptr<float>() : nullptr,
                    slots_c.data_ptr<int64_t>(),
                    tables.data_ptr<int64_t>(),
                    tables.size(1),
                    lp,
                    max_len};

    if (blocks_) return run_layers<float>(x, step);
    return run_layers<bf16>(x, step);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  bool avx512_attention() const { return avx512_; }

 private:
  // In: the projections' input and output dtype (bfloat16 for torch's 4-bit kernel, float32 for blocks).
  template <typename In>
  at::Tensor run_layers(at::Tensor x, const Step& step) const {
    const int64_t b = x.size(0), hidden = x.size(1), qkv_n = (hq_ + 2 * hkv_) * d_;
    const int64_t widest = std::max(qkv_n, 2 * inter_) * static_cast<int64_t>(sizeof(float));
    const int64_t rows = std::min(b, std::max<int64_t>(1, kPieceBytes / widest));
    const auto in = x.options().dtype(c10::CppTypeToScalarType<In>::value);
    auto h = at::empty({rows, hidden}, in);
    auto attn = at::empty({rows, hq_ * d_}, in);
    auto act = at::empty({rows, inter_}, in);
    auto q = at::empty({rows, hq_ * d_}, x.options());
    StepBuffers buffers;
    if (blocks_) {
      buffers.wide_storage = at::empty({rows * std::max(qkv_n, 2 * inter_)}, x.options());
      buffers.narrow_storage = at::empty({rows, hidden}, x.options());
    }
    for (const auto& layer : layers_) {
      // Pieces in row order: a prompt's rows attend to its earlier rows, whose K/V the pieces before stored
      for (int64_t r = 0; r < b; r += rows) {
        const int64_t n = std::min(rows, b - r);
        const Step piece = step.from_row(r, rot_);
        at::Tensor x_n = x.narrow(0, r, n), h_n = h.narrow(0, 0, n), q_n = q.narrow(0, 0, n);
        at::Tensor attn_n = attn.narrow(0, 0, n), act_n = act.narrow(0, 0, n);
        at::Tensor qkv_out = buffers.wide(n, qkv_n), gate_up_out = buffers.wide(n, 2 * inter_);
        at::Tensor o_out = buffers.narrow(n), down_out = buffers.narrow(n);
        rms_norm_to<In>(x_n, layer.norms.input, eps_, h_n);
        rotate_and_store<In>(layer, layer.qkv(h_n, qkv_out, buffers.scratch), piece, q_n);
        attend<In>(layer, q_n, piece, attn_n);
        add_residual<In>(x_n, layer.o(attn_n, o_out, buffers.scratch), layer.norms.attn_out);
        rms_norm_to<In>(x_n, layer.norms.mlp, eps_, h_n);
        gated_to<In>(layer.gate_up(h_n, gate_up_out, buffers.scratch), inter_, gate_, act_n);
        add_residual<In>(x_n, layer.down(act_n, down_out, buffers.scratch), layer.norms.mlp_out);
      }
    }
    rms_norm_to<float>(x, final_norm_, eps_, x);  // in place: a row is read whole before it is written
    return x;
  }

  template <typename In>
  void add_residual(at::Tensor& x, const at::Tensor& y, const at::Tensor& norm) const {
    if (norm.defined()) {
      add_normed_<In>(x, y, norm, eps_);
    } else {
      add_<In>(x, y);
    }
  }

  at::Tensor rope_table(const at::Tensor& t, int64_t b) const {
    TORCH_CHECK(t.device().is_cpu() && t.scalar_type() == at::kFloat && t.numel() == b * rot_,
                "cos/sin must be float32 with one row of rotary_dim per sequence");
    return t.contiguous();
  }

  // The layer's norm scales, checked: float32 vectors of the hidden size (input, mlp, attn_out, mlp_out) or
  // of head_dim (q, k); q and k both or neither.
  Norms layer_norms(const std::map<std::string, at::Tensor>& given) const {
    const int64_t hidden = final_norm_.numel();
    const std::map<std::string, int64_t> sizes{{"input", hidden}, {"mlp", hidden},       {"q", d_},
                                               {"k", d_},         {"attn_out", hidden}, {"mlp_out", hidden}};
    for (const auto& [name, norm] : given) {
      const auto size = sizes.find(name);
      TORCH_CHECK(size != sizes.end(), "unknown norm '", name, "'");
      TORCH_CHECK(norm.device().is_cpu() && norm.scalar_type() == at::kFloat && norm.numel() == size->second,
                  "the ", name, " norm's weight must be a float32 vector of ", size->second);
    }
    const auto get = [&](const char* name) {
      const auto it = given.find(name);
      return it == given.end() ? at::Tensor() : it->second.contiguous();
    };
    Norms norms{get("input"), get("mlp"), get("q"), get("k"), get("attn_out"), get("mlp_out")};
    TORCH_CHECK(norms.input.defined() && norms.mlp.defined(), "a layer needs its input and mlp norms");
    TORCH_CHECK(norms.q.defined() == norms.k.defined(), "q and k norms go together");
    return norms;
  }

  void add(Norms norms, at::Tensor kv_cache, int64_t window, bool local_rope,
           const c10::optional<at::Tensor>& qkv_bias, Projection qkv, Projection o, Projection gate_up,
           Projection down) {
    TORCH_CHECK(kv_cache.scalar_type() == at::kHalf && kv_cache.is_contiguous() && kv_cache.dim() == 3 &&
                    kv_cache.size(0) == 2 * hkv_ && kv_cache.size(2) == d_,
                "kv_cache must be contiguous fp16 [2 * num_kv_heads, slots, head_dim]");
    TORCH_CHECK(layers_.empty() || kv_cache.size(1) == layers_.front().kv_cache.size(1),
                "every layer's cache must have the same number of slots");
    TORCH_CHECK(window == -1 || window >= 1, "a window must be positive, or -1 for none");
    at::Tensor bias;
    if (qkv_bias) {
      TORCH_CHECK(qkv_bias->device().is_cpu() && qkv_bias->numel() == (hq_ + 2 * hkv_) * d_,
                  "the qkv bias must have one value per output");
      bias = qkv_bias->to(at::kFloat).contiguous();
    }
    any_local_rope_ = any_local_rope_ || local_rope;
    layers_.push_back(Layer{std::move(norms), std::move(kv_cache), bias, window, local_rope, std::move(qkv),
                            std::move(o), std::move(gate_up), std::move(down)});
  }

  Projection block_projection(const char* name, const std::vector<at::Tensor>& parts, int64_t in, int64_t out) const {
    TORCH_CHECK(parts.size() == 3, "the ", name, " projection needs levels, scales and minimums");
    const int64_t groups = (out + tricklm_q::kCols - 1) / tricklm_q::kCols;
    const int64_t bits = parts[0].dim() == 4 ? parts[0].size(2) : 0;
    TORCH_CHECK(parts[0].device().is_cpu() && parts[0].scalar_type() == at::kByte && parts[0].is_contiguous() &&
                    (bits == 4 || bits == 8) && in % kGroup == 0 &&
                    parts[0].sizes() == at::IntArrayRef({groups, in / kGroup, bits, 64}),
                "the ", name, " projection must be 4- or 8-bit blocks, ", in, " -> ", out);
    for (int i = 1; i < 3; ++i) {
      TORCH_CHECK(parts[i].device().is_cpu() && parts[i].scalar_type() == at::kHalf && parts[i].is_contiguous() &&
                      parts[i].sizes() == at::IntArrayRef({groups, in / kGroup, tricklm_q::kCols}),
                  "the ", name, " projection's scales and minimums must be fp16 [groups, in / 32, 16]");
    }
    Projection p;
    p.levels = parts[0];
    p.d = parts[1];
    p.m = parts[2];
    p.n = out;
    return p;
  }

  void check_projection(const char* name, const at::Tensor& packed, const at::Tensor& scales_and_zeros,
                        int64_t in, int64_t out) const {
    // torch's CPU 4-bit layout: scales and zeros are [in / 32, out, 2], the packed levels [out, in / 2]
    TORCH_CHECK(packed.device().is_cpu() && scales_and_zeros.device().is_cpu() && scales_and_zeros.dim() == 3 &&
                    scales_and_zeros.size(0) * kGroup == in && scales_and_zeros.size(1) == out &&
                    packed.dim() >= 1 && packed.size(0) == out,
                "the ", name, " projection must be 4-bit, ", in, " -> ", out);
  }

  void check_slots(const at::Tensor& slots) const {
    const int64_t num_slots = layers_.front().kv_cache.size(1);
    const int64_t* sp = slots.data_ptr<int64_t>();
    for (int64_t r = 0; r < slots.numel(); ++r) {
      TORCH_CHECK(sp[r] >= 0 && sp[r] < num_slots, "cache slot out of range");
    }
  }

  // Attention reads the cache through the block tables: every block a context covers must be in it.
  void check_tables(const at::Tensor& tables, const int64_t* lens, int64_t b) const {
    const int64_t num_blocks = layers_.front().kv_cache.size(1) / block_size_, width = tables.size(1);
    const int64_t* tp = tables.data_ptr<int64_t>();
    for (int64_t r = 0; r < b; ++r) {
      TORCH_CHECK(lens[r] >= 1 && lens[r] <= width * block_size_, "a context is longer than its block table");
      for (int64_t i = 0; i < (lens[r] + block_size_ - 1) / block_size_; ++i) {
        TORCH_CHECK(tp[r * width + i] >= 0 && tp[r * width + i] < num_blocks, "block table entry out of range");
      }
    }
  }

  // q heads (normed where the layer has q/k norms, then rotated) into `q`; K heads (the same) and V heads
  // into the cache at each row's slot. Only the leading rotary_dim values of a head are rotated.
  template <typename T>
  void rotate_and_store(const Layer& layer, const at::Tensor& qkv, const Step& step, at::Tensor& q) const {
    const int64_t b = qkv.size(0), width = qkv.size(1), half_rot = rot_ / 2;
    const int64_t num_slots = layer.kv_cache.size(1);
    const T* src = qkv.data_ptr<T>();
    const float* bias = layer.qkv_bias.defined() ? layer.qkv_bias.data_ptr<float>() : nullptr;
    const float* q_norm = layer.norms.q.defined() ? layer.norms.q.data_ptr<float>() : nullptr;
    const float* k_norm = layer.norms.k.defined() ? layer.norms.k.data_ptr<float>() : nullptr;
    const float* cos_table = layer.local_rope ? step.cos_local : step.cos;
    const float* sin_table = layer.local_rope ? step.sin_local : step.sin;
    const float eps = static_cast<float>(eps_);
    float* qp = q.data_ptr<float>();
    half* cache = layer.kv_cache.data_ptr<half>();
    at::parallel_for(0, b, kRowGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> head(d_), rotated(d_);
      for (int64_t r = begin; r < end; ++r) {
        const int64_t slot = step.slots[r];  // checked against the cache in forward
        const float* cos = cos_table + r * rot_;
        const float* sin = sin_table + r * rot_;
        for (int64_t hd = 0; hd < hq_ + 2 * hkv_; ++hd) {
          const int64_t col = hd * d_;
          for (int64_t i = 0; i < d_; ++i) {
            head[i] = static_cast<float>(src[r * width + col + i]) + (bias ? bias[col + i] : 0.f);
          }
          if (q_norm != nullptr && hd < hq_ + hkv_) rms_norm_head_(head.data(), hd < hq_ ? q_norm : k_norm, d_, eps);
          if (hd < hq_ + hkv_) {  // q and k heads; V heads are not rotated
            for (int64_t i = 0; i < rot_; ++i) {
              rotated[i] = head[i] * cos[i] + head[i < half_rot ? i + half_rot : i - half_rot] * sin[i];
            }
            std::copy(head.begin() + rot_, head.end(), rotated.begin() + rot_);
          } else {
            rotated.swap(head);
          }
          if (hd < hq_) {
            std::copy(rotated.begin(), rotated.end(), qp + r * hq_ * d_ + col);
          } else {
            half* cached = cache + ((hd - hq_) * num_slots + slot) * d_;
            for (int64_t i = 0; i < d_; ++i) cached[i] = half(rotated[i]);
          }
        }
      }
    });
  }

#ifdef TRICKLM_AVX512
  // `attend_group_avx512` compiled for the head sizes of the families we run (64, 96, 128, 256), else generic.
  template <typename Out>
  void attend_avx512(const float* qg, int64_t group, const half* keys, const half* values, const int64_t* slots,
                     int64_t n, float* scores, float* partial, Out* dst) const {
    const auto run = [&](auto chunks) {
      attend_group_avx512<Out, decltype(chunks)::value>(qg, group, d_, keys, values, slots, n, scale_, softcap_,
                                                        scores, partial, dst);
    };
    switch (d_ / 16) {
      case 4: run(std::integral_constant<int, 4>()); break;
      case 6: run(std::integral_constant<int, 6>()); break;
      case 8: run(std::integral_constant<int, 8>()); break;
      case 16: run(std::integral_constant<int, 16>()); break;
      default: run(std::integral_constant<int, 0>()); break;
    }
  }
#endif

  // One query per sequence over its cached context (K/V read straight from the cache's blocks).
  template <typename Out>
  void attend(const Layer& layer, const at::Tensor& q, const Step& step, at::Tensor& out) const {
    const int64_t b = q.size(0), group = hq_ / hkv_, num_slots = layer.kv_cache.size(1);
    const float* qp = q.data_ptr<float>();
    const half* cache = layer.kv_cache.data_ptr<half>();
    Out* op = out.data_ptr<Out>();
    const int64_t grain = step.max_len >= kLongContext ? 1 : kAttentionGrain;
    at::parallel_for(0, b * hkv_, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(group * step.max_len), acc(group * d_), partial(avx512_ ? group * 256 : 0);
      std::vector<int64_t> slots(step.max_len);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t r = w / hkv_, g = w % hkv_;
        const int64_t len = step.lens[r];
        const int64_t start = layer.window > 0 ? std::max<int64_t>(0, len - layer.window) : 0;
        const int64_t n = len - start;
        const half* keys = cache + g * num_slots * d_;
        const half* values = cache + (hkv_ + g) * num_slots * d_;
        const float* qg = qp + (r * hq_ + g * group) * d_;
        const int64_t* table = step.tables + r * step.blocks_per_row;
        Out* dst = op + (r * hq_ + g * group) * d_;
        // block by block: a 64-bit division per position cost more than the position's arithmetic
        for (int64_t i = 0, block = start / block_size_, offset = start % block_size_; i < n; ++i) {
          slots[i] = table[block] * block_size_ + offset;
          if (++offset == block_size_) offset = 0, ++block;
        }
#ifdef TRICKLM_AVX512
        if (avx512_) {
          attend_avx512(qg, group, keys, values, slots.data(), n, scores.data(), partial.data(), dst);
          continue;
        }
#endif
        for (int64_t p = 0; p < n; ++p) {
          const half* k = keys + slots[p] * d_;
          for (int64_t j = 0; j < group; ++j) scores[j * n + p] = dot_half(qg + j * d_, k, d_) * scale_;
        }
        for (int64_t j = 0; j < group; ++j) cap_and_softmax_(scores.data() + j * n, n, softcap_);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t p = 0; p < n; ++p) {
          const half* v = values + slots[p] * d_;
          for (int64_t j = 0; j < group; ++j) axpy_half(acc.data() + j * d_, scores[j * n + p], v, d_);
        }
        for (int64_t i = 0; i < group * d_; ++i) dst[i] = Out(acc[i]);
      }
    });
  }

  int64_t hq_, hkv_, d_, rot_, inter_;
  double eps_;
  int64_t block_size_;
  float scale_, softcap_;
  Gate gate_;
  at::Tensor final_norm_;
  std::vector<Layer> layers_;
  bool any_local_rope_ = false;  // some layer rotates by the local table, which `forward` then needs
  bool avx512_ = false;          // attention 16 wide (`attend_group_avx512`)
  bool blocks_ = false;          // the layers' projections are qmatmul.h's blocks (all or none of them)
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  py::class_<DecoderStack>(m, "DecoderStack")
      .def(py::init<int64_t, int64_t, int64_t, int64_t, int64_t, double, int64_t, double, double, const std::string&,
                    at::Tensor>(),
           py::arg("num_heads"), py::arg("num_kv_heads"), py::arg("head_dim"), py::arg("rotary_dim"),
           py::arg("intermediate_size"), py::arg("eps"), py::arg("block_size"), py::arg("attention_scale"),
           py::arg("attn_softcap"), py::arg("gate"), py::arg("final_norm"))
      .def("add_layer", &DecoderStack::add_layer)
      .def("add_layer_blocks", &DecoderStack::add_layer_blocks)
      .def("forward", &DecoderStack::forward, py::arg("x"), py::arg("cos"), py::arg("sin"), py::arg("slots"),
           py::arg("block_tables"), py::arg("context_lens"), py::arg("cos_local") = py::none(),
           py::arg("sin_local") = py::none(), py::call_guard<py::gil_scoped_release>())
      .def("num_layers", &DecoderStack::num_layers)
      .def_property_readonly("avx512_attention", &DecoderStack::avx512_attention);
}

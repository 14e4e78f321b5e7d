// The loops between a decode step's projections, one plain loop each over the rows of a step (see
// `decode.cpp` for why): the vector helpers they share, the softmax, the RMS norms, the residual adds and
// the MLP's gate activations. Like everything of the step it sits in an anonymous namespace, so only
// `decode.cpp` (one translation unit: the `tricklm_decode` extension) includes it.
#pragma once

#include <ATen/Parallel.h>
#include <torch/extension.h>

#include <algorithm>
#include <cmath>
#include <cstdint>

#if defined(__AVX2__) && defined(__F16C__) && defined(__FMA__)
#include <immintrin.h>
#define TRICKLM_AVX2 1
#endif

namespace {

using bf16 = c10::BFloat16;
using half = c10::Half;

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

}  // namespace

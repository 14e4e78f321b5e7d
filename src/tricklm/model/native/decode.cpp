// Decode steps of a Llama-family decoder stack with compact projections, in C++: torch's 4-bit kernel
// (--quantization int4), or the one-copy 4- and 8-bit blocks of `qmatmul.h` (gguf, q4_1, q8_0, ...).
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

// Attention work items (sequence x KV head) below this run on the calling thread.
constexpr int64_t kAttentionGrain = 4;

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

// One (sequence, KV head) of attention, as `DecoderStack::attend` does it 8 wide: the group's query
// heads `qg` [group, d] over n cached positions (`slots`) -> `dst` [group, d]. Scores go 16 keys at a
// time through `sum_lanes16`; `scores` holds group x n floats, `partial` group x 256.
template <typename Out>
TRICKLM_AVX512 void attend_group_avx512(const float* qg, int64_t group, int64_t d, const half* keys,
                                        const half* values, const int64_t* slots, int64_t n, float scale,
                                        float* scores, float* partial, Out* dst) {
  const int64_t chunks = d / 16;
  for (int64_t p0 = 0; p0 < n; p0 += 16) {
    const int64_t count = std::min<int64_t>(16, n - p0);
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
  for (int64_t j = 0; j < group; ++j) softmax_(scores + j * n, n);
  for (int64_t j = 0; j < group; ++j) {
    __m512 acc[kMaxChunks];
    for (int64_t c = 0; c < chunks; ++c) acc[c] = _mm512_setzero_ps();
    for (int64_t p = 0; p < n; ++p) {
      const __m512 weight = _mm512_set1_ps(scores[j * n + p]);
      const half* v = values + slots[p] * d;
      for (int64_t c = 0; c < chunks; ++c) {
        const __m512 vf = _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(v + 16 * c)));
        acc[c] = _mm512_fmadd_ps(weight, vf, acc[c]);
      }
    }
    for (int64_t c = 0; c < chunks; ++c) {
      store8(dst + j * d + 16 * c, _mm512_castps512_ps256(acc[c]));
      store8(dst + j * d + 16 * c + 8, _mm512_extractf32x8_ps(acc[c], 1));
    }
  }
}
#endif

// out = rms_norm(x) * w, row by row, in the dtype the next projection reads (Out: bf16 or float).
template <typename Out>
void rms_norm_to(const at::Tensor& x, const at::Tensor& w, double eps, at::Tensor& out) {
  const int64_t rows = x.size(0), h = x.size(1);
  const float* xp = x.data_ptr<float>();
  const float* wp = w.data_ptr<float>();
  Out* op = out.data_ptr<Out>();
  for (int64_t r = 0; r < rows; ++r) {
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
  }
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
  float* xp = x.data_ptr<float>();
  const T* yp = y.data_ptr<T>();
  const int64_t n = x.numel();
  int64_t i = 0;
#ifdef TRICKLM_AVX2
  for (; i + 8 <= n; i += 8) _mm256_storeu_ps(xp + i, _mm256_add_ps(_mm256_loadu_ps(xp + i), load8(yp + i)));
#endif
  for (; i < n; ++i) xp[i] += static_cast<float>(yp[i]);
}

// out = silu(gate) * up, from the fused gate/up projection's output, all in T (bf16 or float).
template <typename T>
void silu_mul_to(const at::Tensor& gate_up, int64_t inter, at::Tensor& out) {
  const int64_t rows = gate_up.size(0);
  const T* gp = gate_up.data_ptr<T>();
  T* op = out.data_ptr<T>();
  for (int64_t r = 0; r < rows; ++r) {
    const T* g = gp + r * 2 * inter;
    T* o = op + r * inter;
    int64_t i = 0;
#ifdef TRICKLM_AVX2
    const __m256 one = _mm256_set1_ps(1.f);
    for (; i + 8 <= inter; i += 8) {
      const __m256 a = load8(g + i);
      const __m256 silu = _mm256_div_ps(a, _mm256_add_ps(one, exp8(_mm256_sub_ps(_mm256_setzero_ps(), a))));
      store8(o + i, _mm256_mul_ps(silu, load8(g + inter + i)));
    }
#endif
    for (; i < inter; ++i) {
      const float a = static_cast<float>(g[i]);
      o[i] = T(a / (1.f + std::exp(-a)) * static_cast<float>(g[inter + i]));
    }
  }
}

// Torch's 4-bit kernel takes and gives bfloat16; the block one float32 (it rounds its input to int8
// itself, and a bfloat16 rounding before or after it doubled the difference from the Python path).
struct Projection {
  at::Tensor packed, scales_and_zeros;  // torch's layout
  at::Tensor levels, d, m;              // or blocks (qmatmul.h), `n` outputs
  int64_t n = 0;

  at::Tensor operator()(const at::Tensor& x) const {
    if (levels.defined()) {
      return tricklm_q::qmatmul(x, levels, d, m, n, "");
    }
    return at::_weight_int4pack_mm_for_cpu(x, packed, kGroup, scales_and_zeros);
  }
};

struct Layer {
  at::Tensor input_norm, post_norm, kv_cache, qkv_bias;  // qkv_bias may be undefined
  at::Tensor q_norm, k_norm;  // per-head norms before the rotation: both [head_dim], or both undefined
  Projection qkv, o, gate_up, down;
};

struct Step {
  const float* cos;  // [B, D], sin with its first half negated (see RotaryEmbedding)
  const float* sin;
  const int64_t* slots;   // [B] where each row's new K/V go
  const int64_t* tables;  // [B, blocks_per_row] block tables
  int64_t blocks_per_row;
  const int64_t* lens;  // [B] context length including the new token
  int64_t max_len;
};

class DecoderStack {
 public:
  DecoderStack(int64_t num_heads, int64_t num_kv_heads, int64_t head_dim, int64_t intermediate, double eps,
               int64_t block_size, int64_t sliding_window, at::Tensor final_norm)
      : hq_(num_heads),
        hkv_(num_kv_heads),
        d_(head_dim),
        inter_(intermediate),
        eps_(eps),
        block_size_(block_size),
        window_(sliding_window),
        scale_(1.f / std::sqrt(static_cast<float>(head_dim))),
        final_norm_(std::move(final_norm)) {
#ifdef TRICKLM_AVX512
    avx512_ = cpu_has_avx512() && head_dim % 16 == 0 && head_dim <= 16 * kMaxChunks;
#endif
    TORCH_CHECK(hq_ > 0 && hkv_ > 0 && d_ > 0 && inter_ > 0 && block_size_ > 0, "sizes must be positive");
    TORCH_CHECK(hq_ % hkv_ == 0, "query heads must be a multiple of KV heads");
    TORCH_CHECK(d_ % 2 == 0, "head_dim must be even");
    TORCH_CHECK(final_norm_.device().is_cpu() && final_norm_.scalar_type() == at::kFloat && final_norm_.dim() == 1,
                "the final norm weight must be a float32 vector");
    final_norm_ = final_norm_.contiguous();
  }

  void add_layer(at::Tensor input_norm, at::Tensor post_norm, c10::optional<at::Tensor> q_norm,
                 c10::optional<at::Tensor> k_norm, at::Tensor kv_cache, at::Tensor qkv_packed,
                 at::Tensor qkv_sz, c10::optional<at::Tensor> qkv_bias, at::Tensor o_packed, at::Tensor o_sz,
                 at::Tensor gate_up_packed, at::Tensor gate_up_sz, at::Tensor down_packed, at::Tensor down_sz) {
    TORCH_CHECK(!blocks_, "a stack's layers must all use one weight layout");
    const int64_t hidden = final_norm_.numel();
    check_projection("qkv", qkv_packed, qkv_sz, hidden, (hq_ + 2 * hkv_) * d_);
    check_projection("o", o_packed, o_sz, hq_ * d_, hidden);
    check_projection("gate_up", gate_up_packed, gate_up_sz, hidden, 2 * inter_);
    check_projection("down", down_packed, down_sz, inter_, hidden);
    add(std::move(input_norm), std::move(post_norm), head_norms(q_norm, k_norm), std::move(kv_cache), qkv_bias,
        Projection{std::move(qkv_packed), std::move(qkv_sz)}, Projection{std::move(o_packed), std::move(o_sz)},
        Projection{std::move(gate_up_packed), std::move(gate_up_sz)},
        Projection{std::move(down_packed), std::move(down_sz)});
  }

  // The same with projections in qmatmul.h's blocks (levels, d, m each, as `QWeight` holds them).
  void add_layer_blocks(at::Tensor input_norm, at::Tensor post_norm, c10::optional<at::Tensor> q_norm,
                        c10::optional<at::Tensor> k_norm, at::Tensor kv_cache, std::vector<at::Tensor> qkv,
                        c10::optional<at::Tensor> qkv_bias, std::vector<at::Tensor> o,
                        std::vector<at::Tensor> gate_up, std::vector<at::Tensor> down) {
    const int64_t hidden = final_norm_.numel();
    TORCH_CHECK(layers_.empty() || blocks_, "a stack's layers must all use one weight layout");
    blocks_ = true;
    auto qkv_p = block_projection("qkv", qkv, hidden, (hq_ + 2 * hkv_) * d_);
    auto o_p = block_projection("o", o, hq_ * d_, hidden);
    auto gate_up_p = block_projection("gate_up", gate_up, hidden, 2 * inter_);
    auto down_p = block_projection("down", down, inter_, hidden);
    add(std::move(input_norm), std::move(post_norm), head_norms(q_norm, k_norm), std::move(kv_cache), qkv_bias,
        std::move(qkv_p), std::move(o_p), std::move(gate_up_p), std::move(down_p));
  }

  // x [B, H] float32, one row per sequence -> final-normed hidden states [B, H] float32.
  at::Tensor forward(at::Tensor x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& slots,
                     const at::Tensor& block_tables, const at::Tensor& context_lens) const {
    c10::InferenceMode guard;
    TORCH_CHECK(!layers_.empty(), "no layers");
    const std::initializer_list<const at::Tensor*> inputs{&x, &cos, &sin, &slots, &block_tables, &context_lens};
    for (const at::Tensor* t : inputs) {
      TORCH_CHECK(t->device().is_cpu(), "every input must be on the CPU");
    }
    TORCH_CHECK(x.dim() == 2 && x.size(0) >= 1 && x.size(1) == final_norm_.numel(),
                "x must be [sequences, hidden size]");
    const int64_t b = x.size(0), hidden = x.size(1);
    TORCH_CHECK(x.scalar_type() == at::kFloat && cos.scalar_type() == at::kFloat && sin.scalar_type() == at::kFloat,
                "activations and RoPE tables must be float32");
    TORCH_CHECK(cos.numel() == b * d_ && sin.numel() == b * d_, "cos/sin must hold one row per sequence");
    TORCH_CHECK(slots.numel() == b && context_lens.numel() == b && block_tables.dim() == 2 &&
                    block_tables.size(0) == b,
                "slots, block tables and context lengths must hold one row per sequence");
    x = x.contiguous().clone();
    const auto cos_c = cos.contiguous(), sin_c = sin.contiguous();
    const auto slots_c = slots.to(at::kLong).contiguous(), tables = block_tables.to(at::kLong).contiguous();
    const auto lens = context_lens.to(at::kLong).contiguous();
    const int64_t* lp = lens.data_ptr<int64_t>();
    check_tables(tables, lp, b);
    check_slots(slots_c);
    const int64_t max_len = *std::max_element(lp, lp + b);
    const Step step{cos_c.data_ptr<float>(),  sin_c.data_ptr<float>(), slots_c.data_ptr<int64_t>(),
                    tables.data_ptr<int64_t>(), tables.size(1),         lp, max_len};

    if (blocks_) return run_layers<float>(x, step);
    return run_layers<bf16>(x, step);
  }

  int64_t num_layers() const { return static_cast<int64_t>(layers_.size()); }
  bool avx512_attention() const { return avx512_; }

 private:
  // In: the projections' input and output dtype (bfloat16 for torch's 4-bit kernel, float32 for blocks).
  template <typename In>
  at::Tensor run_layers(at::Tensor x, const Step& step) const {
    const int64_t b = x.size(0), hidden = x.size(1);
    const auto in = x.options().dtype(c10::CppTypeToScalarType<In>::value);
    auto h = at::empty({b, hidden}, in);
    auto attn = at::empty({b, hq_ * d_}, in);
    auto act = at::empty({b, inter_}, in);
    auto q = at::empty({b, hq_ * d_}, x.options());
    for (const auto& layer : layers_) {
      rms_norm_to<In>(x, layer.input_norm, eps_, h);
      rotate_and_store<In>(layer, layer.qkv(h), step, q);
      attend<In>(layer, q, step, attn);
      add_<In>(x, layer.o(attn));
      rms_norm_to<In>(x, layer.post_norm, eps_, h);
      silu_mul_to<In>(layer.gate_up(h), inter_, act);
      add_<In>(x, layer.down(act));
    }
    return at::rms_norm(x, {hidden}, final_norm_, eps_);
  }

  // The q and k norm scales, checked: both float32 vectors of head_dim, or neither.
  std::pair<at::Tensor, at::Tensor> head_norms(const c10::optional<at::Tensor>& q_norm,
                                               const c10::optional<at::Tensor>& k_norm) const {
    TORCH_CHECK(q_norm.has_value() == k_norm.has_value(), "q and k norms go together");
    if (!q_norm) return {};
    for (const auto* norm : {&*q_norm, &*k_norm}) {
      TORCH_CHECK(norm->device().is_cpu() && norm->scalar_type() == at::kFloat && norm->numel() == d_,
                  "q/k norm weights must be float32 vectors of head_dim");
    }
    return {q_norm->contiguous(), k_norm->contiguous()};
  }

  void add(at::Tensor input_norm, at::Tensor post_norm, std::pair<at::Tensor, at::Tensor> qk_norms, at::Tensor kv_cache,
           const c10::optional<at::Tensor>& qkv_bias, Projection qkv, Projection o, Projection gate_up,
           Projection down) {
    TORCH_CHECK(kv_cache.scalar_type() == at::kHalf && kv_cache.is_contiguous() && kv_cache.dim() == 3 &&
                    kv_cache.size(0) == 2 * hkv_ && kv_cache.size(2) == d_,
                "kv_cache must be contiguous fp16 [2 * num_kv_heads, slots, head_dim]");
    TORCH_CHECK(layers_.empty() || kv_cache.size(1) == layers_.front().kv_cache.size(1),
                "every layer's cache must have the same number of slots");
    const int64_t hidden = final_norm_.numel();
    for (const auto* norm : {&input_norm, &post_norm}) {
      TORCH_CHECK(norm->device().is_cpu() && norm->scalar_type() == at::kFloat && norm->numel() == hidden,
                  "norm weights must be float32 vectors of the hidden size");
    }
    at::Tensor bias;
    if (qkv_bias) {
      TORCH_CHECK(qkv_bias->device().is_cpu() && qkv_bias->numel() == (hq_ + 2 * hkv_) * d_,
                  "the qkv bias must have one value per output");
      bias = qkv_bias->to(at::kFloat).contiguous();
    }
    layers_.push_back(Layer{input_norm.contiguous(), post_norm.contiguous(), std::move(kv_cache), bias,
                            std::move(qk_norms.first), std::move(qk_norms.second), std::move(qkv), std::move(o),
                            std::move(gate_up), std::move(down)});
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
  // into the cache at each row's slot.
  template <typename T>
  void rotate_and_store(const Layer& layer, const at::Tensor& qkv, const Step& step, at::Tensor& q) const {
    const int64_t b = qkv.size(0), width = qkv.size(1), half_d = d_ / 2;
    const int64_t num_slots = layer.kv_cache.size(1);
    const T* src = qkv.data_ptr<T>();
    const float* bias = layer.qkv_bias.defined() ? layer.qkv_bias.data_ptr<float>() : nullptr;
    const float* q_norm = layer.q_norm.defined() ? layer.q_norm.data_ptr<float>() : nullptr;
    const float* k_norm = layer.k_norm.defined() ? layer.k_norm.data_ptr<float>() : nullptr;
    const float eps = static_cast<float>(eps_);
    float* qp = q.data_ptr<float>();
    half* cache = layer.kv_cache.data_ptr<half>();
    std::vector<float> head(d_), rotated(d_);
    for (int64_t r = 0; r < b; ++r) {
      const int64_t slot = step.slots[r];  // checked against the cache in forward
      const float* cos = step.cos + r * d_;
      const float* sin = step.sin + r * d_;
      for (int64_t hd = 0; hd < hq_ + 2 * hkv_; ++hd) {
        const int64_t col = hd * d_;
        for (int64_t i = 0; i < d_; ++i) {
          head[i] = static_cast<float>(src[r * width + col + i]) + (bias ? bias[col + i] : 0.f);
        }
        if (q_norm != nullptr && hd < hq_ + hkv_) rms_norm_head_(head.data(), hd < hq_ ? q_norm : k_norm, d_, eps);
        if (hd < hq_ + hkv_) {  // q and k heads; V heads are not rotated
          for (int64_t i = 0; i < d_; ++i) {
            rotated[i] = head[i] * cos[i] + head[i < half_d ? i + half_d : i - half_d] * sin[i];
          }
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
  }

  // One query per sequence over its cached context (K/V read straight from the cache's blocks).
  template <typename Out>
  void attend(const Layer& layer, const at::Tensor& q, const Step& step, at::Tensor& out) const {
    const int64_t b = q.size(0), group = hq_ / hkv_, num_slots = layer.kv_cache.size(1);
    const float* qp = q.data_ptr<float>();
    const half* cache = layer.kv_cache.data_ptr<half>();
    Out* op = out.data_ptr<Out>();
    at::parallel_for(0, b * hkv_, kAttentionGrain, [&](int64_t begin, int64_t end) {
      std::vector<float> scores(group * step.max_len), acc(group * d_), partial(avx512_ ? group * 256 : 0);
      std::vector<int64_t> slots(step.max_len);
      for (int64_t w = begin; w < end; ++w) {
        const int64_t r = w / hkv_, g = w % hkv_;
        const int64_t len = step.lens[r];
        const int64_t start = window_ > 0 ? std::max<int64_t>(0, len - window_) : 0;
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
          attend_group_avx512(qg, group, d_, keys, values, slots.data(), n, scale_, scores.data(), partial.data(), dst);
          continue;
        }
#endif
        for (int64_t p = 0; p < n; ++p) {
          const half* k = keys + slots[p] * d_;
          for (int64_t j = 0; j < group; ++j) scores[j * n + p] = dot_half(qg + j * d_, k, d_) * scale_;
        }
        for (int64_t j = 0; j < group; ++j) softmax_(scores.data() + j * n, n);
        std::fill(acc.begin(), acc.end(), 0.f);
        for (int64_t p = 0; p < n; ++p) {
          const half* v = values + slots[p] * d_;
          for (int64_t j = 0; j < group; ++j) axpy_half(acc.data() + j * d_, scores[j * n + p], v, d_);
        }
        for (int64_t i = 0; i < group * d_; ++i) dst[i] = Out(acc[i]);
      }
    });
  }

  int64_t hq_, hkv_, d_, inter_;
  double eps_;
  int64_t block_size_, window_;
  float scale_;
  at::Tensor final_norm_;
  std::vector<Layer> layers_;
  bool avx512_ = false;  // attention 16 wide (`attend_group_avx512`)
  bool blocks_ = false;  // the layers' projections are qmatmul.h's blocks (all or none of them)
};

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  pybind11::class_<DecoderStack>(m, "DecoderStack")
      .def(pybind11::init<int64_t, int64_t, int64_t, int64_t, double, int64_t, int64_t, at::Tensor>())
      .def("add_layer", &DecoderStack::add_layer)
      .def("add_layer_blocks", &DecoderStack::add_layer_blocks)
      .def("forward", &DecoderStack::forward, pybind11::call_guard<pybind11::gil_scoped_release>())
      .def("num_layers", &DecoderStack::num_layers)
      .def_property_readonly("avx512_attention", &DecoderStack::avx512_attention);
}

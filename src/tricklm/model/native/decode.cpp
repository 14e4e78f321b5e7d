// Decode steps of a Llama-family decoder stack with compact projections, in C++: torch's 4-bit kernel
// (--quantization int4), or the one-copy 4- and 8-bit blocks of `qmatmul.h` (gguf, q4_1, q8_0, ...).
// The family's variants are options of the stack or of a layer: Qwen3's and Gemma 3's per-head q/k norms,
// Gemma's norms around the attention and MLP outputs, GeGLU, a window and RoPE table per layer, a query
// scale, attention soft-capping (Gemma 2), partial rotary (Phi-3). What is not here runs in Python
// (`missing_operations` in decoder.py names it).
//
// A decode step does little arithmetic per op. At one row the Python path spent more time dispatching
// ~45 small torch ops per layer than computing them. Here the projections still go through torch's
// 4-bit kernel, and everything between them (norms, RoPE, the cache write, attention, SiLU, residuals)
// is one plain loop each, reading and writing the dtypes the kernel wants (bfloat16 in, bfloat16 out)
// so no conversion op runs on its own. The numerics follow the Python path: float32 activations, an
// fp16 KV cache, bfloat16 only at the projections' inputs and outputs.
//
// The loops between the projections are in `decode_ops.h`, attention over the cache in
// `decode_attention.h`, a layer's data and the checks on it in `decode_layer.h`; here the stack itself.
#include <ATen/Parallel.h>
#include <torch/extension.h>

#include "decode_attention.h"
#include "decode_layer.h"
#include "decode_ops.h"
#include "qmatmul.h"

#include <algorithm>
#include <map>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

namespace {

// Attention work items (sequence x KV head) below this run on the calling thread, unless a context is at
// least kLongContext positions long: then even one sequence's few KV heads are worth sharing out (one
// sequence of a model with 3 KV heads at 2,000 positions spent most of its step in one thread's attention).
constexpr int64_t kAttentionGrain = 4;
constexpr int64_t kLongContext = 256;

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
    add(layer_norms(norms, hidden, d_), std::move(kv_cache), window, local_rope, qkv_bias,
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
    add(layer_norms(norms, hidden, d_), std::move(kv_cache), window, local_rope, qkv_bias, std::move(qkv_p),
        std::move(o_p), std::move(gate_up_p), std::move(down_p));
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

// What the stack holds of a layer (its projections, norms and cache) and what a step reads and writes
// into, with the checks on the weights and norms Python hands over for a layer. Only `decode.cpp`
// includes it (an anonymous namespace, as there).
#pragma once

#include <torch/extension.h>

#include "qmatmul.h"

#include <cstdint>
#include <map>
#include <string>
#include <vector>

namespace {

constexpr int64_t kGroup = 32;  // weights per scale in torch's CPU 4-bit layout

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

// The layer's norm scales, checked: float32 vectors of the hidden size (input, mlp, attn_out, mlp_out) or
// of head_dim (q, k); q and k both or neither.
Norms layer_norms(const std::map<std::string, at::Tensor>& given, int64_t hidden, int64_t head_dim) {
  const std::map<std::string, int64_t> sizes{{"input", hidden}, {"mlp", hidden},      {"q", head_dim},
                                             {"k", head_dim},   {"attn_out", hidden}, {"mlp_out", hidden}};
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

Projection block_projection(const char* name, const std::vector<at::Tensor>& parts, int64_t in, int64_t out) {
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

void check_projection(const char* name, const at::Tensor& packed, const at::Tensor& scales_and_zeros, int64_t in,
                      int64_t out) {
  // torch's CPU 4-bit layout: scales and zeros are [in / 32, out, 2], the packed levels [out, in / 2]
  TORCH_CHECK(packed.device().is_cpu() && scales_and_zeros.device().is_cpu() && scales_and_zeros.dim() == 3 &&
                  scales_and_zeros.size(0) * kGroup == in && scales_and_zeros.size(1) == out &&
                  packed.dim() >= 1 && packed.size(0) == out,
              "the ", name, " projection must be 4-bit, ", in, " -> ", out);
}

}  // namespace

// Block-quantized weights times activations, as Python and the decode step call it: which kernel of
// `qkernels.h` runs (the layout of the weights and the int8 arithmetic are described there), the checks on
// what a caller hands over, and the paths beside the int8 kernels: exact rows for an embedding lookup and
// exact top logits for an output head (`weight_rows`, `refine_top`), and AMX tiles for chunks of many rows.
// The choice is made per call at run time, so that one build serves every x86 CPU and TRICKLM_ISA can
// force a lower path on the machine at hand.

#pragma once

#include "qkernels.h"

#include <torch/extension.h>

#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>
#include <cpuid.h>
#include <immintrin.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace tricklm_q {

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
// the int8 VNNI kernel (`qkernels.h`) at its peak, and a chunk of many rows runs faster end to end, widening
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


"""How many multiply-adds per second one core of this CPU can do, per instruction kind.

The ceiling any decode kernel works under: a 16-row step is bound by arithmetic, not by reading the
weights. Each loop below issues one instruction kind into 24 independent accumulators (enough to hide
its latency), so the figure is the core's throughput for it, not a kernel's:

  fma-fp32     vfmadd231ps, 512-bit: 16 float32 multiply-adds
  dot-bf16     vdpbf16ps (AVX512_BF16): 32 bfloat16 products summed in pairs into float32
  dot-int8     vpdpbusd (AVX512_VNNI): 64 u8 x s8 products summed in fours into int32

It needs a C++ compiler (as the native decode step does) and prints only the kinds this CPU has.

    .venv/bin/python benchmarks/cpu_peak.py
"""

from __future__ import annotations

import tempfile

from torch.utils import cpp_extension

SOURCE = r"""
#include <immintrin.h>
#include <chrono>
#include <string>

namespace {
constexpr long kRounds = 4000000;
double now() { return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count(); }

// 24 independent accumulators, enough to hide the instruction's latency; the empty asm keeps every
// chain alive and in a register. Yields instructions per second.
#define TIMED_CHAINS(TYPE, INIT, STEP)                  \
  TYPE acc[24];                                         \
  for (auto& a : acc) a = INIT;                         \
  const double start = now();                           \
  for (long i = 0; i < kRounds; ++i) {                  \
    for (auto& a : acc) {                               \
      a = STEP;                                         \
      __asm__ volatile("" : "+v"(a));                   \
    }                                                   \
  }                                                     \
  return static_cast<double>(kRounds) * 24 / (now() - start);

__attribute__((target("avx512f"))) double fma_fp32() {
  const __m512 x = _mm512_set1_ps(1.0f), y = _mm512_set1_ps(1e-9f);
  TIMED_CHAINS(__m512, _mm512_setzero_ps(), _mm512_fmadd_ps(a, x, y))
}

__attribute__((target("avx512f,avx512bf16"))) double dot_bf16() {
  const __m512bh x = (__m512bh)_mm512_set1_epi32(0x3f803f80);
  TIMED_CHAINS(__m512, _mm512_setzero_ps(), _mm512_dpbf16_ps(a, x, x))
}

__attribute__((target("avx512f,avx512vnni"))) double dot_int8() {
  const __m512i x = _mm512_set1_epi8(1);
  TIMED_CHAINS(__m512i, _mm512_setzero_si512(), _mm512_dpbusd_epi32(a, x, x))
}
}  // namespace

// multiply-adds per second of one core (0 where the CPU lacks the instruction)
double multiply_adds_per_second(const std::string& kind) {
  if (kind == "fma-fp32" && __builtin_cpu_supports("avx512f")) return 16 * fma_fp32();
  if (kind == "dot-bf16" && __builtin_cpu_supports("avx512bf16")) return 32 * dot_bf16();
  if (kind == "dot-int8" && __builtin_cpu_supports("avx512vnni")) return 64 * dot_int8();
  return 0.0;
}
"""

KINDS = ("fma-fp32", "dot-bf16", "dot-int8")


def main() -> None:
    with tempfile.TemporaryDirectory() as build:
        ext = cpp_extension.load_inline(
            name="tricklm_cpu_peak",
            cpp_sources=SOURCE,
            functions=["multiply_adds_per_second"],
            extra_cflags=["-O2"],
            build_directory=build,
        )
        print("# one core, best of 3; G multiply-adds per second")
        for kind in KINDS:
            best = max(ext.multiply_adds_per_second(kind) for _ in range(3))
            print(f"{kind:>9}: " + (f"{best / 1e9:6.1f}" if best else "  not on this CPU"))


if __name__ == "__main__":
    main()

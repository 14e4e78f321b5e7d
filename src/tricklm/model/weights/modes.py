"""The formats a model's projections can be kept and run in (`--quantization`), apart from the code that makes
them, so that a config names one without importing torch.

Past the option's text, the loader and the quantizer work with one `WeightFormat` (`weight_format` turns the
text into it); what a format implies is asked of the value (`blocks`, `prefill_copy`, ...), never of its name.
"""

from __future__ import annotations

import enum


class WeightFormat(enum.Enum):
    # Everything in the config's dtype; float32 is the exact reference
    NONE = "none"
    # torch's kernels: 4-bit decode weights where the checkpoint's already are 4-bit, packed fp16 elsewhere,
    # plus a bfloat16 or fp16 copy that large steps read (`--prefill-weights`; `quant.py`)
    INT4 = "int4"
    # Packed fp16 for every step, one copy (`quant.HalfLinear`); no native step
    FP16_ONLY = "fp16-only"
    # One copy in blocks of 32 for every step, read by the int8 kernels (`qlinear.py`): a GGUF file's own
    # types (4- or 8-bit blocks, `blocks.py`; float tensors as FP16_ONLY)
    GGUF = "gguf"
    # The same, every projection rounded so at load as llama.cpp's `quantize` does (a GGUF type whose levels
    # fit is read exactly instead)
    Q4_0 = "q4_0"
    Q4_1 = "q4_1"
    Q4_K = "q4_k"
    Q8_0 = "q8_0"

    @property
    def compact(self) -> bool:
        """Projections in 16 bits or fewer, float32 activations and an fp16 KV cache (`quant.py`)."""
        return self is not WeightFormat.NONE

    @property
    def blocks(self) -> bool:
        """Projections in blocks of 32 wherever they can be."""
        return self in (WeightFormat.GGUF, *ROUNDED)

    @property
    def rounds(self) -> bool:
        """Every projection rounded to this format at load, not only what a GGUF file holds in blocks."""
        return self in ROUNDED

    @property
    def prefill_copy(self) -> bool:
        """Projections keep a second copy for large steps."""
        return self is WeightFormat.INT4

    @property
    def rounding(self) -> str:
        """How a weight the blocks cannot hold exactly is rounded (a key of `blocks.ROUNDINGS`): GGUF keeps
        8 bits, as llama.cpp keeps a type it cannot run."""
        if not self.blocks:
            raise ValueError(f"{self.value} keeps no blocks")
        return "q8_0" if self is WeightFormat.GGUF else self.value


ROUNDED = (WeightFormat.Q4_0, WeightFormat.Q4_1, WeightFormat.Q4_K, WeightFormat.Q8_0)
AUTO = "auto"
QUANTIZATIONS = (AUTO, *(f.value for f in WeightFormat))  # the `--quantization` choices
# Names that are no longer formats, with what replaced them
RETIRED = {
    "fp16": "--quantization fp16 was retired: int4 keeps the same packed fp16 decode weights and prefill copy "
    "(and 4-bit ones where the checkpoint is 4-bit) in less memory once loaded; fp16-only keeps one fp16 copy",
}
GGUF_NEEDS_A_FILE = (
    "--quantization gguf keeps a GGUF file's types: pass a .gguf model, or round a safetensors folder with "
    "q8_0, q4_k, q4_1 or q4_0"
)
# Formats of the copy large steps read: "bf16" (oneDNN) or "fp16" (fbgemm); "auto" times both at load.
PREFILL_FORMATS = ("auto", "bf16", "fp16")


def check_quantization(name: str) -> None:
    """Raises ValueError for a name `--quantization` does not take, saying what replaced a retired one."""
    if name in RETIRED:
        raise ValueError(RETIRED[name])
    if name not in QUANTIZATIONS:
        raise ValueError(f"quantization must be one of {', '.join(QUANTIZATIONS)}")


def weight_format(name: str | WeightFormat, gguf: bool) -> WeightFormat:
    """The format `--quantization NAME` keeps a model in (`gguf`: whether its weights are a GGUF file).

    "auto" is the file's own types for a GGUF file, int4 for a safetensors folder.
    """
    if isinstance(name, WeightFormat):
        fmt = name
    else:
        check_quantization(name)
        if name == AUTO:
            return WeightFormat.GGUF if gguf else WeightFormat.INT4
        fmt = WeightFormat(name)
    if fmt is WeightFormat.GGUF and not gguf:
        raise ValueError(GGUF_NEEDS_A_FILE)
    return fmt

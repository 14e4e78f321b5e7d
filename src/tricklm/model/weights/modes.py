"""The names of the ways a model's projections can be stored and run (`--quantization`, `--prefill-weights`), apart
from the code that makes them, so that a config names one without importing torch.

"int4": 4-bit where the checkpoint's weights are 4-bit already, else packed fp16, plus bfloat16 copies for large
steps; "fp16": packed fp16 plus the copies; "fp16-only": packed fp16 for every step (`quant.py`).
Block modes keep one copy in blocks of 32 for every step, read by the int8 kernels (`qlinear.py`): "gguf" keeps a
GGUF file's own types (4-bit or 8-bit blocks, `blocks.py`; float types as "fp16-only"); "q4_0", "q4_1", "q4_k",
"q8_0" round every projection so, as llama.cpp's `quantize` does (a GGUF type whose levels fit is read exactly
instead).
"""

BLOCK_MODES = ("gguf", "q4_0", "q4_1", "q4_k", "q8_0")
QUANT_MODES = ("int4", "fp16", "fp16-only", *BLOCK_MODES)
# Modes whose projections keep no second copy for large steps
ONE_COPY_MODES = ("fp16-only", *BLOCK_MODES)
# Formats of the copy large steps read: "bf16" (oneDNN) or "fp16" (fbgemm); "auto" times both at load.
PREFILL_FORMATS = ("auto", "bf16", "fp16")

"""tricklm: a streaming LLM inference server for CPUs."""

import os as _os

__version__ = "0.1.0"

# TRICKLM_ISA=avx2 or scalar stands in for a CPU without AVX-512 (see `model/native/isa.py`): torch picks its own
# kernels once, when it is first imported, so it is told here to take that CPU's path too, unless told otherwise.
_ATEN_FOR_ISA = {"avx2": "avx2", "scalar": "default"}
if (_forced := _os.environ.get("TRICKLM_ISA", "").strip().lower()) in _ATEN_FOR_ISA:
    _os.environ.setdefault("ATEN_CPU_CAPABILITY", _ATEN_FOR_ISA[_forced])

"""Which CPU path the kernels take, and `TRICKLM_ISA` to force one below the best, so that any machine can
run and measure the paths of the CPUs it is not (an AVX-512 server the AVX2 path of most laptops).

The kernels read the variable at every call (`native/qmatmul.h`); this module refuses, at start-up and with
a message, a value they do not know or a path this CPU cannot run, and says in the log what runs.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

ISA_ENV = "TRICKLM_ISA"
# in the order of what they ask of the CPU; "auto" (or unset) is the best this CPU has
PATHS = ("scalar", "avx2", "avx512vnni", "amx")
# the flags of /proc/cpuinfo (lscpu's) that decide between them
RELEVANT_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "avx512_bf16", "amx_tile")


def forced() -> str | None:
    """The path TRICKLM_ISA forces, or None (unset or "auto"); ValueError for a name the kernels do not know."""
    if "TRICKLM_AMX" in os.environ:  # an older switch: refused, not silently ignored
        raise ValueError(f"TRICKLM_AMX is no longer read: {ISA_ENV}=avx512vnni keeps AMX off")
    value = os.environ.get(ISA_ENV, "").strip().lower()
    if value in ("", "auto"):
        return None
    if value not in PATHS:
        raise ValueError(f"{ISA_ENV}={value!r} is not one of auto, {', '.join(PATHS)}")
    return value


def best(ext: Any) -> str:
    """The most capable path this CPU has, from the compiled kernel's own CPUID checks."""
    return "amx" if ext.cpu_amx() else str(ext.cpu_isa())


def check(ext: Any) -> None:
    """ValueError if TRICKLM_ISA asks for a path above what this CPU has."""
    wanted, have = forced(), best(ext)
    if wanted is not None and PATHS.index(wanted) > PATHS.index(have):
        raise ValueError(f"{ISA_ENV}={wanted}: this CPU's best path is {have} (flags: {' '.join(cpu_flags())})")


def describe(ext: Any) -> str:
    """What runs, for the start-up log and result files: e.g. "int8 kernel avx2, AMX off (TRICKLM_ISA=avx2;
    this CPU has amx)"."""
    wanted, have = forced(), best(ext)
    amx = "AMX for chunks of many rows" if ext.amx() else "AMX off"
    why = f" ({ISA_ENV}={wanted}; this CPU has {have})" if wanted is not None else ""
    return f"int8 kernel {ext.isa()}, {amx}{why}"


def cpu_flags(cpuinfo: Path = Path("/proc/cpuinfo")) -> list[str]:
    """Those of RELEVANT_FLAGS this CPU reports (empty where /proc/cpuinfo is not there)."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return []
    line = next((line for line in text.splitlines() if line.startswith("flags")), "")
    have = set(line.partition(":")[2].split())
    return [flag for flag in RELEVANT_FLAGS if flag in have]


def cpu_model(cpuinfo: Path = Path("/proc/cpuinfo")) -> str:
    """The CPU's model name as lscpu shows it, or "unknown CPU"."""
    try:
        text = cpuinfo.read_text()
    except OSError:
        return "unknown CPU"
    line = next((line for line in text.splitlines() if line.startswith("model name")), "")
    return line.partition(":")[2].strip() or "unknown CPU"

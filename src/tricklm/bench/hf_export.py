"""A GGUF model's weights as a float32 Hugging Face folder, for what needs float weights: the peers that
load models with transformers, and the rounding of float weights to each block format (`benchmarks/kld.py`)."""

from __future__ import annotations

from pathlib import Path


def hf_weights_folder(model_dir: Path) -> Path:
    """A Hugging Face folder with float32 safetensors (`model_dir` itself if it has them).

    tricklm's cache folder of a GGUF holds no weights (tricklm reads them from the file at every start),
    so they are written out here once, through tricklm's own GGUF reader.
    """
    from safetensors.torch import save_file

    from tricklm.model.resolve import cache_dir
    from tricklm.model.weights.gguf_file import GGUF_LINK, dense_tensors, weights_reader
    from tricklm.model.weights.loader import load_config

    if any(model_dir.glob("*.safetensors")):
        return model_dir
    out = cache_dir() / "hf-export" / model_dir.name
    if (out / "model.safetensors").is_file():
        return out
    out.mkdir(parents=True, exist_ok=True)
    for item in model_dir.iterdir():
        if item.name != GGUF_LINK and not (out / item.name).exists():
            (out / item.name).symlink_to(item.resolve())
    tensors = dict(dense_tensors(weights_reader(model_dir / GGUF_LINK), load_config(model_dir)))
    save_file(tensors, str(out / "model.safetensors.partial"), metadata={"format": "pt"})
    (out / "model.safetensors.partial").rename(out / "model.safetensors")
    return out

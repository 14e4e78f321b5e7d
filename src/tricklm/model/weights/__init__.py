"""How a model's weights are stored and read: file formats (safetensors; GGUF's tensors in `gguf_file`, its config
and tokenizer in `gguf_config`), loading (`loader`), block formats (`blocks`) and the projections that compute with
them (`qlinear`), and the older compact modes (`quant`). The architectures that use them are the modules above."""

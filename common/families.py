"""The model families Quiver serves natively: Llama-architecture decoders (`model_type` in
their HF `config.json`). One list, read by the model loader, `quiver models verify` and the
quantizers."""

LLAMA_FAMILY = ("llama", "mistral", "qwen2")

"""Model tools: fetch the real SmolLM2, build the tiny test model, verify a model directory."""

DEFAULT_SMOLLM2_DIR = "models/smollm2-135m-instruct"
DEFAULT_TINY_DIR = "models/tiny-llama"

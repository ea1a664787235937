"""The model server: OpenAI + KServe v2 API over native, vLLM, ONNX Runtime and Triton engines."""

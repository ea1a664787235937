"""One `EngineClient` per engine: native (default), vllm, onnx, triton."""

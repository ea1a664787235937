"""Checkpoint optimization: int8, AWQ, ONNX, TensorRT and distilled artifacts with manifests."""

"""Optimization methods. Each module defines one `Method` (see `base.py`); `METHODS` maps a
CLI name to the module that holds it, imported only when that method runs."""

METHODS: dict[str, str] = {
    "int8": "optimize.methods.int8",
    "awq": "optimize.methods.awq",
    "onnx": "optimize.methods.onnx",
    "tensorrt": "optimize.methods.tensorrt",
    "distill": "optimize.methods.distill",
}

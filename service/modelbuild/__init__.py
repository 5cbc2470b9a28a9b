"""The model builder: ONNX graphs written directly from weights (GGUF, safetensors), quantized and compiled into
bundles."""

"""Running compiled artifacts in ONNX Runtime: session options, native ops, measurement."""

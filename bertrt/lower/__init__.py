"""Lowerings of the IR: to PyTorch (training) and to ONNX (inference)."""

"""fxquant: FX graph mode quantization for PyTorch, rebuilt on plain dtypes."""
__version__ = "0.1.0"

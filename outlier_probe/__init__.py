"""outlier-probe: activation outliers, W8A8 quantization loss and CI gates for transformer checkpoints."""

__version__ = "0.1.0"

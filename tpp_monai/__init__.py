"""tpp-monai: Target Parameter Pre-training (Lei et al.) for parameter-efficient fine-tuning, as MONAI bundles."""

__version__ = "0.1.0"

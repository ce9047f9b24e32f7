"""Imports every built-in PEFT method so that it registers itself (one module per method)."""

from tpp_monai.peft import adapter, adaptformer, baselines, bitfit, conv_adapter, dtl, evp, lora, ssf, vpt  # noqa: F401

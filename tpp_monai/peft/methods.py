"""Imports every built-in PEFT method so that it registers itself (one module per method), and the method sources
(``hf``: huggingface peft, imported only when a ``peft.*`` method is resolved)."""

from tpp_monai.peft import adapter, adaptformer, baselines, bitfit, conv_adapter, dtl, evp, hf, lora, ssf, vpt  # noqa: F401

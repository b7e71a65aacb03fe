"""kr_vlm: parameter-efficient fine-tuning of CLIP-style models with KRAdapter."""

__version__ = "0.1.0"

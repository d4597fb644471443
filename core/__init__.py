"""Duet: preference fine-tuning of small language models with LoRA (backend-agnostic core)."""

__version__ = "0.1.0"

"""Reference transformer models for modfx: gpt, llama, encoder, moe (see common.py for shared pieces)."""

from . import gpt, llama, encoder, moe

__all__ = ["gpt", "llama", "encoder", "moe"]

"""The fmjax Transformer and its building blocks."""

from fmjax.model.transformer import Transformer

__all__ = ['Transformer']

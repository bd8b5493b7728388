"""fmjax: pretrain and fine-tune Transformer language models with JAX and Flax."""

__version__ = "0.1.0"

"""The Python API: `fmjax.api.load(WORKDIR)` -> a LanguageModel (see fmjax/inference/api.py)."""

from fmjax.inference.api import LanguageModel, load

__all__ = ['LanguageModel', 'load']

"""The Python API: `fmjax.api.load(WORKDIR)` -> a LanguageModel (see fmjax/inference/api.py)."""

from __future__ import annotations

from typing import Sequence

from fmjax.inference import api as inference_api
from fmjax.inference.api import LanguageModel
from fmjax.runtime import platforms

__all__ = ['LanguageModel', 'load']


def load(path: str, overrides: Sequence[str] = (), step: int | None = None, mesh: str | None = None) -> LanguageModel:
  """fmjax.inference.api.load after choosing JAX's platforms as the commands do (fmjax/runtime/platforms.py:
  a JAX_PLATFORMS of your own wins; off TPU hosts libtpu is not loaded)."""
  platforms.choose()
  return inference_api.load(path, overrides, step, mesh)

"""Qwen2 / Qwen2.5 family: the LLaMA layout (llama.py) plus biases on the q, k and v projections.

Qwen2's attention always has q/k/v biases and no o-projection or MLP bias (model.attention_bias).
fmjax has no per-layer sliding windows yet: a config.json whose layers would use one is refused.
"""

from __future__ import annotations

import sys

from fmjax.convert.families import llama, register
from fmjax.convert.mapping import ConversionError

NAME = 'qwen2'
ARCHITECTURE = 'Qwen2ForCausalLM'
MODEL_TYPES = ('qwen2',)
TITLES = ('Qwen2',)
IGNORED = llama.IGNORED
OPTIONAL_PREFIX = ''
rules = llama.rules   # its table adds the q/k/v biases of model.attention_bias


def mismatch(m) -> str | None:
  """Why an fmjax model config is not Qwen2-style, or None."""
  return llama.mismatch(m, attention_bias=True, title='Qwen2', window=False)


def refuse_sliding_window(hf: dict) -> None:
  """One line when use_sliding_window puts a window shorter than the context on some layer (transformers:
  layer_types, else the layers from max_window_layers on)."""
  window, n_pos = hf.get('sliding_window'), hf.get('max_position_embeddings', 32768)
  if not hf.get('use_sliding_window') or window is None or window >= n_pos:
    return
  n = hf.get('num_hidden_layers', 0)
  types = hf.get('layer_types') or ['sliding_attention' if i >= hf.get('max_window_layers', 28) else 'full_attention'
                                    for i in range(n)]
  sliding = [i for i, t in enumerate(types) if t == 'sliding_attention']
  if sliding:
    raise ConversionError(f'config.json: use_sliding_window=true with sliding_window={window} < '
                          f'max_position_embeddings={n_pos} (layers {sliding[0]}..{sliding[-1]}); fmjax model '
                          'configs have no per-layer sliding window yet')


def no_window(m) -> dict:
  """The config.json keys of a model without sliding windows."""
  return dict(use_sliding_window=False, sliding_window=None, max_window_layers=m.num_layers)


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config (Qwen2 has no attention_bias / mlp_bias keys: it always has
  q/k/v biases)."""
  out = dict(llama.hf_config(m, ARCHITECTURE, 'qwen2'), **no_window(m))
  del out['attention_bias'], out['mlp_bias']
  return out


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from a Qwen2 / Qwen2.5 config.json."""
  hf = dict(dict(max_position_embeddings=32768), **hf)   # transformers' default
  llama.refuse_values(hf, (('hidden_act', ('silu', None)),), 'Qwen2')
  refuse_sliding_window(hf)
  return dict(llama.model_options(hf), attention_bias=True)


register(sys.modules[__name__])

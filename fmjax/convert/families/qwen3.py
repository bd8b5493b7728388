"""Qwen3 family (dense): the LLaMA layout (llama.py) plus an RMSNorm of q and of k over head_dim, per head,
before RoPE (model.qk_norm); head_dim is its own setting (often not d_model / num_heads).

attention_bias=true in a Qwen3 config.json also puts a bias on the o projection, which fmjax lacks: refused.
"""

from __future__ import annotations

import sys

from fmjax.convert.families import llama, qwen2, register

NAME = 'qwen3'
ARCHITECTURE = 'Qwen3ForCausalLM'
MODEL_TYPES = ('qwen3',)
TITLES = ('Qwen3',)
IGNORED = llama.IGNORED
OPTIONAL_PREFIX = ''
rules = llama.rules   # its table adds the q/k norm scales of model.qk_norm


def mismatch(m) -> str | None:
  """Why an fmjax model config is not Qwen3-style, or None."""
  return llama.mismatch(m, qk_norm=True, title='Qwen3', window=False)


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config."""
  out = dict(llama.hf_config(m, ARCHITECTURE, 'qwen3'), **qwen2.no_window(m))
  del out['mlp_bias']
  return out


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from a Qwen3 config.json (transformers' head_dim default is 128)."""
  hf = dict(dict(max_position_embeddings=32768), **hf)   # transformers' default
  llama.refuse_values(hf, (('hidden_act', ('silu', None)), ('attention_bias', (False, None))), 'Qwen3')
  qwen2.refuse_sliding_window(hf)
  return dict(llama.model_options(dict(hf, head_dim=hf.get('head_dim', 128))), qk_norm=True)


register(sys.modules[__name__])

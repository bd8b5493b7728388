"""Phi-3 family (`Phi3ForCausalLM`, model_type phi3): the LLaMA layout (llama.py: RMSNorm, SwiGLU, RoPE, no
biases) with fused projections in the file: `self_attn.qkv_proj` stacks the q, k and v rows
([h*hd + 2*kv*hd, d]) and `mlp.gate_up_proj` the gate rows then the up rows ([2*mlp, d]). fmjax keeps them
apart (q/k/v and wi_0/wi_1), so import splits and export stacks them again.

transformers' Phi-3 applies `sliding_window` whenever it is set (Phi-3-mini: 2047) on every layer, masked as
Mistral's is (a query sees itself and the W - 1 keys before it): a window below max_position_embeddings is
fmjax's model.sliding_window. Its long-context RoPE (longrope, the older su / yarn names) is refused.

An fmjax model of this shape is also Llama-shaped: Llama is picked first, so exporting it as Phi-3 takes
`--family phi3`.
"""

from __future__ import annotations

import sys

from fmjax.convert.families import llama, register
from fmjax.convert.mapping import ConversionError, Rule, stacked_linear

NAME = 'phi3'
ARCHITECTURE = 'Phi3ForCausalLM'
MODEL_TYPES = ('phi3',)
TITLES = ('Phi-3',)
IGNORED = llama.IGNORED
OPTIONAL_PREFIX = ''
_DEFAULTS = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, hidden_act='silu', tie_word_embeddings=False)


def mismatch(m) -> str | None:
  """Why an fmjax model config is not Phi-3-style (a sliding window on every layer is), or None."""
  why = [llama.mismatch(m, title='Phi-3')]
  if m.get('rope_scaling', 'none') != 'none':
    why.append(f"model.rope_scaling={m.rope_scaling!r} (need 'none': transformers' Phi-3 has no linear or llama3 "
               'RoPE scaling)')
  return ', '.join(w for w in why if w) or None


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config: the Llama keys, no bias flags, the window if any."""
  out = llama.hf_config(m, ARCHITECTURE, 'phi3')
  for key in ('attention_bias', 'mlp_bias', 'rope_scaling'):
    del out[key]
  out['rope_parameters'] = dict(out['rope_parameters'], partial_rotary_factor=1.0)
  return dict(out, sliding_window=int(m.get('sliding_window', 0)) or None,
              original_max_position_embeddings=m.max_seq_len, resid_pdrop=0.0, embd_pdrop=0.0)


def _refuse_rope(hf: dict) -> None:
  """One line naming the key of a RoPE fmjax's Phi-3 lacks: scaled (longrope / su / yarn / dynamic / ...) or
  partial (partial_rotary_factor below 1)."""
  for key in ('rope_scaling', 'rope_parameters'):
    params = hf.get(key) or {}
    if not isinstance(params, dict):
      raise ConversionError(f'config.json: {key}={params!r} must be an object or null')
    field = 'rope_type' if 'rope_type' in params else 'type'
    kind = params.get(field, 'default')
    if kind != 'default':
      raise ConversionError(f'config.json: {key}.{field}={kind!r} is not supported (fmjax Phi-3 has default RoPE '
                            'only: longrope / su / yarn / dynamic scaling is not implemented)')
  where = [('partial_rotary_factor', hf)] + [(f'{k}.partial_rotary_factor', hf.get(k) or {})
                                             for k in ('rope_scaling', 'rope_parameters')]
  for name, d in where:
    factor = d.get('partial_rotary_factor', 1.0)
    if factor is not None and float(factor) != 1.0:
      raise ConversionError(f'config.json: {name}={factor!r} is not supported (fmjax rotates the whole head: 1.0)')


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from a Phi-3 config.json (transformers' defaults for the keys it omits)."""
  hf = dict(_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k not in _DEFAULTS})
  llama.refuse_values(hf, (('hidden_act', ('silu',)),), 'Phi-3')
  biased = [k for k, v in hf.items() if (k == 'bias' or k.endswith('_bias')) and v]
  if biased:
    raise ConversionError(f'config.json: {biased[0]}={hf[biased[0]]!r} is not supported (Phi-3 and fmjax Phi-3 '
                          'have no biases)')
  _refuse_rope(hf)
  options = llama.model_options(hf)
  window, n_pos = hf.get('sliding_window'), hf['max_position_embeddings']
  if window is not None:
    if isinstance(window, bool) or not isinstance(window, int) or window < 1:
      raise ConversionError(f'config.json: sliding_window={window!r} must be a positive integer or null')
    if window < n_pos:   # transformers' Phi-3: a query sees itself and the window - 1 keys before it
      options['sliding_window'] = window
  return options


def rules(m) -> list:
  """llama's table with q/k/v as one qkv_proj and gate/up as one gate_up_proj."""
  d, h, kv, hd, f = m.d_model, m.num_heads, m.num_kv_heads or m.num_heads, llama.head_dim(m), m.mlp_dim
  layer = 'model.layers.{i}.'
  fused = {'self_attn.q_proj.weight': Rule(layer + 'self_attn.qkv_proj.weight',
                                           tuple(f'layers_{{i}}/attn/{n}/kernel' for n in 'qkv'),
                                           **stacked_linear((d,), [(h, hd), (kv, hd), (kv, hd)])),
           'mlp.gate_proj.weight': Rule(layer + 'mlp.gate_up_proj.weight',
                                        ('layers_{i}/mlp/wi_0/kernel', 'layers_{i}/mlp/wi_1/kernel'),
                                        **stacked_linear((d,), [(f,), (f,)]))}
  gone = ('self_attn.k_proj.weight', 'self_attn.v_proj.weight', 'mlp.up_proj.weight')
  table = []
  for rule in llama.rules(m):
    short = rule.hf.removeprefix(layer)
    if short not in gone:
      table.append(fused.get(short, rule))
  return table


register(sys.modules[__name__])

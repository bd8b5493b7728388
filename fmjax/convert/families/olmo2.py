"""OLMo 2 (`Olmo2ForCausalLM`, model_type olmo2): the LLaMA projections and SwiGLU MLP with OLMo 2's block.

Two differences from Llama, both fmjax model options: the norms follow the sublayers instead of preceding
them (post_attention_layernorm on the attention output and post_feedforward_layernorm on the MLP output,
each before its residual add, no input norm; then the final norm: model.norm_position='after'), and q/k
RMSNorms over the whole projection, q over num_heads * head_dim and k over num_kv_heads * head_dim, before
the reshape to heads and RoPE (model.qk_norm with model.qk_norm_scope='all').

attention_bias=true in an OLMo 2 config.json biases the o projection too, which fmjax lacks: refused, as
are RoPE scalings other than default and activations other than silu.
"""

from __future__ import annotations

import sys

from fmjax.convert.families import llama, register
from fmjax.convert.mapping import ConversionError, Rule, identity

NAME = 'olmo2'
ARCHITECTURE = 'Olmo2ForCausalLM'
MODEL_TYPES = ('olmo2',)
TITLES = ('OLMo 2',)
IGNORED = llama.IGNORED
OPTIONAL_PREFIX = ''
# OLMo 2's fields of llama.FEATURES_OFF, at the values it needs
_OWN = dict(norm_position='after', qk_norm_scope='all')


def mismatch(m) -> str | None:
  """Why an fmjax model config is not OLMo 2-style, or None."""
  want = dict(norm='rmsnorm', activation='swiglu', positions='rope', use_bias=False, attention_bias=False,
              qk_norm=True, rope_scaling='none', **_OWN)
  bad = [f'model.{k}={m.get(k, False)!r} (need {v!r})' for k, v in want.items() if m.get(k, False) != v]
  if m.get('sliding_window', 0):
    bad.append(f'model.sliding_window={m.sliding_window} (need 0: OLMo 2 attends the whole context)')
  bad += llama.features_on(m, allowed=tuple(_OWN))
  if m.get('kind', 'decoder') != 'decoder':
    bad.append(f'model.kind={m.kind!r} (OLMo 2 is a decoder)')
  return ', '.join(bad) or None


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config (default RoPE only: `mismatch` refuses a scaling)."""
  out = llama.hf_config(m, ARCHITECTURE, 'olmo2')
  for key in ('mlp_bias', 'rope_scaling'):   # Olmo2Config has neither
    del out[key]
  return out


def refuse_rope_scaling(hf: dict, title: str = 'OLMo 2') -> None:
  """One line naming the config.json key of a RoPE scaling other than default."""
  for key in ('rope_scaling', 'rope_parameters'):
    params = hf.get(key) or {}
    kind = params.get('rope_type', params.get('type', 'default'))
    if kind != 'default':
      raise ConversionError(f"config.json: {key}.rope_type={kind!r} is not supported (fmjax {title} needs 'default' "
                            'RoPE)')


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from an OLMo 2 config.json (transformers' defaults where keys are missing)."""
  hf = dict(dict(max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False), **hf)
  llama.refuse_values(hf, (('hidden_act', ('silu', None)), ('attention_bias', (False, None))), 'OLMo 2')
  refuse_rope_scaling(hf)
  return dict(llama.model_options(hf), qk_norm=True, **_OWN)


def qk_norm_rules(m) -> list:
  """llama's table with q/k norm scales over the whole projection (model.qk_norm_scope='all'; OLMoE too)."""
  h, kv, hd = m.num_heads, m.num_kv_heads or m.num_heads, llama.head_dim(m)
  layer = 'model.layers.{i}.'
  table = [r for r in llama.rules(m) if not r.hf.endswith(('q_norm.weight', 'k_norm.weight'))]
  return table + [Rule(layer + f'self_attn.{n}_norm.weight', (f'layers_{{i}}/attn/{n}_norm/scale',),
                       **identity((n_h * hd,))) for n, n_h in (('q', h), ('k', kv))]


def rules(m) -> list:
  """llama's embedding, projections, MLP, final norm and head with OLMo 2's two norms per layer and its
  whole-projection q/k norm scales."""
  d, layer = m.d_model, 'model.layers.{i}.'
  table = [r for r in qk_norm_rules(m) if 'layernorm' not in r.hf]
  return table + [Rule(layer + hf + '.weight', (f'layers_{{i}}/{fm}/scale',), **identity((d,)))
                  for hf, fm in (('post_attention_layernorm', 'attn_post_norm'),
                                 ('post_feedforward_layernorm', 'mlp_post_norm'))]


register(sys.modules[__name__])

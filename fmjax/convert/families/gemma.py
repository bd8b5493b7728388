"""Gemma 2 (`Gemma2ForCausalLM`) and Gemma 3 text (`Gemma3ForCausalLM`, model_type gemma3_text).

Both are the LLaMA projections with Gemma's block: sandwich norms (input / post-attention /
pre-feedforward / post-feedforward RMSNorms, model.norm_position='sandwich'), RMSNorm scaling by
1 + w (model.norm_unit_offset), embeddings times sqrt(d_model) (model.embed_scale), a tanh-GELU gated
MLP (model.activation='geglu'), scores scaled by query_pre_attn_scalar ** -0.5 (model.query_scale_dim),
tied embeddings, and local (sliding-window) and global layers from `layer_types`
(model.sliding_window, model.window_pattern: the shortest repeating period, 'LG' for Gemma 2,
'LLLLLG' for Gemma 3). Gemma 2 soft-caps attention scores and final logits; Gemma 3 instead has q/k
RMSNorms (model.qk_norm, also 1 + w) and a RoPE base of its own on local layers (model.rope_local_theta).
"""

from __future__ import annotations

from fmjax.convert.families import llama, register
from fmjax.convert.mapping import ConversionError, Rule, identity

IGNORED = llama.IGNORED
OPTIONAL_PREFIX = ''
_ACTIVATIONS = ('gelu_pytorch_tanh', 'gelu_tanh')


def pattern_of(layer_types, num_layers: int, where: str) -> str:
  """'LG'-style window_pattern of transformers' layer_types ('' when every layer is local); refuses a list
  that no period repeats (fmjax repeats its pattern over the depth)."""
  if layer_types is None:
    raise ConversionError(f'config.json: {where} needs layer_types (sliding_attention / full_attention per layer)')
  letters = {'sliding_attention': 'L', 'full_attention': 'G'}
  if len(layer_types) != num_layers or any(t not in letters for t in layer_types):
    raise ConversionError(f'config.json: layer_types must list sliding_attention or full_attention for each of the '
                          f'{num_layers} layers, got {layer_types!r}')
  word = ''.join(letters[t] for t in layer_types)
  period = next(p for p in range(1, len(word) + 1) if all(word[i] == word[i % p] for i in range(len(word))))
  pattern = word[:period]
  return '' if pattern == 'L' else pattern


def _layer_types(m) -> list[str]:
  from fmjax.model import attention_spec  # pylint: disable=import-outside-toplevel
  return ['sliding_attention' if attention_spec.is_local(m, i) else 'full_attention' for i in range(m.num_layers)]


def _mismatch(m, title: str, qk_norm: bool) -> str | None:
  want = dict(norm='rmsnorm', activation='geglu', positions='rope', use_bias=False, attention_bias=False,
              qk_norm=qk_norm, norm_position='sandwich', norm_unit_offset=True, embed_scale=True, tie_embeddings=True,
              rope_scaling='none')
  bad = [f'model.{k}={m.get(k, False)!r} (need {v!r})' for k, v in want.items() if m.get(k, False) != v]
  if m.get('kind', 'decoder') != 'decoder':
    bad.append(f'model.kind={m.kind!r} ({title} is a decoder)')
  if not m.get('sliding_window', 0):
    bad.append(f'model.sliding_window=0 ({title} has local layers)')
  if not qk_norm and m.get('rope_local_theta', 0.0):
    bad.append(f'model.rope_local_theta={m.rope_local_theta} ({title} has one RoPE base)')
  if qk_norm and (m.get('attn_logit_softcap', 0.0) or m.get('final_logit_softcap', 0.0)):
    bad.append(f'model soft-caps ({title} has none)')
  if m.get('qk_norm_scope', 'head') != 'head':
    bad.append(f"model.qk_norm_scope={m.qk_norm_scope!r} (need 'head': {title} norms q and k per head)")
  bad += llama.experts_on(m)
  return ', '.join(bad) or None


def _hf_config(m, architecture: str, model_type: str) -> dict:
  hd = llama.head_dim(m)
  return dict(
      architectures=[architecture], model_type=model_type, vocab_size=m.vocab_size, hidden_size=m.d_model,
      intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads or m.num_heads, head_dim=hd, hidden_activation='gelu_pytorch_tanh',
      max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, attention_bias=False, attention_dropout=0.0,
      query_pre_attn_scalar=m.get('query_scale_dim', 0) or hd, sliding_window=int(m.sliding_window),
      layer_types=_layer_types(m), tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _options(hf: dict, title: str) -> dict:
  """The fmjax options both Gemmas share."""
  llama.refuse_values(hf, (('hidden_activation', _ACTIVATIONS), ('attention_bias', (False, None))), title)
  if hf.get('tie_word_embeddings', True) is not True:
    raise ConversionError(f'config.json: tie_word_embeddings={hf["tie_word_embeddings"]!r}: fmjax {title} ties the '
                          'output head to the embeddings')
  d, h, n = hf['hidden_size'], hf['num_attention_heads'], hf['num_hidden_layers']
  hd = hf.get('head_dim') or d // h
  window, n_pos = hf.get('sliding_window'), hf.get('max_position_embeddings', 8192)
  if not isinstance(window, int) or isinstance(window, bool) or window < 1:
    raise ConversionError(f'config.json: sliding_window={window!r} must be a positive integer')
  scalar = hf.get('query_pre_attn_scalar', hd)
  return dict(
      vocab_size=hf['vocab_size'], d_model=d, num_layers=n, num_heads=h,
      num_kv_heads=hf.get('num_key_value_heads') or h,
      head_dim=0 if hd * h == d else hd, mlp_dim=hf['intermediate_size'], max_seq_len=n_pos, activation='geglu',
      norm='rmsnorm', norm_eps=float(hf.get('rms_norm_eps', 1e-6)), norm_position='sandwich', norm_unit_offset=True,
      embed_scale=True, positions='rope', use_bias=False, tie_embeddings=True, sliding_window=window,
      window_pattern=pattern_of(hf.get('layer_types'), n, title),
      query_scale_dim=0 if int(scalar) == hd else int(scalar))


def _rules(m) -> list:
  """llama's projections and embedding with Gemma's four norms per layer (no lm_head: tied)."""
  d = m.d_model
  layer = 'model.layers.{i}.'
  norms = (('input_layernorm', 'attn_norm'), ('post_attention_layernorm', 'attn_post_norm'),
           ('pre_feedforward_layernorm', 'mlp_norm'), ('post_feedforward_layernorm', 'mlp_post_norm'))
  table = [r for r in llama.rules(m) if 'layernorm' not in r.hf]
  return table + [Rule(layer + hf + '.weight', (f'layers_{{i}}/{fm}/scale',), **identity((d,))) for hf, fm in norms]


def _rope_theta(params, name: str) -> float:
  """rope_theta of one layer type's rope_parameters (transformers 5), refusing scalings fmjax lacks there."""
  kind = params.get('rope_type', 'default')
  if kind != 'default':
    raise ConversionError(f"config.json: rope_parameters.{name}.rope_type={kind!r}: fmjax Gemma 3 supports 'default' "
                          'RoPE on each layer type')
  return float(params.get('rope_theta', 10000.0))


class _Gemma:
  """What both Gemmas register: the shared block's mapping; `mismatch` and `hf_config` with their title."""
  TITLE = ''
  QK_NORM = False
  IGNORED = IGNORED
  OPTIONAL_PREFIX = OPTIONAL_PREFIX
  rules = staticmethod(_rules)

  @classmethod
  def mismatch(cls, m) -> str | None:
    return _mismatch(m, cls.TITLE, qk_norm=cls.QK_NORM)

  @classmethod
  def hf_config(cls, m) -> dict:
    return dict(_hf_config(m, cls.ARCHITECTURE, cls.MODEL_TYPES[0]), rope_theta=float(m.rope_theta))


class Gemma2(_Gemma):
  """Gemma 2: soft-capped attention scores and final logits, alternating local and global layers."""
  NAME = 'gemma2'
  ARCHITECTURE = 'Gemma2ForCausalLM'
  MODEL_TYPES = ('gemma2',)
  TITLES = ('Gemma 2',)
  TITLE = 'Gemma 2'

  @classmethod
  def to_hf_config(cls, m) -> dict:
    return dict(cls.hf_config(m), attn_logit_softcapping=m.get('attn_logit_softcap', 0.0) or None,
                final_logit_softcapping=m.get('final_logit_softcap', 0.0) or None)

  @staticmethod
  def from_hf_config(hf: dict) -> dict:
    hf = dict(dict(max_position_embeddings=8192, sliding_window=4096), **hf)
    if hf.get('rope_scaling') or (hf.get('rope_parameters') or {}).get('rope_type', 'default') != 'default':
      raise ConversionError('config.json: rope scaling on Gemma 2 is not supported by fmjax (none)')
    theta = hf.get('rope_theta', (hf.get('rope_parameters') or {}).get('rope_theta', 10000.0))
    return dict(_options(hf, 'Gemma 2'), rope_theta=float(theta),
                attn_logit_softcap=float(hf.get('attn_logit_softcapping') or 0.0),
                final_logit_softcap=float(hf.get('final_logit_softcapping') or 0.0))


class Gemma3(_Gemma):
  """Gemma 3 (text): q/k RMSNorms, local layers with a RoPE base of their own, no soft-caps."""
  NAME = 'gemma3'
  ARCHITECTURE = 'Gemma3ForCausalLM'
  MODEL_TYPES = ('gemma3_text',)
  TITLES = ('Gemma 3',)
  TITLE = 'Gemma 3'
  QK_NORM = True

  @classmethod
  def to_hf_config(cls, m) -> dict:
    local = float(m.get('rope_local_theta', 0.0) or m.rope_theta)
    return dict(cls.hf_config(m), rope_local_base_freq=local, attn_logit_softcapping=None,
                final_logit_softcapping=None,
                rope_parameters={'full_attention': dict(rope_type='default', rope_theta=float(m.rope_theta)),
                                 'sliding_attention': dict(rope_type='default', rope_theta=local)})

  @staticmethod
  def from_hf_config(hf: dict) -> dict:
    hf = dict(dict(max_position_embeddings=131072, sliding_window=4096), **hf)
    for key in ('attn_logit_softcapping', 'final_logit_softcapping'):
      if hf.get(key):
        raise ConversionError(f'config.json: {key}={hf[key]!r}: fmjax Gemma 3 has no soft-caps (as transformers)')
    if hf.get('rope_scaling'):
      raise ConversionError(f'config.json: rope_scaling={hf["rope_scaling"]!r}: fmjax Gemma 3 supports default RoPE '
                            'only')
    params = hf.get('rope_parameters') or {}
    if 'full_attention' in params or 'sliding_attention' in params:
      theta = _rope_theta(params.get('full_attention', {}), 'full_attention')
      local = _rope_theta(params.get('sliding_attention', {}), 'sliding_attention')
    else:
      theta = float(hf.get('rope_theta', params.get('rope_theta', 1e6)))
      local = float(hf.get('rope_local_base_freq', 10000.0))
    options = _options(hf, 'Gemma 3')
    return dict(options, qk_norm=True, rope_theta=theta, rope_local_theta=0.0 if local == theta else local)


register(Gemma2)
register(Gemma3)

"""LLaMA family (also Mistral, with its sliding window): rmsnorm, SwiGLU, RoPE, no biases.

fmjax's RoPE is the Hugging Face half-split (rotate_half) layout, so q/k need no permutation.
The Qwen families (qwen2.py, qwen3.py) are this layout plus q/k/v biases or q/k norms: they share
`mismatch`, `hf_config`, `model_options` and `rules` from here.
"""

from __future__ import annotations

import sys

from fmjax.convert.families import register
from fmjax.convert.mapping import ConversionError, Rule, identity, linear, reshape

NAME = 'llama'
ARCHITECTURE = 'LlamaForCausalLM'
MODEL_TYPES = ('llama', 'mistral')
TITLES = ('Llama', 'Mistral')
IGNORED = (r'rotary_emb\.inv_freq$',)
OPTIONAL_PREFIX = ''


# Fields of Gemma's block (gemma.py), OLMo 2's (olmo2.py) and the mixture-of-experts families' (mixtral.py,
# qwen3_moe.py, olmoe.py) at the values that switch them off, with the families that switch them on: a
# Llama-layout export (Llama, Mistral, Qwen2, Qwen3) needs every one off.
FEATURES_OFF = dict(norm_position=('pre', 'Gemma or OLMo 2'), norm_unit_offset=(False, 'Gemma'),
                    embed_scale=(False, 'Gemma'), query_scale_dim=(0, 'Gemma'), attn_logit_softcap=(0.0, 'Gemma'),
                    final_logit_softcap=(0.0, 'Gemma'), window_pattern=('', 'Gemma'), rope_local_theta=(0.0, 'Gemma'),
                    qk_norm_scope=('head', 'OLMo 2 or OLMoE'), num_experts=(0, 'Mixtral, Qwen3-MoE or OLMoE'))
GEMMA_DEFAULTS = {k: off for k, (off, who) in FEATURES_OFF.items() if 'Gemma' in who}


def features_on(m, allowed=()) -> list[str]:
  """One phrase per field of FEATURES_OFF (but `allowed`) that `m` switches on."""
  return [f'model.{k}={m.get(k)!r} (need {off!r}: a {who} feature)' for k, (off, who) in FEATURES_OFF.items()
          if k not in allowed and m.get(k, off) != off]


def experts_on(m) -> list[str]:
  """FEATURES_OFF's phrase for a mixture-of-experts model (model.num_experts > 0), for the dense families whose
  mismatch does not go through `features_on` (Gemma, GPT-2, BERT): an MoE model never exports as one."""
  return features_on(m, allowed=tuple(k for k in FEATURES_OFF if k != 'num_experts'))


def mismatch(m, attention_bias: bool = False, qk_norm: bool = False, title: str = 'Llama',
             window: bool = True, allowed: tuple = ()) -> str | None:
  """Why an fmjax model config is not LLaMA-style (with these q/k/v biases and q/k norms; a sliding window
  only where `window`; the fields of FEATURES_OFF in `allowed` left to the caller to check), or None."""
  want = dict(norm='rmsnorm', activation='swiglu', positions='rope', use_bias=False, attention_bias=attention_bias,
              qk_norm=qk_norm)
  bad = [f'model.{k}={m.get(k, False)!r} (need {v!r})' for k, v in want.items() if m.get(k, False) != v]
  if not window and m.get('sliding_window', 0):
    bad.append(f'model.sliding_window={m.sliding_window} (need 0: {title} exports have no sliding window here)')
  bad += features_on(m, allowed)
  if m.get('kind', 'decoder') != 'decoder':
    bad.append(f"model.kind={m.kind!r} ({title} is a decoder)")
  return ', '.join(bad) or None


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.num_heads


def _rope_parameters(m) -> dict:
  """rope_parameters of config.json (transformers 5 form, rope_theta inside)."""
  params = dict(rope_type='default' if m.rope_scaling == 'none' else m.rope_scaling, rope_theta=float(m.rope_theta))
  if m.rope_scaling in ('linear', 'llama3'):
    params['factor'] = float(m.rope_factor)
  if m.rope_scaling == 'llama3':
    params.update(low_freq_factor=float(m.rope_low_freq_factor), high_freq_factor=float(m.rope_high_freq_factor),
                  original_max_position_embeddings=int(m.rope_original_max_len))
  return params


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config (RoPE scaling in both the new and the legacy key, identical):
  LlamaForCausalLM, or MistralForCausalLM with `sliding_window` when model.sliding_window is set."""
  if m.get('sliding_window', 0):
    return dict(hf_config(m, 'MistralForCausalLM', 'mistral'), sliding_window=int(m.sliding_window))
  return hf_config(m, ARCHITECTURE, 'llama')


def hf_config(m, architecture: str, model_type: str) -> dict:
  """The Llama-layout config.json of `m` as class `architecture` of `model_type`."""
  rope = _rope_parameters(m)
  legacy = None if m.rope_scaling == 'none' else {k: v for k, v in rope.items() if k != 'rope_theta'}
  return dict(
      architectures=[architecture], model_type=model_type, vocab_size=m.vocab_size, hidden_size=m.d_model,
      intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads or m.num_heads, head_dim=head_dim(m), hidden_act='silu',
      max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
      rope_parameters=rope, rope_scaling=legacy,
      tie_word_embeddings=bool(m.tie_embeddings), attention_bias=False, mlp_bias=False,
      attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


_ROPE_KEYS = ('rope_type', 'factor', 'low_freq_factor', 'high_freq_factor', 'original_max_position_embeddings')


def _rope_options(hf: dict) -> dict:
  """fmjax rope_* options from config.json's rope_parameters / legacy rope_scaling / rope_theta."""
  params = dict(hf.get('rope_parameters') or {})
  legacy = dict(hf.get('rope_scaling') or {})
  for d in (params, legacy):
    if 'type' in d and 'rope_type' not in d:
      d['rope_type'] = d.pop('type')
  if params and legacy:   # transformers would apply the legacy one: refuse a file whose two forms disagree
    for key in _ROPE_KEYS:
      if key in params and key in legacy and params[key] != legacy[key]:
        raise ConversionError(f'config.json: rope_parameters.{key}={params[key]!r} contradicts rope_scaling.{key}='
                              f'{legacy[key]!r}; fix the file so that both say the same')
  theta = hf.get('rope_theta')
  if theta is not None and 'rope_theta' in params and float(params['rope_theta']) != float(theta):
    raise ConversionError(f'config.json: rope_parameters.rope_theta={params["rope_theta"]!r} contradicts '
                          f'rope_theta={theta!r}; fix the file so that both say the same')
  rope = {**params, **legacy}
  kind = rope.get('rope_type', 'default')
  out = dict(rope_theta=float(params.get('rope_theta', theta if theta is not None else 10000.0)),
             rope_scaling='none' if kind == 'default' else kind)
  if kind not in ('default', 'linear', 'llama3'):
    raise ConversionError(f'config.json: rope_parameters / rope_scaling rope_type={kind!r}: rope scaling {kind!r} is '
                          'not supported by fmjax (default, linear, llama3)')
  def need(key):
    if key not in rope:
      raise ConversionError(f'config.json: rope scaling {kind!r} needs rope_parameters.{key}')
    return float(rope[key])
  if kind in ('linear', 'llama3'):
    out['rope_factor'] = need('factor')
  if kind == 'llama3':
    out.update(rope_low_freq_factor=need('low_freq_factor'), rope_high_freq_factor=need('high_freq_factor'),
               rope_original_max_len=int(rope.get('original_max_position_embeddings',
                                                  hf.get('max_position_embeddings', 8192))))
  return out


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from a Llama/Mistral config.json."""
  refuse_values(hf, (('hidden_act', ('silu',)), ('attention_bias', (False, None)), ('mlp_bias', (False, None))),
                'LLaMA')
  options = model_options(hf)
  if hf.get('model_type') == 'mistral':
    options.update(window_option(hf))
  return options          # (LlamaForCausalLM reads no sliding_window: transformers runs it without one)


def window_option(hf: dict) -> dict:
  """{'sliding_window': W} when config.json's sliding_window W is below max_position_embeddings, else {}
  (transformers' Mistral and Mixtral: a query sees itself and the W - 1 keys before it, on every layer)."""
  window, n_pos = hf.get('sliding_window'), hf.get('max_position_embeddings', 2048)
  if window is None:
    return {}
  if isinstance(window, bool) or not isinstance(window, int) or window < 1:
    raise ConversionError(f'config.json: sliding_window={window!r} must be a positive integer or null')
  return dict(sliding_window=window) if window < n_pos else {}


def refuse_values(hf: dict, allowed, title: str) -> None:
  """One line naming the first config.json key of `allowed` ((key, accepted values), ...) set otherwise."""
  for key, ok in allowed:
    if hf.get(key) not in ok:
      raise ConversionError(f'config.json: {key}={hf.get(key)!r} is not supported (fmjax {title} needs {ok[0]!r})')


def model_options(hf: dict) -> dict:
  """fmjax model options of a Llama-layout config.json (its family has refused what fmjax lacks)."""
  n_pos = hf.get('max_position_embeddings', 2048)
  d, h = hf['hidden_size'], hf['num_attention_heads']
  hd = hf.get('head_dim') or d // h
  return dict(vocab_size=hf['vocab_size'], d_model=d, num_layers=hf['num_hidden_layers'], num_heads=h,
              num_kv_heads=hf.get('num_key_value_heads') or h, head_dim=0 if hd * h == d else hd,
              mlp_dim=hf['intermediate_size'], max_seq_len=n_pos, activation='swiglu', norm='rmsnorm',
              norm_eps=float(hf.get('rms_norm_eps', 1e-6)), positions='rope', use_bias=False,
              tie_embeddings=bool(hf.get('tie_word_embeddings', False)), **_rope_options(hf))


def rules(m) -> list:
  """The mapping table for an fmjax model config."""
  d, h, kv, hd, f, v = m.d_model, m.num_heads, m.num_kv_heads or m.num_heads, head_dim(m), m.mlp_dim, m.vocab_size
  layer = 'model.layers.{i}.'
  table = [
      Rule('model.embed_tokens.weight', ('embedding',), **identity((v, d))),
      Rule(layer + 'input_layernorm.weight', ('layers_{i}/attn_norm/scale',), **identity((d,))),
      Rule(layer + 'self_attn.q_proj.weight', ('layers_{i}/attn/q/kernel',), **linear((d,), (h, hd))),
      Rule(layer + 'self_attn.k_proj.weight', ('layers_{i}/attn/k/kernel',), **linear((d,), (kv, hd))),
      Rule(layer + 'self_attn.v_proj.weight', ('layers_{i}/attn/v/kernel',), **linear((d,), (kv, hd))),
      Rule(layer + 'self_attn.o_proj.weight', ('layers_{i}/attn/o/kernel',), **linear((h, hd), (d,))),
      Rule(layer + 'post_attention_layernorm.weight', ('layers_{i}/mlp_norm/scale',), **identity((d,))),
      Rule(layer + 'mlp.gate_proj.weight', ('layers_{i}/mlp/wi_0/kernel',), **linear((d,), (f,))),
      Rule(layer + 'mlp.up_proj.weight', ('layers_{i}/mlp/wi_1/kernel',), **linear((d,), (f,))),
      Rule(layer + 'mlp.down_proj.weight', ('layers_{i}/mlp/wo/kernel',), **linear((f,), (d,))),
      Rule('model.norm.weight', ('final_norm/scale',), **identity((d,))),
  ]
  if m.get('attention_bias', False):   # Qwen2: q, k and v biases
    table += [Rule(layer + f'self_attn.{n}_proj.bias', (f'layers_{{i}}/attn/{n}/bias',),
                   **reshape((n_h * hd,), (n_h, hd))) for n, n_h in (('q', h), ('k', kv), ('v', kv))]
  if m.get('qk_norm', False):          # Qwen3: RMSNorm scales of q and k over head_dim
    table += [Rule(layer + f'self_attn.{n}_norm.weight', (f'layers_{{i}}/attn/{n}_norm/scale',), **identity((hd,)))
              for n in 'qk']
  if not m.tie_embeddings:
    table.append(Rule('lm_head.weight', ('lm_head/kernel',), **linear((d,), (v,))))
  return table


register(sys.modules[__name__])

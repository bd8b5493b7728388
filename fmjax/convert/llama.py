"""LLaMA family (also Mistral without a sliding window): rmsnorm, SwiGLU, RoPE, no biases.

fmjax's RoPE is the Hugging Face half-split (rotate_half) layout, so q/k need no permutation.
"""

from __future__ import annotations

from fmjax.convert.mapping import ConversionError, Rule, identity, linear

NAME = 'llama'
ARCHITECTURE = 'LlamaForCausalLM'
MODEL_TYPES = ('llama', 'mistral')
IGNORED = (r'rotary_emb\.inv_freq$',)
OPTIONAL_PREFIX = ''


def mismatch(m) -> str | None:
  """Why an fmjax model config is not LLaMA-style, or None."""
  want = dict(norm='rmsnorm', activation='swiglu', positions='rope', use_bias=False)
  bad = [f'model.{k}={m[k]!r} (need {v!r})' for k, v in want.items() if m[k] != v]
  return ', '.join(bad) or None


def head_dim(m) -> int:
  return m.head_dim or m.d_model // m.num_heads


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config."""
  return dict(
      architectures=[ARCHITECTURE], model_type='llama', vocab_size=m.vocab_size, hidden_size=m.d_model,
      intermediate_size=m.mlp_dim, num_hidden_layers=m.num_layers, num_attention_heads=m.num_heads,
      num_key_value_heads=m.num_kv_heads or m.num_heads, head_dim=head_dim(m), hidden_act='silu',
      max_position_embeddings=m.max_seq_len, rms_norm_eps=m.norm_eps, rope_theta=m.rope_theta,
      rope_parameters=dict(rope_type='default', rope_theta=m.rope_theta), rope_scaling=None,
      tie_word_embeddings=bool(m.tie_embeddings), attention_bias=False, mlp_bias=False,
      attention_dropout=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def _rope_theta(hf: dict) -> float:
  params = hf.get('rope_parameters') or {}
  scaling = hf.get('rope_scaling') or {}
  kind = params.get('rope_type', 'default') if params else scaling.get('rope_type', scaling.get('type', 'default'))
  if kind != 'default':
    raise ConversionError(f'config.json: rope scaling {kind!r} is not supported by fmjax (only plain RoPE)')
  return float(params.get('rope_theta', hf.get('rope_theta', 10000.0)))


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from a Llama/Mistral config.json."""
  for key, ok in (('hidden_act', ('silu',)), ('attention_bias', (False, None)), ('mlp_bias', (False, None))):
    if hf.get(key) not in ok:
      raise ConversionError(f'config.json: {key}={hf.get(key)!r} is not supported (fmjax LLaMA needs {ok[0]!r})')
  window, n_pos = hf.get('sliding_window'), hf.get('max_position_embeddings', 2048)
  if window is not None and window < n_pos:
    raise ConversionError(f'config.json: sliding_window={window} < max_position_embeddings={n_pos}; fmjax '
                          'attention has no sliding window')
  d, h = hf['hidden_size'], hf['num_attention_heads']
  hd = hf.get('head_dim') or d // h
  return dict(vocab_size=hf['vocab_size'], d_model=d, num_layers=hf['num_hidden_layers'], num_heads=h,
              num_kv_heads=hf.get('num_key_value_heads') or h, head_dim=0 if hd * h == d else hd,
              mlp_dim=hf['intermediate_size'], max_seq_len=n_pos, activation='swiglu', norm='rmsnorm',
              norm_eps=float(hf.get('rms_norm_eps', 1e-6)), positions='rope', rope_theta=_rope_theta(hf),
              use_bias=False, tie_embeddings=bool(hf.get('tie_word_embeddings', False)))


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
  if not m.tie_embeddings:
    table.append(Rule('lm_head.weight', ('lm_head/kernel',), **linear((d,), (v,))))
  return table

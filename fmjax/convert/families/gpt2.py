"""GPT-2 family: layernorm, GELU (tanh), learned positions, biases; Conv1D weights are [in, out]."""

from __future__ import annotations

import sys

from fmjax.convert.families import llama, register
from fmjax.convert.mapping import ConversionError, Rule, conv1d, fused, identity, linear

NAME = 'gpt2'
ARCHITECTURE = 'GPT2LMHeadModel'
MODEL_TYPES = ('gpt2',)
TITLES = ('GPT-2',)
IGNORED = (r'\.attn\.(bias|masked_bias)$',)   # causal-mask buffers of older checkpoints
OPTIONAL_PREFIX = 'transformer.'              # hub GPT-2 files omit it


def mismatch(m) -> str | None:
  """Why an fmjax model config is not GPT-2-style, or None."""
  want = dict(norm='layernorm', activation='gelu', positions='learned', use_bias=True)
  bad = [f'model.{k}={m[k]!r} (need {v!r})' for k, v in want.items() if m[k] != v]
  if m.get('kind', 'decoder') != 'decoder':
    bad.append(f"model.kind={m.kind!r} (GPT-2 is a decoder)")
  if m.num_kv_heads not in (0, m.num_heads):
    bad.append(f'model.num_kv_heads={m.num_kv_heads} (GPT-2 has no grouped KV heads)')
  if m.head_dim not in (0, m.d_model // m.num_heads):
    bad.append(f'model.head_dim={m.head_dim} (GPT-2 needs d_model/num_heads)')
  if m.get('sliding_window', 0):
    bad.append(f'model.sliding_window={m.sliding_window} (GPT-2 attends the whole context)')
  bad += [f'model.{k}={m.get(k)!r} (need {v!r}: a Gemma feature)' for k, v in llama.GEMMA_DEFAULTS.items()
          if k != 'norm_position' and m.get(k, v) != v]
  bad += llama.experts_on(m)
  return ', '.join(bad) or None


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config."""
  return dict(
      architectures=[ARCHITECTURE], model_type='gpt2', vocab_size=m.vocab_size, n_embd=m.d_model,
      n_layer=m.num_layers, n_head=m.num_heads, n_inner=m.mlp_dim, n_positions=m.max_seq_len,
      layer_norm_epsilon=m.norm_eps, activation_function='gelu_new', tie_word_embeddings=bool(m.tie_embeddings),
      scale_attn_weights=True, scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False,
      resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, pad_token_id=0, bos_token_id=1, eos_token_id=2)


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from a GPT-2 config.json."""
  act = hf.get('activation_function', 'gelu_new')
  if act not in ('gelu_new', 'gelu_pytorch_tanh'):
    raise ConversionError(f'config.json: activation_function={act!r} is not supported (fmjax uses tanh GELU)')
  if not hf.get('scale_attn_weights', True) or hf.get('scale_attn_by_inverse_layer_idx', False):
    raise ConversionError('config.json: only scale_attn_weights=true, scale_attn_by_inverse_layer_idx=false '
                          'is supported')
  d = hf['n_embd']
  return dict(vocab_size=hf['vocab_size'], d_model=d, num_layers=hf['n_layer'], num_heads=hf['n_head'],
              num_kv_heads=0, head_dim=0, mlp_dim=hf.get('n_inner') or 4 * d, max_seq_len=hf['n_positions'],
              activation='gelu', norm='layernorm', norm_eps=float(hf.get('layer_norm_epsilon', 1e-5)),
              positions='learned', use_bias=True, tie_embeddings=bool(hf.get('tie_word_embeddings', True)))


def rules(m) -> list:
  """The mapping table for an fmjax model config."""
  d, h, f, v = m.d_model, m.num_heads, m.mlp_dim, m.vocab_size
  hd = d // h
  layer = 'transformer.h.{i}.'
  norm = lambda hf, fm: [Rule(hf + '.weight', (fm + '/scale',), **identity((d,))),
                         Rule(hf + '.bias', (fm + '/bias',), **identity((d,)))]
  qkv = tuple(f'layers_{{i}}/attn/{n}' for n in 'qkv')
  table = [
      Rule('transformer.wte.weight', ('embedding',), **identity((v, d))),
      Rule('transformer.wpe.weight', ('pos_embedding',), **identity((m.max_seq_len, d))),
      *norm(layer + 'ln_1', 'layers_{i}/attn_norm'),
      Rule(layer + 'attn.c_attn.weight', tuple(p + '/kernel' for p in qkv), **fused(3, (d,), (h, hd))),
      Rule(layer + 'attn.c_attn.bias', tuple(p + '/bias' for p in qkv), **fused(3, (), (h, hd))),
      Rule(layer + 'attn.c_proj.weight', ('layers_{i}/attn/o/kernel',), **conv1d((h, hd), (d,))),
      Rule(layer + 'attn.c_proj.bias', ('layers_{i}/attn/o/bias',), **identity((d,))),
      *norm(layer + 'ln_2', 'layers_{i}/mlp_norm'),
      Rule(layer + 'mlp.c_fc.weight', ('layers_{i}/mlp/wi/kernel',), **conv1d((d,), (f,))),
      Rule(layer + 'mlp.c_fc.bias', ('layers_{i}/mlp/wi/bias',), **identity((f,))),
      Rule(layer + 'mlp.c_proj.weight', ('layers_{i}/mlp/wo/kernel',), **conv1d((f,), (d,))),
      Rule(layer + 'mlp.c_proj.bias', ('layers_{i}/mlp/wo/bias',), **identity((d,))),
      *norm('transformer.ln_f', 'final_norm'),
  ]
  if not m.tie_embeddings:  # GPT2LMHeadModel's head is an nn.Linear
    table.append(Rule('lm_head.weight', ('lm_head/kernel',), **linear((d,), (v,))))
  return table


register(sys.modules[__name__])

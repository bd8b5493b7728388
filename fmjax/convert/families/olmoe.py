"""OLMoE (`OlmoeForCausalLM`, model_type olmoe): the LLaMA block (llama.py: pre-norm, RoPE, no biases) with
OLMo 2's q/k RMSNorms over the whole projection before the reshape to heads (model.qk_norm_scope='all', as
olmo2.py; but OLMoE's norms precede the sublayers) and a mixture-of-experts MLP on every layer: softmax top-k
over num_experts SwiGLU experts of width intermediate_size (model.mlp_dim), the raw top-k probabilities
unless norm_topk_prob (model.moe_renormalize).

router_aux_loss_coef is model.moe_aux_loss (no router z-loss in transformers: 0 on import). clip_qkv
(clamping q, k and v), attention_bias, a head_dim other than hidden_size / num_attention_heads and RoPE
scaling are refused.
"""

from __future__ import annotations

import sys

from fmjax.convert.families import llama, moe_experts, olmo2, register
from fmjax.convert.mapping import ConversionError

NAME = 'olmoe'
ARCHITECTURE = 'OlmoeForCausalLM'
MODEL_TYPES = ('olmoe',)
TITLES = ('OLMoE',)
IGNORED = llama.IGNORED
OPTIONAL_PREFIX = ''
_DEFAULTS = dict(max_position_embeddings=4096, rms_norm_eps=1e-5, num_experts=64, num_experts_per_tok=8,
                 router_aux_loss_coef=0.01, norm_topk_prob=False, tie_word_embeddings=False)


def mismatch(m) -> str | None:
  """Why an fmjax model config is not OLMoE-style, or None."""
  why = [llama.mismatch(m, qk_norm=True, title='OLMoE', window=False, allowed=('num_experts', 'qk_norm_scope'))]
  if m.get('qk_norm_scope', 'head') != 'all':
    why.append(f"model.qk_norm_scope={m.get('qk_norm_scope', 'head')!r} (need 'all': OLMoE norms the whole q and k "
               'projections)')
  if m.get('rope_scaling', 'none') != 'none':
    why.append(f"model.rope_scaling={m.rope_scaling!r} (need 'none' for OLMoE)")
  if m.head_dim not in (0, m.d_model // m.num_heads):
    why.append(f'model.head_dim={m.head_dim} (need 0: OLMoE heads are d_model / num_heads wide)')
  why += moe_experts.mismatch(m, 'OLMoE')
  return ', '.join(w for w in why if w) or None


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config (default RoPE only: `mismatch` refuses a scaling; intermediate_size:
  the experts' width, no layer is dense)."""
  out = llama.hf_config(m, ARCHITECTURE, 'olmoe')
  for key in ('mlp_bias', 'rope_scaling', 'head_dim'):   # OlmoeConfig has none of them
    del out[key]
  return dict(out, **moe_experts.hf_config(m), intermediate_size=moe_experts.expert_width(m),
              num_experts=int(m.num_experts), norm_topk_prob=bool(m.moe_renormalize), clip_qkv=None)


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from an OLMoE config.json (transformers' defaults for the keys it omits)."""
  hf = dict(_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k not in _DEFAULTS})
  llama.refuse_values(hf, (('hidden_act', ('silu', None)), ('attention_bias', (False, None)),
                           ('clip_qkv', (None,))), 'OLMoE')
  olmo2.refuse_rope_scaling(hf, 'OLMoE')
  width = hf['hidden_size'] // hf['num_attention_heads']
  if hf.get('head_dim') not in (None, width):
    raise ConversionError(f'config.json: head_dim={hf["head_dim"]!r} is not supported (OLMoE\'s q/k norms need '
                          f'hidden_size / num_attention_heads = {width})')
  return dict(llama.model_options(dict(hf, head_dim=width)), qk_norm=True, qk_norm_scope='all',
              **moe_experts.model_options(hf, 'num_experts', 'OLMoE', renormalize=hf['norm_topk_prob']))


def rules(m) -> list:
  """OLMo 2's q/k norm scales over the whole projection on llama's pre-norm table, with the router and experts
  (gate_proj, up_proj, down_proj) under `mlp` for the MLP."""
  return moe_experts.rules(olmo2.qk_norm_rules(m), m)


register(sys.modules[__name__])

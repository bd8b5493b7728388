"""Mixtral (`MixtralForCausalLM`, model_type mixtral): Mistral's block (llama.py: RMSNorm, RoPE, no biases, a
sliding window when config.json sets one below the context) with a mixture-of-experts MLP on every layer:
softmax top-k over num_local_experts SwiGLU experts, the top-k weights renormalised to sum 1
(model.moe_renormalize), each expert intermediate_size wide (model.mlp_dim). The file names the block
`block_sparse_moe` and the expert projections w1 (gate), w3 (up) and w2 (down); moe_experts.py maps them.

router_aux_loss_coef is model.moe_aux_loss (transformers has no router z-loss: model.moe_router_z_loss=0 on
import). router_jitter_noise (multiplicative input noise, in training only) is refused: fmjax has none.
"""

from __future__ import annotations

import sys

from fmjax.convert.families import llama, moe_experts, register
from fmjax.convert.mapping import ConversionError

NAME = 'mixtral'
ARCHITECTURE = 'MixtralForCausalLM'
MODEL_TYPES = ('mixtral',)
TITLES = ('Mixtral',)
IGNORED = llama.IGNORED
OPTIONAL_PREFIX = ''
_DEFAULTS = dict(max_position_embeddings=4096 * 32, rms_norm_eps=1e-5, num_local_experts=8, num_experts_per_tok=2,
                 router_aux_loss_coef=0.001, tie_word_embeddings=False)


def mismatch(m) -> str | None:
  """Why an fmjax model config is not Mixtral-style, or None."""
  why = [llama.mismatch(m, title='Mixtral', allowed=('num_experts',))]
  why += moe_experts.mismatch(m, 'Mixtral', renormalize=True)
  return ', '.join(w for w in why if w) or None


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config (intermediate_size: the experts' width; no layer is dense)."""
  out = llama.hf_config(m, ARCHITECTURE, 'mixtral')
  for key in ('attention_bias', 'mlp_bias'):   # MixtralConfig has neither
    del out[key]
  return dict(out, **moe_experts.hf_config(m), intermediate_size=moe_experts.expert_width(m),
              num_local_experts=int(m.num_experts), router_jitter_noise=0.0,
              sliding_window=int(m.get('sliding_window', 0)) or None)


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from a Mixtral config.json (transformers' defaults for the keys it omits)."""
  hf = dict(_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k not in _DEFAULTS})
  llama.refuse_values(hf, (('hidden_act', ('silu', None)), ('attention_bias', (False, None)),
                           ('mlp_bias', (False, None))), 'Mixtral')
  jitter = hf.get('router_jitter_noise') or 0.0
  if jitter:
    raise ConversionError(f'config.json: router_jitter_noise={jitter!r} is not supported (fmjax has no router input '
                          'noise; it only acts in training: set it to 0 to import the weights)')
  return dict(llama.model_options(hf), **llama.window_option(hf),
              **moe_experts.model_options(hf, 'num_local_experts', 'Mixtral', renormalize=True))


def rules(m) -> list:
  """llama's table with the experts of `block_sparse_moe` (w1 gate, w3 up, w2 down) for the MLP."""
  return moe_experts.rules(llama.rules(m), m, 'block_sparse_moe', ('w1', 'w3', 'w2'))


register(sys.modules[__name__])

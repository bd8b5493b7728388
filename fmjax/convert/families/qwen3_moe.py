"""Qwen3-MoE (`Qwen3MoeForCausalLM`, model_type qwen3_moe): Qwen3's block (qwen3.py: the LLaMA layout with q/k
RMSNorms per head) with mixture-of-experts MLPs: softmax top-k over num_experts SwiGLU experts of width
moe_intermediate_size (model.moe_mlp_dim), renormalised when norm_topk_prob (model.moe_renormalize).

Layer i is sparse when i is not in mlp_only_layers and (i + 1) % decoder_sparse_step == 0, else a dense
SwiGLU MLP of intermediate_size (model.mlp_dim): fmjax's model.moe_every = decoder_sparse_step and
model.moe_first_dense = K for mlp_only_layers = [0 .. K-1] (any other list is refused). A model whose layers
mix dense and MoE imports unrolled (a scanned stack needs every layer alike).

router_aux_loss_coef is model.moe_aux_loss (no router z-loss in transformers: 0 on import). A sliding window
(use_sliding_window) and attention_bias are refused.
"""

from __future__ import annotations

import sys

from fmjax.convert.families import llama, moe_experts, qwen2, register
from fmjax.convert.mapping import ConversionError

NAME = 'qwen3_moe'
ARCHITECTURE = 'Qwen3MoeForCausalLM'
MODEL_TYPES = ('qwen3_moe',)
TITLES = ('Qwen3-MoE',)
IGNORED = llama.IGNORED
OPTIONAL_PREFIX = ''
_DEFAULTS = dict(max_position_embeddings=32768, rms_norm_eps=1e-6, decoder_sparse_step=1, moe_intermediate_size=768,
                 num_experts_per_tok=8, num_experts=128, norm_topk_prob=False, router_aux_loss_coef=0.001,
                 mlp_only_layers=[], tie_word_embeddings=False)


def mismatch(m) -> str | None:
  """Why an fmjax model config is not Qwen3-MoE-style, or None."""
  why = [llama.mismatch(m, qk_norm=True, title='Qwen3-MoE', window=False, allowed=('num_experts',))]
  why += moe_experts.mismatch(m, 'Qwen3-MoE', dense_layers=True)
  return ', '.join(w for w in why if w) or None


def to_hf_config(m) -> dict:
  """The config.json of an fmjax model config (the experts under both names, see `_experts`)."""
  out = dict(llama.hf_config(m, ARCHITECTURE, 'qwen3_moe'), **qwen2.no_window(m))
  del out['mlp_bias'], out['max_window_layers']
  return dict(out, **moe_experts.hf_config(m), num_experts=int(m.num_experts), num_local_experts=int(m.num_experts),
              moe_intermediate_size=moe_experts.expert_width(m), decoder_sparse_step=int(m.moe_every),
              mlp_only_layers=list(range(int(m.moe_first_dense))), norm_topk_prob=bool(m.moe_renormalize))


def _first_dense(hf: dict) -> int:
  """K of mlp_only_layers = [0 .. K-1] (fmjax's model.moe_first_dense); any other list is refused."""
  only = hf.get('mlp_only_layers') or []
  if not isinstance(only, list) or sorted(only) != list(range(len(only))):
    raise ConversionError(f'config.json: mlp_only_layers={only!r} is not supported (fmjax makes the first K layers '
                          'dense: [] or [0, 1, .., K-1])')
  return len(only)


def _experts(hf: dict):
  """The number of experts: transformers 5 writes num_local_experts (its attribute for num_experts), older
  files num_experts; both must agree."""
  given = {k: hf[k] for k in ('num_local_experts', 'num_experts') if hf.get(k) is not None}
  if len(set(map(repr, given.values()))) > 1:
    raise ConversionError(f'config.json: num_local_experts={given["num_local_experts"]!r} contradicts num_experts='
                          f'{given["num_experts"]!r}; fix the file so that both say the same')
  return next(iter(given.values()), _DEFAULTS['num_experts'])


def from_hf_config(hf: dict) -> dict:
  """fmjax model options from a Qwen3-MoE config.json (transformers' defaults for the keys it omits)."""
  experts = _experts(hf)
  hf = dict(_DEFAULTS, **{k: v for k, v in hf.items() if v is not None or k not in _DEFAULTS})
  hf['num_experts'] = experts
  llama.refuse_values(hf, (('hidden_act', ('silu', None)), ('attention_bias', (False, None))), 'Qwen3-MoE')
  if hf.get('use_sliding_window'):
    raise ConversionError(f'config.json: use_sliding_window=true (sliding_window={hf.get("sliding_window")!r}) is '
                          'not supported by fmjax Qwen3-MoE')
  step = hf['decoder_sparse_step']
  if isinstance(step, bool) or not isinstance(step, int) or step < 1:
    raise ConversionError(f'config.json: decoder_sparse_step={step!r} must be a positive integer')
  hd = hf.get('head_dim') or hf['hidden_size'] // hf['num_attention_heads']   # transformers' default
  options = dict(llama.model_options(dict(hf, head_dim=hd)), qk_norm=True, moe_every=step,
                 moe_first_dense=_first_dense(hf), moe_mlp_dim=int(hf['moe_intermediate_size']),
                 **moe_experts.model_options(hf, 'num_experts', 'Qwen3-MoE', renormalize=hf['norm_topk_prob']))
  if not moe_experts.moe_layer_indices(options['num_layers'], options['moe_first_dense'], step):
    raise ConversionError(f'config.json: no layer is sparse (num_hidden_layers={hf["num_hidden_layers"]}, '
                          f'decoder_sparse_step={step}, mlp_only_layers={hf["mlp_only_layers"]}): fmjax imports '
                          'Qwen3-MoE models with experts')
  return options


def rules(m) -> list:
  """Qwen3's table (llama.py with per-head q/k norms) with the dense MLPs on the dense layers only and the
  router and experts (gate_proj, up_proj, down_proj) under `mlp` on the MoE layers."""
  return moe_experts.rules(llama.rules(m), m)


register(sys.modules[__name__])

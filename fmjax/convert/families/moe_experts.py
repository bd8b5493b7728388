"""What the mixture-of-experts families (mixtral.py, qwen3_moe.py, olmoe.py) share: the router and expert
mapping, the MoE part of `mismatch`, of config.json and of the import's options, and the refusal of routers
fmjax lacks. Not a family itself (it registers nothing).

fmjax's MoE layer (fmjax/model/moe.py) is a softmax top-k router over every expert (`layers_{i}/moe/router`,
(d_model, E)) and SwiGLU experts stacked on a leading axis (`wi_0` gate and `wi_1` up (E, d_model, F), `wo`
down (E, F, d_model)). transformers' files (what save_pretrained writes and from_pretrained reads; its modules
fuse the experts in memory, the safetensors keep one tensor per expert) hold the router as an nn.Linear
`<block>.gate.weight` (E, d_model) and expert j as three nn.Linear weights `<block>.experts.{j}.<gate|up|down>`:
one Rule per kind with experts=E (fmjax/convert/mapping.py), each HF tensor one expert's slice.
"""

from __future__ import annotations

from dataclasses import replace

from fmjax.convert.mapping import ConversionError, Rule, linear

TITLES = 'Mixtral, Qwen3-MoE or OLMoE'

# Router / expert config.json keys of other MoE designs (DeepSeek, Qwen2-MoE, ...), at the values that
# match fmjax's router (softmax top-k over all experts, no shared expert): a file setting one otherwise is
# refused naming it.
ROUTER_KEYS = (
    ('n_group', (None, 1), 'grouped top-k routing'),
    ('topk_group', (None, 1), 'grouped top-k routing'),
    ('topk_method', (None, 'greedy'), 'a top-k method other than greedy'),
    ('scoring_func', (None, 'softmax'), 'router scores other than softmax'),
    ('routed_scaling_factor', (None, 1, 1.0), 'scaled expert outputs'),
    ('n_shared_experts', (None, 0), 'shared experts'),
    ('shared_expert_intermediate_size', (None, 0), 'shared experts'),
)
# MoE model types no family reads, with what fmjax lacks for them (families.family_for says so in one line).
UNSUPPORTED = {
    'deepseek_v2': 'grouped top-k routing (n_group / topk_group) and shared experts',
    'deepseek_v3': 'grouped top-k routing (n_group / topk_group), sigmoid router scores and shared experts',
    'qwen2_moe': 'its shared expert (shared_expert_intermediate_size) and shared-expert gate',
    'dbrx': 'its fused expert tensors and clipped q/k/v',
    'jamba': 'its Mamba layers',
    'granitemoe': 'its scaled residuals and logits',
}


def unsupported(model_type) -> str | None:
  """One line for an MoE model type fmjax's MoE layer cannot express, or None."""
  if model_type not in UNSUPPORTED:
    return None
  return (f'config.json: model_type={model_type!r} is not supported: fmjax has no {UNSUPPORTED[model_type]} '
          f'(its MoE layer routes softmax top-k over every expert: {TITLES})')


def refuse_router_keys(hf: dict, title: str) -> None:
  """One line naming the first ROUTER_KEYS key of `hf` that fmjax's router does not match."""
  for key, ok, what in ROUTER_KEYS:
    if hf.get(key) not in ok:
      raise ConversionError(f'config.json: {key}={hf[key]!r} is not supported ({what}: fmjax {title} routes softmax '
                            'top-k over every expert)')


def moe_layer_indices(num_layers: int, first_dense: int = 0, every: int = 1) -> tuple:
  """fmjax.model.moe.moe_layers without jax (family modules stay light): past the first `first_dense`
  layers, every `every`-th."""
  return tuple(i for i in range(num_layers) if i >= first_dense and (i + 1) % every == 0)


def expert_width(m) -> int:
  """Each expert's hidden width (fmjax.model.moe.expert_dim)."""
  return int(m.get('moe_mlp_dim', 0) or m.mlp_dim)


def rules(table, m, block: str = 'mlp', names=('gate_proj', 'up_proj', 'down_proj')) -> list:
  """`table`, a dense family's rules, with its MLP rules kept for the dense layers only and the router and
  the experts (`names`: gate, up, down) of the MoE layers under `model.layers.{i}.<block>.` added."""
  moe = moe_layer_indices(m.num_layers, int(m.get('moe_first_dense', 0)), int(m.get('moe_every', 1)))
  dense = tuple(i for i in range(m.num_layers) if i not in moe)
  is_mlp = lambda r: any(p.startswith('layers_{i}/mlp/') for p in r.fm)
  out = [r for r in table if not is_mlp(r)]
  if dense:
    out += [replace(r, layers=dense) for r in table if is_mlp(r)]
  d, e, f = m.d_model, int(m.num_experts), expert_width(m)
  pre = f'model.layers.{{i}}.{block}.'
  gate, up, down = names
  return out + [
      Rule(pre + 'gate.weight', ('layers_{i}/moe/router',), layers=moe, **linear((d,), (e,))),
      Rule(pre + f'experts.{{j}}.{gate}.weight', ('layers_{i}/moe/wi_0',), layers=moe, experts=e,
           **linear((d,), (f,))),
      Rule(pre + f'experts.{{j}}.{up}.weight', ('layers_{i}/moe/wi_1',), layers=moe, experts=e, **linear((d,), (f,))),
      Rule(pre + f'experts.{{j}}.{down}.weight', ('layers_{i}/moe/wo',), layers=moe, experts=e, **linear((f,), (d,))),
  ]


def mismatch(m, title: str, renormalize: bool | None = None, dense_layers: bool = False) -> list[str]:
  """Why the MoE part of an fmjax model config is not `title`'s, one phrase each: experts at all; every layer
  an MoE layer unless `dense_layers`; top-k renormalised as `renormalize` says (None: either); no shared
  expert. (Where every layer is an MoE layer, mlp_dim is unused and the experts' width is the file's
  intermediate_size, whatever model.moe_mlp_dim says.)"""
  if int(m.get('num_experts', 0) or 0) <= 0:
    return [f'model.num_experts={m.get("num_experts", 0)} (need > 0: {title} is a mixture of experts)']
  bad = []
  if not dense_layers:
    bad += [f'model.{k}={m.get(k, v)!r} (need {v!r}: every {title} layer is an MoE layer)'
            for k, v in (('moe_every', 1), ('moe_first_dense', 0)) if m.get(k, v) != v]
  if renormalize is not None and bool(m.get('moe_renormalize', True)) != renormalize:
    bad.append(f'model.moe_renormalize={m.get("moe_renormalize", True)!r} (need {renormalize!r} in {title})')
  if int(m.get('moe_shared_mlp_dim', 0) or 0):
    bad.append(f'model.moe_shared_mlp_dim={m.moe_shared_mlp_dim} (need 0: {title} has no shared expert)')
  return bad


def hf_config(m) -> dict:
  """The router keys every MoE config.json has."""
  return dict(num_experts_per_tok=int(m.num_experts_per_tok), router_aux_loss_coef=float(m.moe_aux_loss),
              output_router_logits=False)


def model_options(hf: dict, experts_key: str, title: str, renormalize: bool) -> dict:
  """fmjax's MoE options from config.json (`experts_key`: its number of experts): no z-loss (transformers
  has none), the load-balancing weight from router_aux_loss_coef."""
  refuse_router_keys(hf, title)
  experts = hf.get(experts_key)
  if isinstance(experts, bool) or not isinstance(experts, int) or experts < 1:
    raise ConversionError(f'config.json: {experts_key}={experts!r} must be a positive integer ({title} is a mixture '
                          'of experts)')
  k = hf.get('num_experts_per_tok')
  if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
    raise ConversionError(f'config.json: num_experts_per_tok={k!r} must be an integer from 1 to {experts_key}='
                          f'{experts}')
  return dict(num_experts=experts, num_experts_per_tok=k, moe_renormalize=bool(renormalize),
              moe_aux_loss=float(hf.get('router_aux_loss_coef') or 0.0), moe_router_z_loss=0.0)

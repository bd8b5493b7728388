"""Building blocks: norms, projections, MLP, embeddings, rotary positions.

Every parameter is created with logical axis names (embed, mlp, heads, kv, vocab, norm); the
mesh mapping lives in config (`logical_axis_rules`), never here.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from fmjax.model import context_parallel
from fmjax.model.quantization import is_quantized

Dtype = Any


def dtype_of(name: str) -> Dtype:
  """'float32' | 'bfloat16' -> a jnp dtype."""
  return {'float32': jnp.float32, 'bfloat16': jnp.bfloat16}[name]


def param_with_axes(module: nn.Module, name: str, init, shape: Sequence[int], axes: Sequence[str | None],
                    dtype: Dtype):
  """Create a parameter annotated with logical axis names."""
  return module.param(name, nn.with_logical_partitioning(init, tuple(axes)), tuple(shape), dtype)


class RMSNorm(nn.Module):
  """Root-mean-square norm (LLaMA); statistics in fp32. `unit_offset` (Gemma): scales by 1 + w, w from 0."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32
  unit_offset: bool = False

  @nn.compact
  def __call__(self, x):
    init = nn.initializers.zeros if self.unit_offset else nn.initializers.ones
    scale = param_with_axes(self, 'scale', init, (x.shape[-1],), ('norm',), self.param_dtype)
    x32 = x.astype(jnp.float32)
    y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
    gain = scale.astype(jnp.float32) + (1.0 if self.unit_offset else 0.0)
    return (y * gain).astype(self.dtype)


class LayerNorm(nn.Module):
  """LayerNorm with scale and bias (GPT-2); statistics in fp32."""
  eps: float = 1e-5
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    scale = param_with_axes(self, 'scale', nn.initializers.ones, (d,), ('norm',), self.param_dtype)
    bias = param_with_axes(self, 'bias', nn.initializers.zeros, (d,), ('norm',), self.param_dtype)
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
    return (y * scale.astype(jnp.float32) + bias.astype(jnp.float32)).astype(self.dtype)


def make_norm(cfg, name: str, force: str | None = None) -> nn.Module:
  """The configured norm layer (`force`: 'rmsnorm' or 'layernorm' whatever model.norm says, e.g. qk_norm)."""
  kw = dict(eps=cfg.norm_eps, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), name=name)
  if (force or cfg.norm) == 'rmsnorm':
    return RMSNorm(unit_offset=bool(cfg.get('norm_unit_offset', False)), **kw)
  return LayerNorm(**kw)


@dataclasses.dataclass(frozen=True)
class LoraSpec:
  """Low-rank adapter settings of one projection: y = x W + (alpha / rank) (x A) B."""
  rank: int
  alpha: float


def lora_spec(cfg, name: str) -> LoraSpec | None:
  """The LoRA adapter of projection `name` under the model config `cfg` (its optional `lora`
  section, see fmjax/model/lora.with_lora), or None."""
  lora = cfg.get('lora') if hasattr(cfg, 'get') else None
  if lora is None or lora.rank <= 0 or name not in lora.targets:
    return None
  return LoraSpec(int(lora.rank), float(lora.alpha))


class Projection(nn.Module):
  """A linear map contracting the last `len(in_shape)` axes into `out_shape`, with logical axes.

  `kernel` has shape in_shape + out_shape and axes in_axes + out_axes; the optional bias has
  shape out_shape. With `lora` set (a LoraSpec, passed by the module that makes the projection),
  low-rank adapters `lora_a` (in..., r) drawn from N(0, 1/in) and `lora_b` (r, out...) zero are
  added, so an adapted model starts exactly at the base; without it the parameters and numerics
  are exactly the plain projection's.
  """
  in_shape: tuple
  out_shape: tuple
  in_axes: tuple
  out_axes: tuple
  use_bias: bool = False
  init_std: float = 0.02
  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  weights_only: bool = False  # return (kernel, bias, LoRA term of x) instead (fused_projections)
  lora: LoraSpec | None = None

  @nn.compact
  def __call__(self, x):
    kernel = param_with_axes(self, 'kernel', nn.initializers.normal(self.init_std),
                             self.in_shape + self.out_shape, self.in_axes + self.out_axes, self.param_dtype)
    if self.weights_only:  # for fused_projections: the weights, and the LoRA term of x if any
      delta = self._adapter(x) if self.lora else None
      return kernel, (self._bias() if self.use_bias else None), delta
    n_in = len(self.in_shape)
    lead = x.shape[:x.ndim - n_in]
    w = kernel.astype(self.dtype).reshape(math.prod(self.in_shape), math.prod(self.out_shape))
    y = token_matmul(x.astype(self.dtype).reshape(lead + (w.shape[0],)), w).reshape(lead + tuple(self.out_shape))
    if self.use_bias:
      y = y + self._bias().astype(self.dtype)
    if self.lora:
      y = y + self._adapter(x).astype(y.dtype)
    return y

  def _adapter(self, x):
    """(alpha/rank) (x A) B."""
    rank, n_in = self.lora.rank, len(self.in_shape)
    a = param_with_axes(self, 'lora_a', nn.initializers.normal(math.prod(self.in_shape) ** -0.5),
                        self.in_shape + (rank,), self.in_axes + (None,), self.param_dtype)
    b = param_with_axes(self, 'lora_b', nn.initializers.zeros, (rank,) + self.out_shape, (None,) + self.out_axes,
                        self.param_dtype)
    contract = (tuple(range(x.ndim - n_in, x.ndim)), tuple(range(n_in)))
    h = jax.lax.dot_general(x.astype(self.dtype), a.astype(self.dtype), (contract, ((), ())))
    y = jax.lax.dot_general(h, b.astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ())))
    return y * (self.lora.alpha / rank)

  def _bias(self):
    return param_with_axes(self, 'bias', nn.initializers.zeros, self.out_shape,
                           tuple('norm' if a == 'embed' else a for a in self.out_axes), self.param_dtype)


def project(x, make: Callable[..., Projection], names: Sequence[str], cfg, dtype: Dtype):
  """The projections `make(name)` of `x` for each name, fused into one matmul (fused_projections) unless
  the model is quantized: each quantized matmul is its projection's own, with its own scales."""
  if is_quantized(cfg):
    return [make(n)(x) for n in names]
  return fused_projections(x, [make(n, weights_only=True) for n in names], dtype)


def token_matmul(x, w, contract: int = 0):
  """x (..., K) times w over w's axis `contract` (of size K) -> (..., w's other axes): one 2-D matmul over
  the flattened tokens (its gradients are plain 2-D matmuls too, which XLA CPU runs without the transposed
  copies N-D contractions over (B, T) force), unless the mesh shards the sequence: flattening (B, T) would
  lose that sharding, so the contraction keeps the token axes. lax.dot_general (jnp.dot's own lowering) so
  model.quantization's interceptor sees it."""
  lead = x.shape[:-1]
  if context_parallel.context_size() > 1:
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (contract,)), ((), ())))
  y = jax.lax.dot_general(x.reshape(math.prod(lead), x.shape[-1]), w, (((1,), (contract,)), ((), ())))
  return y.reshape(lead + y.shape[1:])


def fused_projections(x, projections: Sequence[Projection], dtype: Dtype):
  """Apply several same-shaped projections of `x` as one matmul; returns their outputs in order.

  `projections` are Projection modules made with `weights_only=True`; LoRA adapters, where
  configured, are added to their own projection's output.

  The kernels (in, *out) are stacked on a new axis after `in` (sharded axes keep their place),
  so the activations are read once and the backward pass has one input-gradient matmul.
  """
  weights = [p(x) for p in projections]  # each: (kernel, bias or None, LoRA term or None)
  kernel = jnp.stack([w.astype(dtype) for w, _, _ in weights], axis=1)    # (D, n, *out)
  lead = x.shape[:-1]
  y = token_matmul(x.astype(dtype), kernel)                               # (..., n, *out)
  if weights[0][1] is not None:
    y = y + jnp.stack([b.astype(dtype) for _, b, _ in weights], axis=0)
  outs = [y[(slice(None),) * len(lead) + (i,)] for i in range(len(projections))]
  return [o if delta is None else o + delta.astype(o.dtype) for o, (_, _, delta) in zip(outs, weights)]


class MLP(nn.Module):
  """Feed-forward block: SwiGLU or GeGLU (act(gate) * up -> down; GeGLU's GELU is tanh-approximate) or
  GELU, tanh or erf (up -> down). `dim`: the hidden width when not model.mlp_dim (an MoE shared expert)."""
  cfg: Any
  dim: int | None = None

  @nn.compact
  def __call__(self, x):
    cfg = self.cfg
    kw = dict(use_bias=cfg.use_bias, init_std=cfg.init_std, dtype=dtype_of(cfg.dtype),
              param_dtype=dtype_of(cfg.param_dtype))
    width = self.dim or cfg.mlp_dim
    up = lambda name, **extra: Projection((cfg.d_model,), (width,), ('embed',), ('mlp',), name=name, **kw,
                                          lora=lora_spec(cfg, name), **extra)
    if cfg.activation in ('swiglu', 'geglu'):  # one matmul for both up-projections
      gate, lin = project(x, up, ('wi_0', 'wi_1'), cfg, kw['dtype'])
      h = (nn.silu(gate) if cfg.activation == 'swiglu' else nn.gelu(gate, approximate=True)) * lin
    else:  # gelu: tanh approximation (GPT-2); gelu_exact: erf (BERT)
      h = nn.gelu(up('wi')(x), approximate=cfg.activation != 'gelu_exact')
    h = checkpoint_name(h, 'mlp_hidden')
    h = nn.with_logical_constraint(h, ('batch', 'activation_length', 'activation_mlp'))
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    return Projection((width,), (cfg.d_model,), ('mlp',), ('embed',), name='wo',
                      lora=lora_spec(cfg, 'wo'), **{**kw, 'init_std': out_std})(h)


@dataclasses.dataclass(frozen=True)
class RopeScaling:
  """RoPE frequency scaling as Hugging Face applies it: 'linear' divides every frequency by `factor`;
  'llama3' (Llama 3.1+) divides only the low frequencies (wavelength > original_max_len / low_freq_factor),
  keeps the high ones (< original_max_len / high_freq_factor) and interpolates in between."""
  kind: str
  factor: float = 1.0
  low_freq_factor: float = 1.0
  high_freq_factor: float = 4.0
  original_max_len: int = 8192


def rope_scaling(cfg) -> RopeScaling | None:
  """The RoPE scaling of a model config (model.rope_scaling and its rope_* fields), or None."""
  kind = cfg.get('rope_scaling', 'none') if hasattr(cfg, 'get') else 'none'
  if kind in (None, 'none'):
    return None
  return RopeScaling(kind, float(cfg.rope_factor), float(cfg.rope_low_freq_factor), float(cfg.rope_high_freq_factor),
                     int(cfg.rope_original_max_len))


def rope_frequencies(head_dim: int, theta: float, scaling: RopeScaling | None = None) -> jnp.ndarray:
  """Inverse frequencies theta^(-2i/d), i < d/2 (fp32), scaled by `scaling` when given."""
  inv = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
  if scaling is None:
    return inv
  if scaling.kind == 'linear':
    return inv / scaling.factor
  if scaling.kind != 'llama3':
    raise ValueError(f'unknown RoPE scaling {scaling.kind!r}')
  old = scaling.original_max_len
  wavelen = 2 * math.pi / inv
  scaled = jnp.where(wavelen > old / scaling.low_freq_factor, inv / scaling.factor, inv)
  smooth = (old / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
  smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
  medium = (wavelen >= old / scaling.high_freq_factor) & (wavelen <= old / scaling.low_freq_factor)
  return jnp.where(medium, smoothed, scaled)


def apply_rope(x, positions, theta: float, scaling: RopeScaling | None = None):
  """Rotary embedding, half-split layout (as Hugging Face LLaMA). x: (B, T, H, D); positions: (B, T)."""
  d = x.shape[-1]
  angles = positions[..., None].astype(jnp.float32) * rope_frequencies(d, theta, scaling)  # (B, T, D/2)
  sin = jnp.sin(angles)[:, :, None, :]
  cos = jnp.cos(angles)[:, :, None, :]
  x32 = x.astype(jnp.float32)
  x1, x2 = x32[..., : d // 2], x32[..., d // 2:]
  out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
  return out.astype(x.dtype)

"""From the residual stream to logits, written once: final norm, output projection, logit transform.

    hidden = final_norm(x)          pre-norm models (post-norm blocks already end normed)
    logits = hidden @ W_out         the embedding table when tied, else lm_head; an encoder's MLM
                                    head: dense -> GELU -> norm -> table^T + bias (BERT, RoBERTa)
    logits = spec.apply(logits)     LogitSpec: * scale, then cap * tanh(. / cap) (Gemma 2's final soft-cap)

`final_hidden`, `output_logits` and `output_matrix` create their modules in the scope of the
module that calls them, so the Transformer keeps 'final_norm', 'lm_head' and 'mlm_head' at the
top of its params; `Logits` runs the same functions on those entries of a params tree from
outside the model (the logit lens, fmjax/inference/inspect.py). The fused vocab-chunked loss
takes `output_matrix` and the same `LogitSpec` (fmjax/objectives/chunked_ce.py).
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax.numpy as jnp
import flax.linen as nn

from fmjax.model.layers import Projection, dtype_of, lora_spec, make_norm, param_with_axes, token_matmul

HEAD_PARAMS = ('final_norm', 'lm_head', 'mlm_head')  # the Transformer's params the head reads (and 'embedding')


@dataclasses.dataclass(frozen=True)
class LogitSpec:
  """The transform of the output projection's logits z: cap * tanh(scale * z / cap); identity by default."""
  scale: float = 1.0
  softcap: float | None = None

  def __post_init__(self):
    if self.softcap is not None and not self.softcap > 0:
      raise ValueError(f'final logit soft-cap must be positive, got {self.softcap}')

  @property
  def identity(self) -> bool:
    return self.scale == 1.0 and self.softcap is None

  def apply(self, logits):
    if self.scale != 1.0:
      logits = logits * self.scale
    if self.softcap is not None:
      logits = jnp.tanh(logits / self.softcap) * self.softcap
    return logits

  def slope(self, out):
    """d apply(z) / dz elementwise, from the transformed logits `out` (for hand-written backward passes)."""
    if self.softcap is None:
      return jnp.full_like(out, self.scale)
    return self.scale * (1.0 - jnp.square(out / self.softcap))


def logit_spec(model_cfg) -> LogitSpec:
  """The logit transform of a model config: model.final_logit_softcap (Gemma 2), else the identity."""
  cap = float(model_cfg.get('final_logit_softcap', 0.0) or 0.0) if hasattr(model_cfg, 'get') else 0.0
  return LogitSpec(softcap=cap or None)


def is_encoder(model_cfg) -> bool:
  """Whether the model is a bidirectional encoder with an MLM head (model.kind='encoder')."""
  return model_cfg.get('kind', 'decoder') == 'encoder'


class MLMHead(nn.Module):
  """BERT's masked-LM transform: dense -> GELU -> norm, then the tied embedding matrix plus a bias."""
  cfg: Any

  @nn.compact
  def __call__(self, hidden, embedding):
    cfg = self.cfg
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    h = Projection((cfg.d_model,), (cfg.d_model,), ('embed',), ('mlp',), use_bias=True, name='dense',
                   init_std=cfg.init_std, dtype=dtype, param_dtype=pdtype)(hidden)
    h = make_norm(cfg, 'norm')(nn.gelu(h, approximate=cfg.activation != 'gelu_exact'))
    bias = param_with_axes(self, 'bias', nn.initializers.zeros, (cfg.vocab_size,), ('vocab',), pdtype)
    return token_matmul(h, embedding.astype(dtype), contract=1) + bias.astype(dtype)


def final_hidden(cfg, x):
  """The residual stream (..., D) after the final norm; post-norm models have none."""
  if cfg.get('norm_position', 'pre') == 'post':
    return x
  return make_norm(cfg, 'final_norm')(x)


def _lm_head(cfg, **extra) -> Projection:
  return Projection((cfg.d_model,), (cfg.vocab_size,), ('embed',), ('vocab',), name='lm_head',
                    init_std=cfg.init_std, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype), **extra)


def output_logits(cfg, hidden, embedding):
  """Logits (..., V) of final hidden states (..., D) in the compute dtype, transformed by `logit_spec`.

  `embedding` is the (V, D) token table (the tied head's matrix and the MLM head's).
  """
  if is_encoder(cfg):
    logits = MLMHead(cfg, name='mlm_head')(hidden, embedding)
  elif cfg.tie_embeddings:
    logits = token_matmul(hidden, embedding.astype(dtype_of(cfg.dtype)), contract=1)
  else:
    logits = _lm_head(cfg, lora=lora_spec(cfg, 'lm_head'))(hidden)
  spec = logit_spec(cfg)
  return logits if spec.identity else spec.apply(logits)


def output_matrix(cfg, embedding):
  """(matrix, transposed) of the output projection for a fused loss: the (V, D) table when tied
  (transposed=True), else the (D, V) lm_head kernel. Apply `logit_spec(cfg)` to what it gives."""
  if is_encoder(cfg):
    raise ValueError('model.loss_vocab_chunk > 0 is for decoders (the MLM head has a bias)')
  if lora_spec(cfg, 'lm_head'):
    raise ValueError('model.loss_vocab_chunk > 0 cannot be combined with LoRA on lm_head')
  if cfg.tie_embeddings:
    return embedding, True
  kernel, _, _ = _lm_head(cfg, weights_only=True)(None)
  return kernel, False


class Logits(nn.Module):
  """`final_hidden` then `output_logits` as a module of its own: apply it to the HEAD_PARAMS entries
  of a Transformer's params (and pass their 'embedding'), e.g. on every layer's residual stream."""
  cfg: Any

  @nn.compact
  def __call__(self, x, embedding):
    return output_logits(self.cfg, final_hidden(self.cfg, x), embedding)


def head_logits(model_cfg, params, x):
  """Logits of residual streams `x` (..., D) read through a Transformer's own head (`params`: its params)."""
  head = {k: params[k] for k in HEAD_PARAMS if k in params}
  return Logits(model_cfg).apply({'params': head}, x, params['embedding'])

"""Sequence classification: a linear head on the pooled final hidden state of the Transformer.

Parameters are the language model's tree plus one entry, `cls_head` ({kernel (embed, classes),
bias}), so a pretrained checkpoint loads into it unchanged and the LM logits stay available.
Batches use the LM format (see fmjax/data/labeled.py): `targets` holds the class id and
`weights` is 1 on each example's last real token (0 for padding rows).
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from fmjax.model.layers import Projection
from fmjax.training.state import dummy_tokens

HEAD = 'cls_head'


def pool(hidden, weights, segment_ids, mode: str):
  """(B, T, D) -> (B, D): the last real token (where weights is 1), the first token ('cls': an
  encoder's [CLS], the tokenizer's bos that starts each example) or the mean over real tokens."""
  hidden = hidden.astype(jnp.float32)
  if mode == 'cls':
    return hidden[:, 0]
  if mode == 'last':
    index = jnp.argmax(weights, axis=-1)
    return jnp.take_along_axis(hidden, index[:, None, None], axis=1)[:, 0]
  if mode == 'mean':
    mask = (segment_ids > 0).astype(jnp.float32)
    return jnp.einsum('bt,btd->bd', mask, hidden) / jnp.maximum(mask.sum(-1, keepdims=True), 1.0)
  raise ValueError(f'unknown pooling {mode!r}')


class ClassifierHead(nn.Module):
  """Linear map from the pooled hidden state to class logits (fp32)."""
  num_classes: int
  init_std: float = 0.02

  @nn.compact
  def __call__(self, pooled):
    return Projection((pooled.shape[-1],), (self.num_classes,), ('embed',), (None,), use_bias=True,
                      init_std=self.init_std, name='proj')(pooled)


def dropout(pooled, rate: float, rng):
  """Inverted dropout on the pooled vectors (B, D): each entry zeroed with probability `rate`."""
  keep = jax.random.bernoulli(rng, 1.0 - rate, pooled.shape)
  return jnp.where(keep, pooled / (1.0 - rate), 0.0)


def batch_key(batch, seed: int = 0):
  """A dropout key that is a pure function of the batch's tokens (and `seed`): for train steps built
  without a dropout key (model.dropout = 0), so classifier dropout stays exact on resume."""
  tokens = batch['inputs'].astype(jnp.uint32)
  mix = jnp.arange(1, tokens.shape[1] + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
  fingerprint = jnp.sum(tokens * mix[None, :] + jnp.arange(tokens.shape[0], dtype=jnp.uint32)[:, None] * tokens)
  return jax.random.fold_in(jax.random.PRNGKey(seed), fingerprint)


class Classifier:
  """A Transformer plus a classification head, as functions of one parameter tree.

  `dropout` is the classifier dropout: applied to the pooled vector when `logits` gets a key (training).
  """

  def __init__(self, model: nn.Module, num_classes: int, pooling: str = 'mean', dropout: float = 0.0,
               seed: int = 0):
    self.model, self.num_classes, self.pooling = model, num_classes, pooling
    self.dropout, self.seed = dropout, seed
    self.head = ClassifierHead(num_classes, init_std=model.cfg.init_std)

  def init(self, rng, seq_len: int) -> dict:
    """Boxed parameters (with logical axes): the LM's and HEAD's."""
    lm_rng, head_rng = jax.random.split(rng)
    params = dict(self.model.init({'params': lm_rng, 'dropout': lm_rng}, dummy_tokens(1, seq_len))['params'])
    pooled = jnp.zeros((1, self.model.cfg.d_model), jnp.float32)
    params[HEAD] = self.head.init(head_rng, pooled)['params']
    return params

  def logits(self, params, batch, rng=None, head_rng=None):
    """Class logits (B, C) for a batch; with `rng` the model's dropout and the classifier dropout, with
    `head_rng` the classifier dropout alone."""
    lm_params = {k: v for k, v in params.items() if k != HEAD}
    deterministic = rng is None
    _, hidden = self.model.apply({'params': lm_params}, batch['inputs'], batch['positions'], batch['segment_ids'],
                                 deterministic=deterministic, return_hidden=True,
                                 rngs=None if deterministic else {'dropout': rng})
    pooled = pool(hidden, batch['weights'], batch['segment_ids'], self.pooling)
    if head_rng is None and rng is not None:
      head_rng = jax.random.fold_in(rng, 1)
    if head_rng is not None and self.dropout > 0:
      pooled = dropout(pooled, self.dropout, head_rng)
    return self.head.apply({'params': params[HEAD]}, pooled).astype(jnp.float32)


def loss_fn(classifier: Classifier) -> Callable:
  """`loss(params, batch, rng) -> (ce_sum, (ce_sum, examples))`, the contract of fmjax.training.step."""
  def loss(params, batch, rng):
    if rng is None and classifier.dropout > 0:   # a step without a dropout key: classifier dropout only
      logits = classifier.logits(params, batch, None, head_rng=batch_key(batch, classifier.seed))
    else:
      logits = classifier.logits(params, batch, rng)
    labels = batch['targets'][:, 0]
    example_weight = batch['weights'].sum(-1)
    ce = (jax.nn.logsumexp(logits, -1) - jnp.take_along_axis(logits, labels[:, None], -1)[:, 0]) * example_weight
    return ce.sum(), (ce.sum(), example_weight.sum())
  return loss


def predict_fn(classifier: Classifier) -> Callable[[Any, dict], dict]:
  """`predict(params, batch) -> {'prediction', 'label', 'valid'} (B,), 'probabilities' (B, C)}`."""
  def predict(params, batch):
    logits = classifier.logits(params, batch)
    return {'prediction': jnp.argmax(logits, -1).astype(jnp.int32), 'label': batch['targets'][:, 0],
            'valid': batch['weights'].sum(-1) > 0, 'probabilities': jax.nn.softmax(logits, -1)}
  return predict

"""Masked language modelling: the objective of model.kind='encoder'.

Masking is a pure, jitted function of (seed, step, example) applied inside the train step to
the ordinary batch (fmjax/data/batches.py), so the data pipeline is the decoder's and a resumed
run masks exactly as an uninterrupted one. Of the real tokens (segment > 0, not a special token)
a share `mlm.mask_rate` is chosen (with `mlm.whole_word`, all tokens of a word together); of the
chosen, `mask_token_rate` become the tokenizer's mask token, `random_token_rate` a random text
token, the rest stay. The prepared batch predicts the original tokens (targets) at the chosen
positions only (weights), so the LM loss of fmjax/training/step.py is the MLM loss. Evaluation masks each
eval row from the seed and the row's content, so an eval set is scored the same way every time.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.data.errors import DataError

_TRAIN_SALT, _EVAL_SALT = 0x6D6C6D, 0x65766C  # separate the mask streams from other uses of the seed


@dataclasses.dataclass(frozen=True)
class MaskSpec:
  """What masking needs from the tokenizer and the config (numpy tables are (vocab,))."""
  mask_id: int
  maskable: np.ndarray        # bool: a text token that may be chosen (specials never are)
  candidates: np.ndarray      # int32: the ids a random replacement draws from
  word_start_char: np.ndarray  # bool: the token's text starts with a word character
  word_end_char: np.ndarray    # bool: ... ends with a word character
  mask_rate: float = 0.15
  mask_token_rate: float = 0.8
  random_token_rate: float = 0.1
  whole_word: bool = False


def _is_word_char(ch: str) -> bool:
  return ch.isalnum() or ch == '_' or ch == '\ufffd'  # \ufffd: one byte of a multi-byte character


def spec_for(tokenizer, mlm_cfg, vocab_size: int) -> MaskSpec:
  """The MaskSpec of `tokenizer` under the `mlm` config section, for a model of `vocab_size` ids."""
  mask_id = getattr(tokenizer, 'mask_id', None)
  if mask_id is None:
    raise DataError(f'tokenizer {tokenizer.spec!r} has no mask token for masked-LM training: use the byte '
                    'tokenizer or a SentencePiece model with byte fallback (tools/train_tokenizer.py)')
  if mask_id >= vocab_size:
    raise DataError(f'the mask token id {mask_id} is outside model.vocab_size={vocab_size}: '
                    f'set model.vocab_size >= {mask_id + 1}')
  n = tokenizer.vocab_size
  maskable = np.zeros(vocab_size, bool)
  maskable[:n] = np.asarray(tokenizer.token_byte_lengths()) > 0
  maskable[mask_id] = False
  texts = [tokenizer.decode([i]) if maskable[i] else '' for i in range(n)] + [''] * (vocab_size - n)
  starts = np.array([bool(t) and _is_word_char(t[0]) for t in texts])
  ends = np.array([bool(t) and _is_word_char(t[-1]) for t in texts])
  return MaskSpec(mask_id=int(mask_id), maskable=maskable, candidates=np.flatnonzero(maskable).astype(np.int32),
                  word_start_char=starts, word_end_char=ends, mask_rate=float(mlm_cfg.mask_rate),
                  mask_token_rate=float(mlm_cfg.mask_token_rate),
                  random_token_rate=float(mlm_cfg.random_token_rate), whole_word=bool(mlm_cfg.whole_word))


def word_ids(spec: MaskSpec, tokens, segment_ids):
  """(T,) index of the word each token belongs to: a token continues the previous one's word when
  the two touch word characters (and are in one document)."""
  prev_tok = jnp.concatenate([tokens[:1], tokens[:-1]])
  prev_seg = jnp.concatenate([jnp.full((1,), -1, segment_ids.dtype), segment_ids[:-1]])
  joins = (jnp.asarray(spec.word_start_char)[tokens] & jnp.asarray(spec.word_end_char)[prev_tok]
           & (prev_seg == segment_ids))
  return jnp.cumsum(~joins) - 1


def mask_row(spec: MaskSpec, key, tokens, segment_ids):
  """One row (T,) -> (masked tokens, chosen: bool (T,)), a pure function of `key` and the row."""
  t = tokens.shape[0]
  choose_key, how_key, random_key = jax.random.split(key, 3)
  real = jnp.asarray(spec.maskable)[tokens] & (segment_ids != 0)
  draw = jax.random.uniform(choose_key, (t,))
  if spec.whole_word:
    draw = draw[word_ids(spec, tokens, segment_ids)]
  chosen = real & (draw < spec.mask_rate)
  how = jax.random.uniform(how_key, (t,))
  to_mask = chosen & (how < spec.mask_token_rate)
  to_random = chosen & ~to_mask & (how < spec.mask_token_rate + spec.random_token_rate)
  candidates = jnp.asarray(spec.candidates)
  random_tokens = candidates[jax.random.randint(random_key, (t,), 0, candidates.shape[0])]
  masked = jnp.where(to_mask, spec.mask_id, jnp.where(to_random, random_tokens, tokens))
  return masked.astype(tokens.dtype), chosen


def _row_content_hash(tokens):
  """A deterministic int32 of a row's tokens (eval masks depend on the example, not its batch slot)."""
  weights = jnp.arange(1, tokens.shape[0] + 1, dtype=jnp.uint32) * jnp.uint32(2654435761)
  return (jnp.sum(tokens.astype(jnp.uint32) * weights) & jnp.uint32(0x7FFFFFFF)).astype(jnp.int32)


def mask_batch(spec: MaskSpec, seed: int, step, batch: dict) -> dict:
  """The MLM batch: inputs masked, targets the original inputs, weights 1 at the chosen positions.

  `step` (an int32 scalar) makes the training masks; None makes the evaluation masks (from the
  seed and each row's content). Row r of a training batch uses key (seed, step, r).
  """
  inputs, segs = batch['inputs'], batch['segment_ids']
  if step is None:
    base = jax.random.fold_in(jax.random.PRNGKey(seed), _EVAL_SALT)
    keys = jax.vmap(lambda row: jax.random.fold_in(base, _row_content_hash(row)))(inputs)
  else:
    base = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(seed), _TRAIN_SALT), step)
    keys = jax.vmap(lambda r: jax.random.fold_in(base, r))(jnp.arange(inputs.shape[0]))
  masked, chosen = jax.vmap(lambda k, tok, seg: mask_row(spec, k, tok, seg))(keys, inputs, segs)
  return {**batch, 'inputs': masked, 'targets': inputs, 'weights': chosen.astype(jnp.float32)}


def preparer(spec: MaskSpec, seed: int) -> Callable[[dict, jax.Array | None], dict]:
  """`prepare(batch, step)` for fmjax.training.step (step None: evaluation masks)."""
  return lambda batch, step: mask_batch(spec, seed, step, batch)


def preparer_for(cfg) -> Callable[[dict, jax.Array | None], dict]:
  """The MLM `prepare` of a run config (its tokenizer, mlm section and seed)."""
  from fmjax.data import tokenizers  # pylint: disable=import-outside-toplevel
  tokenizer = tokenizers.load_tokenizer(cfg.data.tokenizer)
  return preparer(spec_for(tokenizer, cfg.mlm, cfg.model.vocab_size), cfg.seed)

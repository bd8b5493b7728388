"""The device side of fmjax's lm-eval backend: token rows scored and decoded in bucketed, sharded batches.

Rows are padded to one of a few bucket lengths (`bucket_lengths`) and to a fixed number of rows per
batch, so one compiled program serves every batch of a bucket: the number of compiles is at most the
number of buckets used (`RowRunner.compiles` counts them). Batches are sharded over the mesh's batch
axes as in evaluation, parameters stay in their own shardings, and results come back replicated.

Scoring right-pads: padding has segment id 0 and each row's positions run from 0, so a row is scored
exactly as it would be alone. The score of a position is the float32 log-softmax of the model's
logits at the next token (its logit minus the logsumexp), and whether that token is the argmax. The
model's (rows, length, vocab) logits exist at once: lower the batch size for long rows of a large
vocabulary. Decoding left-pads into fmjax's
KV-cache decoder (fmjax.inference.decode), whose positions count real tokens only.
"""

from __future__ import annotations

import time
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.inference import decode as decode_lib
from fmjax.parallel import sharding as shd


def bucket_lengths(max_length: int, smallest: int = 16) -> list[int]:
  """Row lengths to pad to: 16, 24, 32, 48, 64, 96, ... (powers of two and 1.5 times them, so at most a
  third of a row is padding), up to and including `max_length`."""
  out, size = [], smallest
  while size < max_length:
    out += [size, size + size // 2]
    size *= 2
  return sorted({b for b in out if b < max_length} | {max_length})


def pick_length(width: int, buckets: Sequence[int] | None) -> int:
  """The smallest bucket that holds `width` tokens (`width` itself when there are no buckets)."""
  if not buckets:
    return width
  return next((b for b in buckets if b >= width), max(width, buckets[-1]))


class RowRunner:
  """Scores and decodes token rows of one restored model (or `params` of the same shapes and shardings)."""

  def __init__(self, restored, params=None, rows: int = 8):
    from fmjax.inference.generate import batch_rows  # pylint: disable=import-outside-toplevel
    self.restored = restored
    self.params = restored.params if params is None else params
    self.rows = batch_rows(restored, max(1, int(rows)))   # a multiple of the batch shards
    self.compiles = 0
    self.compile_seconds = 0.0
    mesh, rules = restored.mesh, restored.run.rules
    self._row = shd.batch_sharding(mesh, rules, ndim=2)
    self._vec = shd.batch_sharding(mesh, rules, ndim=1)
    self._rep = shd.replicated(mesh)

  def _global(self, array: np.ndarray) -> jax.Array:
    """A host array (the same on every process) as a global array on the batch sharding."""
    sharding = self._row if array.ndim == 2 else self._vec
    return jax.make_array_from_callback(array.shape, sharding, lambda index: array[index])

  def _scorer(self, width: int):
    key = ('lm_eval_score', self.rows, width)
    if key not in self.restored.compiled:
      model, rules, mesh = self.restored.model, self.restored.run.rules, self.restored.mesh

      def score(params, tokens, positions, segments, targets):
        logits = model.apply({'params': params}, tokens, positions, segments).astype(jnp.float32)
        picked = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]   # (B, W): no (B, W, V) log-softmax
        return picked - jax.nn.logsumexp(logits, axis=-1), jnp.argmax(logits, axis=-1) == targets

      param_sh = jax.tree.map(lambda x: x.sharding, self.params)
      spec = jax.ShapeDtypeStruct((self.rows, width), jnp.int32, sharding=self._row)
      start = time.perf_counter()
      with shd.activate(mesh, rules):
        jitted = jax.jit(score, in_shardings=(param_sh,) + (self._row,) * 4, out_shardings=(self._rep, self._rep))
        self.restored.compiled[key] = jitted.lower(self.params, spec, spec, spec, spec).compile()
      self._count(start)
    return self.restored.compiled[key]

  def _count(self, start: float) -> None:
    self.compiles += 1
    self.compile_seconds += time.perf_counter() - start

  def score(self, inputs: Sequence[Sequence[int]], targets: Sequence[Sequence[int]],
            width: int) -> tuple[np.ndarray, np.ndarray]:
    """Per-position (log-prob of targets[i][t] after inputs[i][:t + 1] (float32), whether it is the argmax),
    each (len(inputs), width), for at most `rows` rows of at most `width` tokens."""
    n = len(inputs)
    tokens, nexts, segments = (np.zeros((self.rows, width), np.int32) for _ in range(3))
    for i, (row, target) in enumerate(zip(inputs, targets)):
      tokens[i, :len(row)], nexts[i, :len(row)], segments[i, :len(row)] = row, target, 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (self.rows, width)).copy()
    fn = self._scorer(width)
    with shd.activate(self.restored.mesh, self.restored.run.rules):
      logp, greedy = fn(self.params, *map(self._global, (tokens, positions, segments, nexts)))
    logp, greedy = _host(logp), _host(greedy)
    return np.asarray(logp[:n], np.float32), np.asarray(greedy[:n])

  def decode(self, prompts: Sequence[Sequence[int]], width: int, new_tokens: int,
             sampling: decode_lib.Sampling, seed: int = 0) -> list[list[int]]:
    """Up to `new_tokens` ids after each prompt (through the first EOS), prompts left-padded to `width`."""
    tok = self.restored.tokenizer
    key = ('lm_eval_decoder', self.rows, width, new_tokens)
    if key not in self.restored.compiled:
      start = time.perf_counter()
      decoder = decode_lib.Decoder(self.restored.model, new_tokens, eos_id=tok.eos_id, pad_id=tok.pad_id)
      self.restored.compiled[key] = decode_lib.compile_decoder(decoder, self.params, self.restored.mesh,
                                                               self.restored.run.rules, self.rows, width)
      self._count(start)
    prefill, loop = self.restored.compiled[key]
    batch = left_pad(prompts, tok.pad_id, self.rows, width)
    with shd.activate(self.restored.mesh, self.restored.run.rules):
      logits, cache = prefill(self.params, *map(self._global, (batch['tokens'], batch['positions'],
                                                               batch['segment_ids'])))
      next_pos = self._global((batch['positions'][:, -1] + 1).astype(np.int32))
      out, lengths, _ = loop(self.params, cache, logits, next_pos, jax.random.PRNGKey(seed), sampling.as_arrays())
    out, lengths = _host(out), _host(lengths)
    return [out[i, :lengths[i]].tolist() for i in range(len(prompts))]


def _host(x: jax.Array) -> np.ndarray:
  """The whole of a global array on this host (gathered from the other processes when it spans them)."""
  if x.is_fully_addressable:
    return np.asarray(x)
  from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
  return np.asarray(multihost_utils.process_allgather(x, tiled=True))


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, rows: int, width: int) -> dict[str, np.ndarray]:
  """fmjax.inference.decode.left_pad to a fixed `width` (a bucket), so batches of a bucket share a compile."""
  longest = max(len(p) for p in prompts)
  if longest > width:
    raise ValueError(f'a prompt of {longest} tokens does not fit width {width}')
  batch = decode_lib.left_pad(prompts, pad_id, rows)   # rows after the prompts are all padding
  extra = width - batch['tokens'].shape[1]
  if extra:
    batch = {k: np.pad(v, ((0, 0), (extra, 0)), constant_values=pad_id if k == 'tokens' else 0)
             for k, v in batch.items()}
  return batch

"""Autoregressive decoding with a KV cache: padding, sampling, a jitted prefill and decode loop.

Prompts of different lengths are left-padded into one (B, P) batch: padding has segment id 0
and real tokens segment 1, and positions count real tokens only, so each row sees exactly
what a lone forward pass would. Prefill writes the P prompt slots of the cache; the decode
loop (`lax.while_loop`) then samples one token per row and step, writing slot P + i, until
`max_new_tokens` or every row has produced EOS.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import flax.linen as nn
from flax import struct
from jax.sharding import NamedSharding, PartitionSpec

from fmjax.errors import UserError
from fmjax.model.transformer import init_cache


class DecodeError(UserError):
  """A decoding request that cannot be served (shown to the user as one line)."""


@struct.dataclass
class Sampling:
  """How the next token is chosen: greedy (temperature 0) or sampled with top-k / top-p.

  The fields may be traced arrays: one compiled decoder serves every setting.
  """
  temperature: Any = 1.0   # 0 = greedy
  top_k: Any = 0           # 0 = off
  top_p: Any = 1.0         # 1 = off

  def as_arrays(self) -> 'Sampling':
    return Sampling(jnp.asarray(self.temperature, jnp.float32), jnp.asarray(self.top_k, jnp.int32),
                    jnp.asarray(self.top_p, jnp.float32))


def sampling_options(**options) -> Sampling:
  """Validated `Sampling` from keyword options; unknown names and bad values are DecodeErrors."""
  known = [f.name for f in dataclasses.fields(Sampling)]
  for name in options:
    if name not in known:
      raise DecodeError(f'unknown sampling option {name!r}; known options: {", ".join(known)}')
  s = Sampling(**options)
  if not s.temperature >= 0.0:
    raise DecodeError(f'temperature={s.temperature} must be >= 0 (0 = greedy)')
  if int(s.top_k) != s.top_k or s.top_k < 0:
    raise DecodeError(f'top_k={s.top_k} must be a non-negative integer (0 = off)')
  if not 0.0 < s.top_p <= 1.0:
    raise DecodeError(f'top_p={s.top_p} must be in (0, 1] (1 = off)')
  return s


def sample_logits(logits: jax.Array, rng: jax.Array, sampling: Sampling) -> jax.Array:
  """Next tokens (B,) from logits (B, V): argmax at temperature 0, else top-k, then top-p, then sample."""
  logits = logits.astype(jnp.float32)
  s = sampling.as_arrays()
  greedy = jnp.argmax(logits, axis=-1).astype(jnp.int32)
  scaled = logits / jnp.where(s.temperature > 0, s.temperature, 1.0)
  ordered = jnp.sort(scaled, axis=-1)[:, ::-1]                                  # descending
  kth = jnp.where(s.top_k > 0, ordered[:, jnp.clip(s.top_k - 1, 0, logits.shape[-1] - 1)], -jnp.inf)
  ordered = jnp.where(ordered < kth[:, None], -jnp.inf, ordered)
  probs = jax.nn.softmax(ordered, axis=-1)
  keep = (jnp.cumsum(probs, axis=-1) - probs < s.top_p) | (s.top_p >= 1.0)      # smallest set reaching top_p
  threshold = jnp.maximum(kth, jnp.min(jnp.where(keep, ordered, jnp.inf), axis=-1))
  scaled = jnp.where(scaled < threshold[:, None], -jnp.inf, scaled)
  sampled = jax.random.categorical(rng, scaled, axis=-1).astype(jnp.int32)
  return jnp.where(s.temperature > 0, sampled, greedy)


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, rows: int | None = None) -> dict[str, np.ndarray]:
  """Left-padded {'tokens', 'positions', 'segment_ids'} (rows, P); extra rows are all padding."""
  rows = rows or len(prompts)
  width = max(len(p) for p in prompts)
  tokens = np.full((rows, width), pad_id, np.int32)
  segs = np.zeros((rows, width), np.int32)
  for i, p in enumerate(prompts):
    if len(p):
      tokens[i, width - len(p):] = p
      segs[i, width - len(p):] = 1
  positions = np.maximum(np.cumsum(segs, axis=1) - 1, 0).astype(np.int32)
  return {'tokens': tokens, 'positions': positions, 'segment_ids': segs}


def cache_shardings(cache, mesh, rules):
  """Shardings of a KV cache: batch like the data, KV heads like the attention activations."""
  def spec(path, leaf):
    name = jax.tree_util.keystr(path[-1:])
    if 'index' in name:
      logical = ()
    elif 'segment_ids' in name:
      logical = ('batch', None)
    else:
      logical = ('batch', 'activation_length', 'activation_heads', 'activation_kv')
    logical = (None,) * (leaf.ndim - len(logical)) + logical   # the scanned layer axis
    return NamedSharding(mesh, nn.logical_to_mesh_axes(logical, rules))
  return jax.tree_util.tree_map_with_path(spec, cache)


@dataclasses.dataclass
class Decoder:
  """Prefill + decode loop for one model and number of new tokens; a row stops at eos_id or any of
  `stop_ids` (e.g. a chat template's end-of-turn token)."""
  model: nn.Module
  max_new_tokens: int
  eos_id: int
  pad_id: int = 0
  stop_ids: tuple = ()

  def prefill(self, params, cache, tokens, positions, segment_ids):
    """Run the prompts through the model, filling the cache. Returns (last logits (B, V), cache).

    The head (fmjax/model/logits.py) reads the last position only: no (B, P, V) logits.
    """
    logits, mutated = self.model.apply({'params': params, 'cache': cache}, tokens, positions, segment_ids,
                                       decode=True, mutable=['cache'], last_only=True)
    return logits[:, 0].astype(jnp.float32), mutated['cache']

  def step(self, params, cache, token, position):
    """One token per row (B,) at `position` (B,) -> (logits (B, V), cache)."""
    ones = jnp.ones_like(token)[:, None]
    logits, mutated = self.model.apply({'params': params, 'cache': cache}, token[:, None], position[:, None],
                                       ones, decode=True, mutable=['cache'])
    return logits[:, 0].astype(jnp.float32), mutated['cache']

  def loop(self, params, cache, logits, positions, rng, sampling: Sampling):
    """Sample up to max_new_tokens per row. Returns (tokens (B, N), lengths (B,), steps)."""
    b, n = logits.shape[0], self.max_new_tokens
    out = jnp.full((b, n), self.pad_id, jnp.int32)
    done = jnp.zeros((b,), bool)
    lengths = jnp.zeros((b,), jnp.int32)

    def cond(carry):
      i, _, _, _, done, _, _ = carry
      return (i < n) & ~jnp.all(done)

    def body(carry):
      i, cache, logits, out, done, lengths, pos = carry
      token = sample_logits(logits, jax.random.fold_in(rng, i), sampling)
      token = jnp.where(done, self.pad_id, token)
      out = out.at[:, i].set(token)
      lengths = lengths + (~done).astype(jnp.int32)
      done = done | (token == self.eos_id)
      for stop in self.stop_ids:
        done = done | (token == stop)
      logits, cache = self.step(params, cache, token, pos)
      return i + 1, cache, logits, out, done, lengths, pos + 1

    steps, _, _, out, _, lengths, _ = jax.lax.while_loop(
        cond, body, (jnp.zeros((), jnp.int32), cache, logits, out, done, lengths, positions))
    return out, lengths, steps


def compile_decoder(decoder: Decoder, params, mesh, rules, batch: int, width: int) -> tuple[Callable, Callable]:
  """AOT-compiled (prefill, loop) for (batch, width) prompts, sharded on `mesh` like training.

  Returns `prefill(params, tokens, positions, segment_ids) -> (logits, cache)` and
  `loop(params, cache, logits, next_positions, rng, sampling) -> (tokens, lengths, steps)`.
  """
  from fmjax.parallel import sharding as shd  # pylint: disable=import-outside-toplevel
  length = width + decoder.max_new_tokens
  shapes = _dense_attention(decoder.model)   # creates the cache: its attention never runs (see below)
  with shd.activate(mesh, rules):
    abstract_cache = jax.eval_shape(lambda: init_cache(shapes, batch, length))
  cache_sh = cache_shardings(abstract_cache, mesh, rules)
  row = shd.batch_sharding(mesh, rules, ndim=2)
  vec = shd.batch_sharding(mesh, rules, ndim=1)
  param_sh = jax.tree.map(lambda x: x.sharding, params)
  rep = shd.replicated(mesh)

  def prefill(params, tokens, positions, segment_ids):
    cache = init_cache(shapes, batch, length)
    cache = jax.lax.with_sharding_constraint(cache, cache_sh)
    return decoder.prefill(params, cache, tokens, positions, segment_ids)

  tok = jax.ShapeDtypeStruct((batch, width), jnp.int32, sharding=row)
  with shd.activate(mesh, rules):
    pre = jax.jit(prefill, in_shardings=(param_sh, row, row, row), out_shardings=(vec, cache_sh))
    pre = pre.lower(params, tok, tok, tok).compile()
    lp = jax.jit(decoder.loop, in_shardings=(param_sh, cache_sh, vec, vec, rep, rep), out_shardings=(row, vec, rep))
    abstract_logits = jax.ShapeDtypeStruct((batch, decoder.model.cfg.vocab_size), jnp.float32, sharding=vec)
    # Shapes only (eval_shape): no op runs on the mesh, which may be compile-only TPU devices.
    lp = lp.lower(params, jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                                       abstract_cache, cache_sh),
                  abstract_logits, jax.ShapeDtypeStruct((batch,), jnp.int32, sharding=vec),
                  jax.ShapeDtypeStruct((2,), jnp.uint32, sharding=rep),
                  jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=rep),
                               jax.eval_shape(lambda: Sampling().as_arrays()))).compile()
  return pre, lp


def _dense_attention(model: nn.Module) -> nn.Module:
  """`model` with dense attention, to create the KV cache (`init_cache` traces a forward pass over
  prompt + new tokens only for its shapes). Kernels such as splash accept only tiled lengths, which
  prompt + new tokens need not be; decoding itself attends over the cache with XLA either way."""
  cfg = model.cfg.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.attention = 'dense'
  return model.clone(cfg=cfg)

"""The train state, its abstract shape and shardings, and its sharded initialisation.

The state is never materialised whole on one device: `eval_shape` gives its structure and
logical axes, the rules turn those into shardings, and a jitted init with `out_shardings`
creates every array directly in place.
"""

from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import flax.linen as nn
import optax
from flax import struct

from fmjax.parallel import sharding as shd


@struct.dataclass
class TrainState:
  """Everything the optimizer updates: step counter, parameters, optimizer state."""
  step: jax.Array
  params: Any
  opt_state: Any


class ShardedState(NamedTuple):
  """The abstract state (ShapeDtypeStructs carrying shardings) and the sharding tree."""
  abstract: TrainState
  shardings: TrainState


def dummy_tokens(batch: int, seq_len: int) -> jax.Array:
  return jnp.zeros((batch, seq_len), jnp.int32)


def _boxed_state(rng, model: nn.Module, tx: optax.GradientTransformation, seq_len: int) -> TrainState:
  params = model.init({'params': rng, 'dropout': rng}, dummy_tokens(1, seq_len))['params']
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))


class OnMesh:
  """A jitted function traced under a mesh and its logical-axis rules: call it, or `lower` it
  (ahead-of-time compilation, e.g. for a compile-only TPU topology)."""

  def __init__(self, jitted, mesh, rules):
    self.jitted, self.mesh, self.rules = jitted, mesh, rules

  def __call__(self, *args):
    with shd.activate(self.mesh, self.rules):
      return self.jitted(*args)

  def lower(self, *args):
    with shd.activate(self.mesh, self.rules):
      return self.jitted.lower(*args)


def sharded_state(model: nn.Module, tx, mesh, rules, seq_len: int,
                  init_fn: Callable | None = None) -> tuple[ShardedState, OnMesh]:
  """Abstract state + shardings, and a jitted `init(rng)` producing the state already sharded.

  `init_fn(rng) -> TrainState` (boxed, i.e. with logical-axis metadata) replaces the default
  init when given (fine-tuning adds heads/adapters this way).
  """
  init_fn = init_fn or (lambda rng: _boxed_state(rng, model, tx, seq_len))
  rng = jax.random.PRNGKey(0)
  with shd.activate(mesh, rules):
    boxed = jax.eval_shape(init_fn, rng)
  specs = nn.get_partition_spec(boxed)
  shardings = shd.logical_to_shardings(specs, mesh, rules)
  unboxed = nn.unbox(boxed)
  shd.check_divisible(unboxed.params, shardings.params)
  abstract = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), unboxed, shardings)

  init = OnMesh(jax.jit(lambda k: nn.unbox(init_fn(k)), out_shardings=shardings), mesh, rules)
  return ShardedState(abstract, shardings), init


def param_count(params) -> int:
  """Number of scalars in a parameter tree."""
  return sum(int(x.size) for x in jax.tree_util.tree_leaves(params))


def shard_shapes(tree) -> list[tuple]:
  """Per-leaf shape of the first addressable shard (to check that arrays really are split)."""
  return [tuple(x.addressable_shards[0].data.shape) for x in jax.tree_util.tree_leaves(tree)]

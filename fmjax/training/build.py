"""Assemble a run from its config: model, optimizer, sharded state, compiled steps.

One place that train, finetune, bench and plan all use, so they compile the same step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Callable

import jax
import jax.numpy as jnp
import flax.linen as nn

from fmjax.objectives import mlm
from fmjax.training import optim
from fmjax.parallel import sharding as shd
from fmjax.training import state as state_lib
from fmjax.training import step as step_lib
from fmjax.model import Transformer, attention, quantization
from fmjax.model.transformer import is_encoder


@dataclass
class Run:
  """The compiled pieces of one training run."""
  cfg: Any
  mesh: jax.sharding.Mesh
  rules: tuple
  model: nn.Module
  tx: Any
  schedule: Callable
  state: state_lib.ShardedState
  init: state_lib.OnMesh            # init(rng) -> the state, created sharded
  batch_sharding: jax.sharding.NamedSharding
  train_step: Any = None          # AOT-compiled step(state, batch) -> (state, metrics)
  compile_seconds: float = 0.0
  masked_lm: bool = False         # the objective is masked-LM (an encoder without a fine-tuning task)
  prepare: Callable | None = None   # its batch transform (fmjax/objectives/mlm.py), made with the train step or on demand

  extra_keys: tuple = ()          # the task's float32 batch keys beyond step_lib.BATCH_KEYS

  def abstract_batch(self) -> dict:
    """ShapeDtypeStructs of one global batch, with its sharding."""
    shape = (self.cfg.global_batch_size, self.cfg.seq_len)
    return {k: jax.ShapeDtypeStruct(shape, jnp.int32 if k in step_lib.BATCH_KEYS[:4] else jnp.float32,
                                    sharding=self.batch_sharding) for k in step_lib.BATCH_KEYS + self.extra_keys}

  def compile_train_step(self, step_fn: Callable) -> None:
    """Lower and compile `step_fn` ahead of time with the run's shardings (donated state)."""
    jitted = step_lib.jit_train_step(step_fn, self.state.shardings, self.batch_sharding, shd.replicated(self.mesh),
                                     self.extra_keys)
    start = time.perf_counter()
    with shd.activate(self.mesh, self.rules):
      self.train_step = jitted.lower(self.state.abstract, self.abstract_batch()).compile()
    self.compile_seconds = time.perf_counter() - start

  def jit_eval_step(self, token_bytes=None) -> state_lib.OnMesh:
    """The eval step, jitted for this mesh (params sharded like training, metrics replicated)."""
    if self.masked_lm and self.prepare is None:
      self.prepare = mlm.preparer_for(self.cfg)
    fn = jax.jit(step_lib.make_eval_step(self.model, token_bytes, self.prepare),
                 in_shardings=(self.state.shardings.params, {k: self.batch_sharding for k in step_lib.BATCH_KEYS}),
                 out_shardings=shd.replicated(self.mesh))
    return state_lib.OnMesh(fn, self.mesh, self.rules)


@dataclass(frozen=True)
class Task:
  """What a run trains when it is not plain pretraining (fine-tuning plugs in here).

  Plain pretraining is next-token prediction for decoders and masked-LM (fmjax/objectives/mlm.py) for
  model.kind='encoder'.

  Each field left None keeps the pretraining choice: `model_cfg` (e.g. with LoRA adapters),
  `optimizer(cfg) -> (tx, schedule)`, `params(model, rng) -> boxed params` (e.g. the LM plus a
  head), `loss(model) -> loss(params, batch, rng)`, `packed` (whether rows pack several
  documents, which the attention choice depends on; default data.packing) and `extra_keys` (float32
  (B, T) batch keys the loss reads beyond the standard ones, e.g. DPO's reference log-probabilities).
  """
  model_cfg: Any = None
  optimizer: Callable | None = None
  params: Callable | None = None
  loss: Callable | None = None
  packed: bool | None = None
  extra_keys: tuple = ()


def build_run(cfg, mesh: jax.sharding.Mesh | None = None, task: Task | None = None,
              compile_step: bool = True) -> Run:
  """Everything to train the configured model on `mesh` (default: from cfg.mesh): the one builder
  of pretraining, fine-tuning, bench, plan and the tools that load a checkpoint.

  model.attention is resolved for the mesh's platform (a TPU topology compiled from a CPU host
  gets the TPU kernels) and the choice is logged once.
  """
  task = task or Task()
  mesh = mesh or shd.make_mesh(cfg.mesh)
  rules = shd.axis_rules(cfg)
  check_batch(cfg, mesh)
  packed = cfg.data.packing if task.packed is None else task.packed
  device = mesh.devices.flat[0]
  model = quantization.quantize(Transformer(attention.for_run(task.model_cfg or cfg.model, seq_len=cfg.seq_len,
                                                              packed=packed, platform=device.platform)),
                                device.platform, device)
  if task.optimizer is not None:
    tx, schedule = task.optimizer(cfg)
  else:
    tx, schedule = optim.make_optimizer(cfg.optim, cfg.steps), optim.learning_rate_schedule(cfg.optim, cfg.steps)
  init_fn = None
  if task.params is not None:
    def init_fn(rng):
      params = task.params(model, rng)
      return state_lib.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params))
  sharded, init = state_lib.sharded_state(model, tx, mesh, rules, cfg.seq_len, init_fn=init_fn)
  run = Run(cfg=cfg, mesh=mesh, rules=rules, model=model, tx=tx, schedule=schedule, state=sharded, init=init,
            batch_sharding=shd.batch_sharding(mesh, rules), extra_keys=tuple(task.extra_keys))
  run.masked_lm = task.loss is None and is_encoder(model.cfg)
  if compile_step:
    if run.masked_lm:  # masked-LM pretraining: the masks are made inside the step
      run.prepare = mlm.preparer_for(cfg)
    loss = (task.loss(model) if task.loss is not None
            else step_lib.lm_loss_fn(model, cfg.z_loss, cfg.model.loss_vocab_chunk))
    run.compile_train_step(step_lib.make_train_step(
        loss, tx, schedule, microbatches=cfg.microbatches, dropout=cfg.model.dropout > 0, seed=cfg.seed,
        skip_nonfinite=cfg.skip_nonfinite_steps > 0, prepare=run.prepare))
  return run


def build_lm_run(cfg, mesh: jax.sharding.Mesh | None = None, compile_step: bool = True) -> Run:
  """`build_run` for pretraining: next-token prediction, or masked-LM for model.kind='encoder'."""
  return build_run(cfg, mesh, compile_step=compile_step)


def check_batch(cfg, mesh) -> None:
  """The global batch (and each microbatch) must split evenly over the batch-sharding axes."""
  spec = nn.logical_to_mesh_axes(('batch',), shd.axis_rules(cfg))[0]
  axes = () if spec is None else ((spec,) if isinstance(spec, str) else tuple(spec))
  ways = 1
  for a in axes:
    ways *= mesh.shape[a]
  if cfg.global_batch_size % ways:
    raise shd.MeshError(f'global_batch_size={cfg.global_batch_size} is not divisible by the {ways} batch shards '
                        f'(mesh axes {axes}); change global_batch_size or --config.mesh.*')

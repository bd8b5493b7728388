"""Load a trained workdir: its config, checkpoint metadata, tokenizer and parameters onto a mesh.

    WORKDIR/config.json                       the resolved run config (fmjax.train writes it)
    WORKDIR/checkpoints/<step>/{state,meta}   Orbax checkpoints; meta records the model config
    WORKDIR/tokenizer.model                   copy of a SentencePiece tokenizer (meta names it)

The model section comes from the checkpoint metadata (what the parameters were made with);
`--config.*` overrides (e.g. the mesh or data) apply on top, and only the parameters are read,
straight into the shardings the mesh and logical-axis rules give them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import ml_collections

from fmjax import config as config_lib
from fmjax.checkpoint import CheckpointError


@dataclass
class Restored:
  """A trained model ready to run: config, tokenizer, model, sharded params, the Run they fit."""
  cfg: Any
  meta: dict
  step: int
  tokenizer: Any
  run: Any                 # fmjax.build.Run (uncompiled): mesh, rules, model, shardings
  params: Any
  compiled: dict = field(default_factory=dict)   # compiled functions by shape, reused across calls

  @property
  def model(self):
    return self.run.model

  @property
  def mesh(self):
    return self.run.mesh

  @property
  def context_length(self) -> int:
    """The longest sequence the model was made for: max_seq_len (learned positions) or seq_len."""
    m = self.cfg.model
    return int(m.max_seq_len) if m.positions == 'learned' else int(self.meta.get('seq_len', self.cfg.seq_len))


def mesh_overrides(spec: str | None) -> list[str]:
  """`--mesh data,fsdp,tensor` (e.g. '1,-1,1') as config overrides."""
  from fmjax import sharding as shd  # pylint: disable=import-outside-toplevel
  if not spec:
    return []
  return [f'mesh.{axis}={size}' for axis, size in shd.parse_mesh_spec(spec).items()]


def load_config(workdir: str, meta: dict | None = None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The run config of `workdir` (config.json), with the model from `meta` and overrides applied."""
  path = os.path.join(workdir, 'config.json')
  try:
    with open(path) as f:
      saved = json.load(f)
  except OSError:
    raise CheckpointError(f'no config.json in {workdir}: is it a workdir made by fmjax.train?') from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path} is not valid JSON ({e.msg}, line {e.lineno})') from None
  saved['logical_axis_rules'] = config_lib._to_tuples(saved.get('logical_axis_rules',  # pylint: disable=protected-access
                                                                  config_lib.logical_axis_rules_default()))
  cfg = config_lib.base_config()
  config_lib.check_schema(ml_collections.ConfigDict(saved), cfg)
  cfg.update(saved)
  if meta and 'model' in meta:
    cfg.model.update(meta['model'])
  cfg = config_lib.apply_overrides(cfg, list(overrides))
  return config_lib.validate(cfg)


def locate_checkpoint(path: str, step: int | None = None):
  """(Checkpointer, step, workdir) for a workdir, its checkpoints/ directory or one checkpoints/<step> directory.

  The newest finalised checkpoint unless `step` (or the step directory) names one; one-line
  CheckpointErrors otherwise. The one checkpoint locator of fmjax (restore, finetune, convert).
  """
  from fmjax.checkpoint import Checkpointer  # pylint: disable=import-outside-toplevel
  path = os.path.abspath(os.path.expanduser(path))
  if not os.path.isdir(path):
    raise CheckpointError(f'{path} does not exist: pass a workdir made by fmjax.train (or its checkpoints/ '
                          'directory, or one checkpoints/<step> directory)')
  name, path_step = os.path.basename(path), None
  if os.path.isdir(os.path.join(path, 'checkpoints')):
    directory = os.path.join(path, 'checkpoints')
  elif name.isdigit() and os.path.isdir(os.path.join(path, 'state')):
    directory, path_step = os.path.dirname(path), int(name)
  elif name == 'checkpoints':
    directory = path
  else:
    raise CheckpointError(f'no checkpoint in {path} (no checkpoints/ directory): train first with fmjax.train')
  if step is not None and path_step is not None and step != path_step:
    raise CheckpointError(f'--step={step} contradicts the step directory {path}')
  step = path_step if step is None else step
  ckpt = Checkpointer(directory, keep=1000, async_save=False)
  steps = ckpt.manager.all_steps()
  if not steps:
    ckpt.close()
    raise CheckpointError(f'no complete checkpoint in {directory}: train first with fmjax.train')
  if step is None:
    step = max(steps)
  elif step not in steps:
    ckpt.close()
    raise CheckpointError(f'{directory} has no step {step} (have {sorted(steps)})')
  return ckpt, step, os.path.dirname(directory)


def load_tokenizer(workdir: str, spec: str):
  """'byte' or a tokenizer file named relative to the workdir (absolute paths work too)."""
  from fmjax.data import tokenizers  # pylint: disable=import-outside-toplevel
  if spec == 'byte':
    return tokenizers.ByteTokenizer()
  return tokenizers.load_tokenizer(os.path.join(workdir, os.path.expanduser(spec)))


def restore(workdir: str, overrides: Sequence[str] = (), step: int | None = None) -> Restored:
  """Load the newest (or given) checkpoint's parameters of `workdir` onto the configured mesh."""
  from fmjax import build  # pylint: disable=import-outside-toplevel
  from fmjax import sharding as shd  # pylint: disable=import-outside-toplevel
  from fmjax.data import tokenizers  # pylint: disable=import-outside-toplevel
  ckpt, step, workdir = locate_checkpoint(workdir, step)
  try:
    meta = ckpt.read_metadata(step)
    cfg = load_config(workdir, meta, overrides)
    if 'scan_layers' in meta:
      cfg.model.scan_layers = bool(meta['scan_layers'])
    tokenizer = load_tokenizer(workdir, meta.get('tokenizer', cfg.data.tokenizer))
    tokenizers.check_vocab(tokenizer, cfg.model.vocab_size)
    run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh), compile_step=False)
    params = ckpt.restore(step, run.state.abstract.params, params_only=True)
  finally:
    ckpt.close()
  return Restored(cfg=cfg, meta=meta, step=step, tokenizer=tokenizer, run=run, params=params)


def random_params(restored: Restored, seed: int = 0):
  """Freshly initialised parameters of the same model and shardings (a baseline to compare with)."""
  return restored.run.init(jax.random.PRNGKey(seed)).params

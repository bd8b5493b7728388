"""Load a trained workdir: its config, checkpoint metadata, tokenizer and parameters onto a mesh.

    WORKDIR/config.json                       the resolved run config (fmjax.train writes it)
    WORKDIR/checkpoints/<step>/{state,meta}   Orbax checkpoints; meta records the model config
    WORKDIR/tokenizer.model                   copy of a SentencePiece tokenizer (meta names it)

The model section comes from the checkpoint metadata (what the parameters were made with): every
field that changes the function (shapes, RoPE theta and scaling, norm eps, activation, biases, tying)
is the checkpoint's, and an override that contradicts one is a one-line error naming both values.
Fields in MUTABLE_MODEL_KEYS (compute dtype, remat, attention implementation, ...) may change, and
`model.max_seq_len` may lower the context of a RoPE model. `--config.*` overrides (e.g. the mesh or
data) apply on top, and only the parameters are read, straight into the shardings the mesh and
logical-axis rules give them.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any, Sequence

import jax
import ml_collections

from fmjax import config as config_lib
from fmjax.config import roles
from fmjax.runtime import paths
from fmjax.checkpoints.store import CheckpointError

# Model fields a run may set differently from the checkpoint it loads (roles 'restore' and 'resume',
# fmjax/config/roles.py): how the function is trained or computed (precision, memory, kernels, layout),
# not which function it is; plus `lora`, the adapter section fine-tuning adds to a model config.
MUTABLE_MODEL_KEYS = config_lib.keys_with_role(roles.RESTORE, roles.RESUME, section='model') + ('lora',)


@dataclass
class Restored:
  """A trained model ready to run: config, tokenizer, model, sharded params, the Run they fit."""
  cfg: Any
  meta: dict
  step: int
  tokenizer: Any
  run: Any                 # fmjax.training.build.Run (uncompiled): mesh, rules, model, shardings
  params: Any
  compiled: dict = field(default_factory=dict)   # compiled functions by shape, reused across calls
  context_limit: int | None = None                # a lower context asked for (model.max_seq_len override)

  @property
  def model(self):
    return self.run.model

  @property
  def mesh(self):
    return self.run.mesh

  @property
  def context_length(self) -> int:
    """The longest sequence the model was made for: model.max_seq_len (the learned positions table, or an
    imported model's max_position_embeddings) or the training seq_len if longer (RoPE), lowered by
    `context_limit`."""
    m = self.cfg.model
    natural = int(m.max_seq_len)
    if m.positions != 'learned':
      natural = max(natural, int(self.meta.get('seq_len', self.cfg.seq_len)))
    return min(natural, self.context_limit) if self.context_limit else natural


def mesh_overrides(spec: str | None) -> list[str]:
  """`--mesh data,fsdp,tensor` (e.g. '1,-1,1') as config overrides."""
  from fmjax.parallel import sharding as shd  # pylint: disable=import-outside-toplevel
  if not spec:
    return []
  return [f'mesh.{axis}={size}' for axis, size in shd.parse_mesh_spec(spec).items()]


def explicit_model_keys(overrides: Sequence[str]) -> set[str]:
  """Model fields named by `--config.model.KEY=VALUE` overrides."""
  keys = set()
  for item in overrides:
    text = item[len('--config.'):] if item.startswith('--config.') else item
    path = text.split('=', 1)[0].split('.')
    if len(path) == 2 and path[0] == 'model':
      keys.add(path[1])
  return keys


def _same(a, b) -> bool:
  if isinstance(a, (int, float)) and isinstance(b, (int, float)) and not isinstance(a, bool):
    return float(a) == float(b)
  if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
    return list(a) == list(b)
  return a == b


def adopt_model(model_cfg, meta: dict, explicit: Sequence[str] | set, where: str):
  """`model_cfg` with every field the checkpoint defines taken from its metadata (MUTABLE_MODEL_KEYS kept).

  A field in `explicit` (given on the command line) that contradicts the checkpoint is a CheckpointError
  naming both values; `max_seq_len` may be lowered for RoPE models (the context, not a shape).
  """
  saved = meta.get('model') or {}
  out = model_cfg.copy_and_resolve_references()
  for key, value in saved.items():
    if key not in out or key in MUTABLE_MODEL_KEYS or isinstance(out[key], ml_collections.ConfigDict):
      continue
    lowered = key == 'max_seq_len' and saved.get('positions') == 'rope' and out[key] <= value
    if key in explicit and not _same(out[key], value) and not lowered:
      raise CheckpointError(f'model.{key}={out[key]!r} (config) contradicts the checkpoint {where}, which has '
                            f'model.{key}={value!r}: the checkpoint defines the model; drop the override')
    if key in explicit and lowered:
      continue
    with out.unlocked():
      out[key] = tuple(value) if isinstance(value, list) else value
  if 'scan_layers' in meta:   # the saved layout (fmjax-convert params-only --layout changes it)
    out.scan_layers = bool(meta['scan_layers'])
  return out


def load_config(workdir: str, meta: dict | None = None, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """The run config of `workdir` (config.json), with the model from `meta` and overrides applied (an
  override contradicting the checkpoint's model is an error, see `adopt_model`)."""
  path = paths.join(workdir, 'config.json')
  try:
    saved = json.loads(paths.read_text(path))
  except OSError:
    raise CheckpointError(f'no config.json in {workdir}: is it a workdir made by fmjax.train?') from None
  except json.JSONDecodeError as e:
    raise CheckpointError(f'{path} is not valid JSON ({e.msg}, line {e.lineno})') from None
  saved['logical_axis_rules'] = config_lib._to_tuples(saved.get('logical_axis_rules',  # pylint: disable=protected-access
                                                                  config_lib.logical_axis_rules_default()))
  cfg = config_lib.base_config()
  config_lib.check_schema(ml_collections.ConfigDict(saved), cfg)
  cfg.update(saved)
  cfg = config_lib.apply_overrides(cfg, list(overrides))
  if meta and 'model' in meta:
    cfg.model = adopt_model(cfg.model, meta, explicit_model_keys(overrides), paths.join(workdir, 'checkpoints'))
  return config_lib.validate(cfg)


def locate_checkpoint(path: str, step: int | None = None):
  """(Checkpointer, step, workdir) for a workdir, its checkpoints/ directory or one checkpoints/<step> directory.

  The newest finalised checkpoint unless `step` (or the step directory) names one; one-line
  CheckpointErrors otherwise. The one checkpoint locator of fmjax (restore, finetune, convert).
  """
  from fmjax.checkpoints.store import Checkpointer  # pylint: disable=import-outside-toplevel
  path = paths.resolve(path)
  if not paths.isdir(path):
    raise CheckpointError(f'{path} does not exist: pass a workdir made by fmjax.train (or its checkpoints/ '
                          'directory, or one checkpoints/<step> directory)')
  name, path_step = paths.basename(path), None
  if paths.isdir(paths.join(path, 'checkpoints')):
    directory = paths.join(path, 'checkpoints')
  elif name.isdigit() and paths.isdir(paths.join(path, 'state')):
    directory, path_step = paths.dirname(path), int(name)
  elif name == 'checkpoints':
    directory = path
  else:
    raise CheckpointError(f'no checkpoint in {path} (no checkpoints/ directory): train first with fmjax.train')
  if step is not None and path_step is not None and step != path_step:
    raise CheckpointError(f'--step={step} contradicts the step directory {path}')
  step = path_step if step is None else step
  ckpt = Checkpointer.open_for_reading(directory)
  steps = ckpt.manager.all_steps()
  if not steps:
    ckpt.close()
    raise CheckpointError(f'no complete checkpoint in {directory}: train first with fmjax.train')
  if step is None:
    step = max(steps)
  elif step not in steps:
    ckpt.close()
    raise CheckpointError(f'{directory} has no step {step} (have {sorted(steps)})')
  return ckpt, step, paths.dirname(directory)


def tokenizer_path(workdir: str, spec: str) -> str:
  """A checkpoint's tokenizer `spec` as a data.tokenizer value: 'byte', or the file (named relative to
  the workdir; absolute paths and URLs as they are)."""
  if spec == 'byte':
    return spec
  spec = os.path.expanduser(spec)
  return spec if os.path.isabs(spec) or paths.is_url(spec) else paths.join(workdir, spec)


def load_tokenizer(workdir: str, spec: str):
  """'byte' or a tokenizer file named relative to the workdir (absolute paths work too)."""
  from fmjax.data import tokenizers  # pylint: disable=import-outside-toplevel
  return tokenizers.load_tokenizer(tokenizer_path(workdir, spec))


def restore(workdir: str, overrides: Sequence[str] = (), step: int | None = None) -> Restored:
  """Load the newest (or given) checkpoint's parameters of `workdir` onto the configured mesh."""
  from fmjax.training import build  # pylint: disable=import-outside-toplevel
  from fmjax.parallel import sharding as shd  # pylint: disable=import-outside-toplevel
  from fmjax.data import tokenizers  # pylint: disable=import-outside-toplevel
  ckpt, step, workdir = locate_checkpoint(workdir, step)
  try:
    meta = ckpt.read_metadata(step)
    cfg = load_config(workdir, meta, overrides)
    saved_len = (meta.get('model') or {}).get('max_seq_len', cfg.model.max_seq_len)
    limit = int(cfg.model.max_seq_len) if 'max_seq_len' in explicit_model_keys(overrides) else None
    cfg.model.max_seq_len = saved_len
    spec = meta.get('tokenizer', cfg.data.tokenizer)
    if not spec:
      raise CheckpointError(f'the checkpoint in {workdir} records no tokenizer: import the model again with one '
                            '(fmjax-convert from-hf --tokenizer byte|FILE, or a HF directory with tokenizer files)')
    tokenizer = load_tokenizer(workdir, spec)
    tokenizers.check_vocab(tokenizer, cfg.model.vocab_size)
    run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh), compile_step=False)
    params = ckpt.restore(step, run.state.abstract.params, params_only=True)
  finally:
    ckpt.close()
  return Restored(cfg=cfg, meta=meta, step=step, tokenizer=tokenizer, run=run, params=params, context_limit=limit)


def random_params(restored: Restored, seed: int = 0):
  """Freshly initialised parameters of the same model and shardings (a baseline to compare with)."""
  return restored.run.init(jax.random.PRNGKey(seed)).params

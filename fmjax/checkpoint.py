"""Orbax checkpoints: train state + data-iterator state + metadata, restorable onto any mesh.

Layout: WORKDIR/checkpoints/<step>/{state, meta, data}. `meta` (JSON) records the model config,
scan layout, tokenizer and fmjax version, so later tools need no flags the checkpoint knows.
Only finalised checkpoints are seen: an interrupted save is ignored and the previous one used.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import orbax.checkpoint as ocp

import fmjax

# Model options that change parameter shapes or structure: a mismatch cannot be restored.
SHAPE_KEYS = ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'num_kv_heads', 'head_dim', 'mlp_dim',
              'max_seq_len', 'activation', 'norm', 'positions', 'use_bias', 'tie_embeddings')


class CheckpointError(ValueError):
  """A checkpoint that cannot be used with this config."""


def make_metadata(cfg, tokenizer_spec: str | None = None, extra: dict | None = None) -> dict:
  """What a checkpoint records besides arrays."""
  meta = {
      'fmjax_version': fmjax.__version__,
      'model': cfg.model.to_dict(),
      'scan_layers': bool(cfg.model.scan_layers),
      'tokenizer': tokenizer_spec if tokenizer_spec is not None else cfg.data.tokenizer,
      'seq_len': cfg.seq_len,
      'mesh': cfg.mesh.to_dict(),
  }
  meta.update(extra or {})
  return meta


def check_compatible(meta: dict, model_cfg, where: str) -> None:
  """Raise CheckpointError naming the first shape-defining option that differs."""
  saved = meta.get('model', {})
  for key in SHAPE_KEYS:
    if key in saved and saved[key] != model_cfg[key]:
      raise CheckpointError(f'checkpoint {where} has model.{key}={saved[key]!r} but the config has '
                            f'{model_cfg[key]!r}; use the matching config or another --workdir')
  if 'scan_layers' in meta and meta['scan_layers'] != model_cfg.scan_layers:
    raise CheckpointError(f'checkpoint {where} was saved with model.scan_layers={meta["scan_layers"]}; set '
                          f'--config.model.scan_layers={str(meta["scan_layers"]).lower()} (or convert it with '
                          'tools/convert_checkpoint.py)')


class Checkpointer:
  """A thin CheckpointManager wrapper: save every N steps, keep K, resume from the latest."""

  def __init__(self, directory: str, keep: int = 3, async_save: bool = True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=async_save,
                                           create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options)

  def latest_step(self) -> int | None:
    """The newest finalised checkpoint step, or None."""
    return self.manager.latest_step()

  def save(self, step: int, state, meta: dict, data_arg: Any = None, force: bool = False) -> bool:
    """Start a (possibly async) save of state, metadata and the data-iterator state."""
    items = dict(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
    if data_arg is not None:
      items['data'] = data_arg
    return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

  def read_metadata(self, step: int) -> dict:
    """The JSON metadata of a checkpoint."""
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    except Exception as e:  # noqa: BLE001 - report any Orbax failure as one line
      raise CheckpointError(f'cannot read metadata of checkpoint {self.directory}/{step}: '
                            f'{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ""}') from e
    return dict(out['meta'])

  def restore(self, step: int, abstract_state, data_arg: Any = None, params_only: bool = False):
    """Restore onto the shardings carried by `abstract_state` (any mesh). Returns the state.

    With `params_only`, `abstract_state` is a params tree and only the parameters are read.
    """
    if params_only:
      target = {'params': abstract_state}
      items = dict(state=ocp.args.PyTreeRestore(
          item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target), partial_restore=True))
    else:
      items = dict(state=ocp.args.StandardRestore(abstract_state))
    if data_arg is not None:
      items['data'] = data_arg
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(**items))
    except Exception as e:  # noqa: BLE001
      first = str(e).strip().splitlines()[0] if str(e).strip() else ''
      raise CheckpointError(f'cannot restore checkpoint {self.directory}/{step} ({type(e).__name__}: '
                            f'{first[:300]}); is it complete and made with this model config?') from e
    state = out['state']
    return state['params'] if params_only else state

  def wait(self) -> None:
    """Block until pending async saves are complete."""
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def abstract_like(tree):
  """ShapeDtypeStructs (with shardings) of a live tree."""
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)

"""The fmjax side: find a checkpoint, resolve its model config from `meta`, restore only its params."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass

import jax
import jax.numpy as jnp
import flax.linen as nn
import ml_collections

from fmjax import config as config_lib
from fmjax.parallel import sharding as shd
from fmjax.checkpoints.store import SHAPE_KEYS, Checkpointer
from fmjax.convert.mapping import ConversionError
from fmjax.model import Transformer
from fmjax.checkpoints.restore import locate_checkpoint


@dataclass
class Source:
  """A checkpoint to convert and what its metadata says."""
  workdir: str
  step: int
  meta: dict
  model: ml_collections.ConfigDict     # model config; model.scan_layers = the saved layout
  tokenizer: str | None                # 'byte', a path, or None when unknown

  @property
  def checkpoint_dir(self) -> str:
    return os.path.join(self.workdir, 'checkpoints')


def model_config(options: dict) -> ml_collections.ConfigDict:
  """model_defaults() updated with known options (unknown ones are ignored)."""
  m = config_lib.model_defaults()
  m.update({k: v for k, v in options.items() if k in m})
  return m


def _check_flag(name: str, flag, saved, where: str):
  """An explicit flag may fill in what meta lacks; a contradiction is an error."""
  if flag is None:
    return saved
  if saved is not None and flag != saved:
    raise ConversionError(f'{name}={flag!r} contradicts the checkpoint metadata ({saved!r}) in {where}')
  return flag


def open_source(path: str, step: int | None = None, model_json: str | None = None, scanned: bool | None = None,
                tokenizer: str | None = None) -> Source:
  """Resolve a checkpoint and its model config, scan layout and tokenizer from `meta` (flags may fill gaps)."""
  ckpt, step, workdir = locate_checkpoint(path, step)
  where = f'{workdir}/checkpoints/{step}'
  try:
    meta = ckpt.read_metadata(step)
  except Exception:  # noqa: BLE001 - older checkpoints may lack meta: flags must then say it all
    meta = {}
  ckpt.close()

  saved_model = meta.get('model')
  if model_json:
    with open(model_json) as f:
      given = json.load(f)
    given = given.get('model', given)  # a run's config.json or a bare model section
    if saved_model:
      for key in SHAPE_KEYS:
        if key in given and key in saved_model and given[key] != saved_model[key]:
          raise ConversionError(f'--model-config {model_json}: model.{key}={given[key]!r} contradicts the '
                                f'checkpoint metadata ({saved_model[key]!r}) in {where}')
    saved_model = {**(saved_model or {}), **given}
  if not saved_model:
    raise ConversionError(f'{where} has no model config in its metadata; pass --model-config CONFIG.json')
  model = model_config(saved_model)
  name = lambda flag: None if flag is None else ('scanned' if flag else 'unrolled')
  layout = _check_flag('--source-layout', name(scanned), name(meta.get('scan_layers')), where)
  model.scan_layers = bool(saved_model.get('scan_layers', True)) if layout is None else layout == 'scanned'

  saved_tok = meta.get('tokenizer')
  if saved_tok and saved_tok != 'byte' and not os.path.isabs(saved_tok):
    saved_tok = os.path.join(workdir, saved_tok)
  if tokenizer and tokenizer != 'byte':
    tokenizer = os.path.abspath(tokenizer)
  tok = _check_flag('--tokenizer', tokenizer, saved_tok, where)
  return Source(workdir=workdir, step=step, meta=meta, model=model, tokenizer=tok)


def single_device_mesh():
  return shd.make_mesh({'data': 1, 'fsdp': 1, 'tensor': 1}, devices=jax.devices()[:1])


def mesh_of(spec: str | None):
  """'data,fsdp,tensor' (e.g. '1,4,2'; one may be -1) -> a mesh over the first devices; None -> one device."""
  if not spec:
    return single_device_mesh()
  dims = shd.parse_mesh_spec(spec)
  if -1 in dims.values():
    return shd.make_mesh(dims)
  n = math.prod(dims.values())
  if n > jax.device_count():
    raise ConversionError(f'--mesh {spec}: needs {n} devices but {jax.device_count()} are available')
  return shd.make_mesh(dims, devices=jax.devices()[:n])


def abstract_params(model_cfg, mesh=None, dtype=None, rules=None):
  """ShapeDtypeStructs (with shardings on `mesh`) of the model's params, never materialised."""
  mesh = mesh or single_device_mesh()
  rules = rules or config_lib.logical_axis_rules_default()
  model = Transformer(model_cfg)
  with shd.activate(mesh, rules):
    boxed = jax.eval_shape(lambda: model.init({'params': jax.random.PRNGKey(0)}, jnp.zeros((1, 1), jnp.int32)))
  boxed = boxed['params']
  shardings = shd.logical_to_shardings(nn.get_partition_spec(boxed), mesh, rules)
  unboxed = nn.unbox(boxed)
  shd.check_divisible(unboxed, shardings)
  return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype or x.dtype, sharding=s), unboxed, shardings)


def restore_params(src: Source, mesh=None, dtype=None):
  """Only the parameters (no optimizer state), cast to `dtype` as they are read, on `mesh`."""
  target = abstract_params(src.model, mesh, dtype)
  ckpt = Checkpointer.open_for_reading(src.checkpoint_dir)
  try:
    return ckpt.restore(src.step, target, params_only=True)
  finally:
    ckpt.close()

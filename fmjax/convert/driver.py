"""Conversions, tensor by tensor: fmjax -> HF, HF -> fmjax, training checkpoint -> params-only."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import time

import jax
import numpy as np

from fmjax import config as config_lib
from fmjax.checkpoint import Checkpointer, make_metadata
from fmjax.convert import gpt2, hf_io, hf_tokenizer, llama, source
from fmjax.convert.mapping import ConversionError, expand, locate
from fmjax.model import layout
from fmjax.model.layers import dtype_of

FAMILIES = {'llama': llama, 'gpt2': gpt2}


def pick_family(model_cfg, name: str | None = None):
  """The family module for an fmjax model config (checked against an explicit --family)."""
  if name:
    if name not in FAMILIES:
      raise ConversionError(f'--family {name!r}: expected one of {", ".join(FAMILIES)}')
    why = FAMILIES[name].mismatch(model_cfg)
    if why:
      raise ConversionError(f'--family {name} contradicts the checkpoint model config: {why}')
    return FAMILIES[name]
  reasons = {}
  for fam_name, fam in FAMILIES.items():
    reasons[fam_name] = fam.mismatch(model_cfg)
    if reasons[fam_name] is None:
      return fam
  raise ConversionError('the model matches no Hugging Face family: ' +
                        '; '.join(f'{k}: {v}' for k, v in reasons.items()))


def family_for(hf_config: dict):
  kind = hf_config.get('model_type')
  for fam in FAMILIES.values():
    if kind in fam.MODEL_TYPES:
      return fam
  known = ', '.join(t for f in FAMILIES.values() for t in f.MODEL_TYPES)
  raise ConversionError(f'config.json: model_type={kind!r} is not supported (supported: {known})')


def _leaf_paths(tree) -> set:
  return {'/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fm_key(path: str, layer, scanned: bool) -> str:
  return '/'.join(locate(path, layer, scanned)[0])


def _check_coverage(table, tree, scanned: bool) -> None:
  """Every fmjax parameter is produced by exactly the table (no parameter silently dropped)."""
  mapped = {_fm_key(p, layer, scanned) for _, layer, rule in table for p in rule.fm}
  missing = sorted(_leaf_paths(tree) - mapped)
  if missing:
    raise ConversionError(f'fmjax parameter {missing[0]} has no Hugging Face counterpart in this family')


# -- fmjax -> Hugging Face -------------------------------------------------------------------------

def to_hf(src: source.Source, out_dir: str, family: str | None = None, dtype: str | None = None,
          max_shard_bytes: int = 5 * 10**9, log=print) -> dict:
  """Export a checkpoint as a HF model directory (config.json, safetensors, tokenizer, README.md)."""
  start = time.perf_counter()
  m = src.model
  fam = pick_family(m, family)
  dtype = dtype or m.param_dtype
  params = source.restore_params(src, dtype=dtype_of(dtype))
  table = expand(fam.rules(m), m.num_layers)
  _check_coverage(table, params, m.scan_layers)
  itemsize = np.dtype(dtype_of(dtype)).itemsize
  by_name = {name: (layer, rule) for name, layer, rule in table}
  shards = hf_io.plan_shards({n: math.prod(r.hf_shape) * itemsize for n, (_, r) in by_name.items()},
                             max_shard_bytes)

  def produce(name):
    layer, rule = by_name[name]
    arrays = []
    for path in rule.fm:
      keys, index = locate(path, layer, m.scan_layers)
      leaf = params
      for k in keys:
        leaf = leaf[k]
      arrays.append(np.asarray(jax.device_get(leaf if index is None else leaf[index])))
    return rule.to_hf(*arrays)

  os.makedirs(out_dir, exist_ok=True)
  files = hf_io.write_shards(out_dir, shards, produce)
  hf_config = dict(fam.to_hf_config(m), dtype=dtype, torch_dtype=dtype)
  with open(os.path.join(out_dir, 'config.json'), 'w') as f:
    json.dump(hf_config, f, indent=2, sort_keys=True)
  tok_note = hf_tokenizer.export_tokenizer(src.tokenizer, src.workdir, out_dir, src.meta.get('seq_len', m.max_seq_len))
  with open(os.path.join(out_dir, 'README.md'), 'w') as f:
    f.write(f'# {fam.ARCHITECTURE} exported by fmjax\n\nFrom `{src.workdir}` step {src.step} '
            f'({dtype}, {len(files)} safetensors file(s)).\n\n{tok_note}')
  seconds = time.perf_counter() - start
  log(f'wrote {out_dir}: {fam.ARCHITECTURE}, {len(table)} tensors in {len(files)} file(s), {dtype}, {seconds:.1f}s')
  return dict(params=params, family=fam, files=files, seconds=seconds)


# -- Hugging Face -> fmjax -------------------------------------------------------------------------

def _find(name: str, names: set, prefix: str) -> str | None:
  if name in names:
    return name
  if prefix and name.startswith(prefix) and name[len(prefix):] in names:
    return name[len(prefix):]
  return None


def read_hf_params(hf_dir: str, model_cfg, fam, abstract):
  """A NumPy params tree (layout and dtypes of `abstract`) read tensor by tensor from safetensors."""
  reader = hf_io.SafetensorsReader(hf_dir)
  names, used = reader.names(), set()
  table = expand(fam.rules(model_cfg), model_cfg.num_layers)
  scanned = model_cfg.scan_layers
  flat = {'/'.join(k.key for k in p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  out, filled = {}, set()
  for name, layer, rule in table:
    actual = _find(name, names, fam.OPTIONAL_PREFIX)
    if actual is None:
      raise ConversionError(f'tensor {name} is missing from {hf_dir} (needed by config.json)')
    shape = reader.shape(actual)
    if shape != rule.hf_shape:
      raise ConversionError(f'tensor {actual} has shape {list(shape)} but config.json implies {list(rule.hf_shape)}')
    used.add(actual)
    for path, part in zip(rule.fm, rule.from_hf(reader.get(actual))):
      key = _fm_key(path, layer, scanned)
      target = flat[key]
      _, index = locate(path, layer, scanned)
      if index is None:
        out[key] = np.asarray(part, dtype=target.dtype)
      else:  # a scanned leaf: fill one layer of a preallocated stack
        if key not in out:
          out[key] = np.empty(target.shape, target.dtype)
        out[key][index] = part
      filled.add(key)
  reader.close()
  ignored = [re.compile(p) for p in fam.IGNORED]
  extra = sorted(n for n in names - used if not any(p.search(n) for p in ignored)
                 and not (model_cfg.tie_embeddings and n == 'lm_head.weight'))
  if extra:
    raise ConversionError(f'tensor {extra[0]} in {hf_dir} is not used by a {fam.NAME} model with this '
                          f'config.json ({len(extra)} unused)')
  missing = sorted(set(flat) - filled)
  if missing:
    raise ConversionError(f'fmjax parameter {missing[0]} was not filled from {hf_dir}')
  return out


def _nest(flat: dict) -> dict:
  tree = {}
  for key in list(flat):
    node = tree
    *parents, leaf = key.split('/')
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = flat.pop(key)   # pop: the flat dict no longer holds it
  return tree


def to_device(np_tree, abstract):
  """Place each NumPy leaf on its sharding, dropping the host copy as it goes."""
  flat_abs = {'/'.join(k.key for k in p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}

  def walk(node, prefix):
    for k in list(node):
      key = f'{prefix}{k}'
      if isinstance(node[k], dict):
        walk(node[k], key + '/')
      else:
        node[k] = jax.device_put(node[k], flat_abs[key].sharding)
  walk(np_tree, '')
  return np_tree


def save_params(out_workdir: str, step: int, params, meta: dict) -> str:
  """Write a params-only checkpoint OUT/checkpoints/<step>/{state,meta}."""
  ckpt = Checkpointer(os.path.join(out_workdir, 'checkpoints'), keep=1000, async_save=False)
  try:
    if step in ckpt.manager.all_steps():
      raise ConversionError(f'{out_workdir}/checkpoints/{step} already exists; choose another output directory')
    ckpt.save(step, {'params': params}, meta, force=True)
    ckpt.wait()
  finally:
    ckpt.close()
  return os.path.join(out_workdir, 'checkpoints', str(step))


def run_config(model_cfg, seq_len: int | None = None, mesh=None):
  """A full run config around a model config (for make_metadata and validation)."""
  cfg = config_lib.base_config()
  cfg.model = model_cfg
  cfg.seq_len = min(seq_len or cfg.seq_len, model_cfg.max_seq_len)
  if mesh is not None:
    cfg.mesh.update(dict(mesh.shape))
  try:
    return config_lib.validate(cfg)
  except config_lib.ConfigError as e:
    raise ConversionError(f'the converted model config is invalid: {e}') from None


def _tokenizer_spec(found: str | None, flag: str | None, out_workdir: str, hf_dir: str) -> str | None:
  """The HF dir's tokenizer.model, else --tokenizer ('byte' or a .model copied in); both: an error."""
  if flag is None:
    return found
  if found is not None:
    raise ConversionError(f'--tokenizer={flag!r} contradicts the tokenizer.model in {hf_dir}')
  if flag == 'byte':
    return flag
  if not os.path.isfile(flag):
    raise ConversionError(f"--tokenizer={flag!r}: not 'byte' or an existing SentencePiece .model file")
  shutil.copyfile(flag, os.path.join(out_workdir, 'tokenizer.model'))
  return 'tokenizer.model'


def from_hf(hf_dir: str, out_workdir: str, scan_layers: bool = True, dtype: str = 'float32', mesh_spec=None,
            step: int = 0, tokenizer: str | None = None, log=print) -> dict:
  """Import a HF Llama/Mistral/GPT-2 directory as a params-only fmjax checkpoint."""
  start = time.perf_counter()
  hf_config = hf_io.read_config(hf_dir)
  fam = family_for(hf_config)
  m = source.model_config(fam.from_hf_config(hf_config))
  m.scan_layers, m.param_dtype = bool(scan_layers), dtype
  mesh = source.mesh_of(mesh_spec)
  cfg = run_config(m, mesh=mesh)
  abstract = source.abstract_params(m, mesh)
  params = to_device(_nest(read_hf_params(hf_dir, m, fam, abstract)), abstract)
  os.makedirs(out_workdir, exist_ok=True)
  spec = _tokenizer_spec(hf_tokenizer.import_tokenizer(hf_dir, out_workdir), tokenizer, out_workdir, hf_dir)
  if spec is None:
    log(f'note: {hf_dir} has no SentencePiece tokenizer.model; its tokenizer files are kept in '
        f'{hf_tokenizer.KEPT_DIR}/ but fmjax cannot run them (pass --tokenizer to record one)')
  meta = make_metadata(cfg, spec, extra=dict(tokenizer=spec, params_only=True, converted_from=os.path.abspath(hf_dir),
                                             hf_architecture=fam.ARCHITECTURE))
  config_lib.save(cfg, os.path.join(out_workdir, 'config.json'))
  path = save_params(out_workdir, step, params, meta)
  seconds = time.perf_counter() - start
  log(f'wrote {path}: {fam.NAME} model, {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params, '
      f'{dtype}, {"scanned" if m.scan_layers else "unrolled"} layers, {seconds:.1f}s')
  return dict(params=params, model=m, family=fam, path=path, seconds=seconds)


# -- training checkpoint -> params-only ------------------------------------------------------------

def _save_run_config(source_path: str, cfg, out_path: str) -> None:
  """The source run's config.json with the converted model section (else the defaults around it)."""
  if os.path.isfile(source_path):
    with open(source_path) as f:
      saved = json.load(f)
    saved['model'] = cfg.model.to_dict()
    with open(out_path, 'w') as f:
      json.dump(saved, f, indent=2, sort_keys=True, default=list)
  else:
    config_lib.save(cfg, out_path)


def params_only(src: source.Source, out_workdir: str, dtype: str | None = None, scan_layers: bool | None = None,
                mesh_spec: str | None = None, log=print) -> dict:
  """Drop the optimizer state; optionally cast, change the layer layout or the sharding; save."""
  start = time.perf_counter()
  dtype = dtype or src.model.param_dtype
  mesh = source.mesh_of(mesh_spec)
  params = source.restore_params(src, mesh, dtype_of(dtype))
  target = src.model.copy_and_resolve_references()
  target.param_dtype = dtype
  if scan_layers is not None and scan_layers != target.scan_layers:
    target.scan_layers = scan_layers
    params = layout.to_layout(params, scan_layers, target.num_layers)
    abstract = source.abstract_params(target, mesh, dtype_of(dtype))
    params = jax.tree.map(lambda x, a: jax.device_put(x, a.sharding), params, abstract)
  cfg = run_config(target, src.meta.get('seq_len'), mesh)
  meta = dict(src.meta)
  tok = meta.get('tokenizer')
  meta.update(make_metadata(cfg, tok if tok is not None else src.tokenizer))
  meta.update(params_only=True, converted_from=f'{src.workdir}/checkpoints/{src.step}')
  os.makedirs(out_workdir, exist_ok=True)
  for name in ('tokenizer.model', hf_tokenizer.KEPT_DIR):  # files the metadata refers to
    here = os.path.join(src.workdir, name)
    there = os.path.join(out_workdir, name)
    if os.path.isfile(here):
      shutil.copyfile(here, there)
    elif os.path.isdir(here) and not os.path.exists(there):
      shutil.copytree(here, there)
  _save_run_config(os.path.join(src.workdir, 'config.json'), cfg, os.path.join(out_workdir, 'config.json'))
  path = save_params(out_workdir, src.step, params, meta)
  seconds = time.perf_counter() - start
  log(f'wrote {path}: params only, {dtype}, {"scanned" if target.scan_layers else "unrolled"} layers, '
      f'mesh {"x".join(str(v) for v in mesh.shape.values())}, {seconds:.1f}s')
  return dict(params=params, model=target, path=path, seconds=seconds)

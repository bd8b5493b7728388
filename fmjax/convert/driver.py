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
from fmjax.checkpoints.store import make_metadata
from fmjax.convert import families, hf_io, hf_tokenizer, output, source
from fmjax.convert.families import pick_family
from fmjax.convert.mapping import ConversionError, expand, locate
from fmjax.model import layout, moe
from fmjax.data import tokenizers as fm_tokenizers
from fmjax.model.layers import dtype_of


def family_for(hf_config: dict):
  """The registered family of a config.json (fmjax/convert/families): by model_type, or without one by
  the class in `architectures`."""
  return families.family_for(families.model_type_of(hf_config))


def model_from_hf_config(hf_config: dict, fam):
  """The fmjax model config of a config.json (a missing key is a one-line error)."""
  try:
    return source.model_config(fam.from_hf_config(hf_config))
  except ConversionError:   # a ValueError too: the family's own line, as it is
    raise
  except KeyError as e:
    raise ConversionError(f'config.json has no {e.args[0]!r}, which a {fam.NAME} model needs') from None
  except (TypeError, ValueError) as e:
    raise ConversionError(f'config.json has a value of the wrong type ({e})') from None


def _leaf_paths(tree) -> set:
  return {'/'.join(k.key for k in path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _fm_key(path: str, layer, scanned: bool) -> str:
  return '/'.join(locate(path, layer, scanned)[0])   # (an expert's slice lies in its stack's leaf)


def _check_coverage(table, tree, scanned: bool) -> None:
  """Every fmjax parameter is produced by exactly the table (no parameter silently dropped), each layer of a
  scanned stack and each expert of an expert stack too."""
  slices = {}
  for e in table:
    for p in e.rule.fm:
      keys, index = locate(p, e.layer, scanned, e.expert)
      slices.setdefault('/'.join(keys), set()).add(index)
  missing = sorted(_leaf_paths(tree) - set(slices))
  if missing:
    raise ConversionError(f'fmjax parameter {missing[0]} has no Hugging Face counterpart in this family')
  shapes = {'/'.join(k.key for k in path): x.shape for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]}
  for key, indices in slices.items():
    want = math.prod(shapes[key][:len(next(iter(indices)))]) if key in shapes else 1
    if len(indices) != want:
      raise ConversionError(f'fmjax parameter {key}: this family maps {len(indices)} of its {want} layers / experts')


# -- fmjax -> Hugging Face -------------------------------------------------------------------------

def to_hf(src: source.Source, out_dir: str, family: str | None = None, dtype: str | None = None,
          max_shard_bytes: int = 5 * 10**9, overwrite: bool = False, check=None, log=print) -> dict:
  """Export a checkpoint as a HF model directory (config.json, safetensors, tokenizer, README.md).

  `check(directory, result)` (e.g. --verify) runs on the written files before they become `out_dir`.
  """
  start = time.perf_counter()
  output.check_writable(out_dir, overwrite)
  m = src.model
  fam = pick_family(m, family)
  dtype = dtype or m.param_dtype
  params = source.restore_params(src, dtype=dtype_of(dtype))
  table = expand(fam.rules(m), m.num_layers)
  _check_coverage(table, params, m.scan_layers)
  itemsize = np.dtype(dtype_of(dtype)).itemsize
  by_name = {e.name: e for e in table}
  shards = hf_io.plan_shards({n: math.prod(e.rule.hf_shape) * itemsize for n, e in by_name.items()},
                             max_shard_bytes)

  def produce(name):
    entry = by_name[name]
    arrays = []
    for path in entry.rule.fm:
      keys, index = locate(path, entry.layer, m.scan_layers, entry.expert)
      leaf = params
      for k in keys:
        leaf = leaf[k]
      arrays.append(np.asarray(jax.device_get(leaf[index] if index else leaf)))
    return entry.rule.to_hf(*arrays)

  with output.staged(out_dir, overwrite, protect=(src.workdir,)) as tmp:
    files = hf_io.write_shards(tmp, shards, produce)
    hf_config = dict(fam.to_hf_config(m), dtype=dtype, torch_dtype=dtype)
    hf_config.update(hf_tokenizer.special_token_ids(src.tokenizer, src.workdir))
    with open(os.path.join(tmp, 'config.json'), 'w') as f:
      json.dump(hf_config, f, indent=2, sort_keys=True)
    context = max(m.max_seq_len, src.meta.get('seq_len', 0))
    tok_note = hf_tokenizer.export_tokenizer(src.tokenizer, src.workdir, tmp, context)
    with open(os.path.join(tmp, 'README.md'), 'w') as f:
      f.write(f'# {fam.ARCHITECTURE} exported by fmjax\n\nFrom `{src.workdir}` step {src.step} '
              f'({dtype}, {len(files)} safetensors file(s)).\n\n{tok_note}')
    result = dict(params=params, family=fam, files=files)
    if check is not None:
      check(tmp, result)
  result['seconds'] = seconds = time.perf_counter() - start
  log(f'wrote {out_dir}: {fam.ARCHITECTURE}, {len(table)} tensors in {len(files)} file(s), {dtype}, {seconds:.1f}s')
  return result


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
  _check_coverage(table, abstract, scanned)
  flat = {'/'.join(k.key for k in p): a for p, a in jax.tree_util.tree_flatten_with_path(abstract)[0]}
  out, filled = {}, set()
  for name, layer, expert, rule in table:
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
      _, index = locate(path, layer, scanned, expert)
      if not index:
        out[key] = np.asarray(part, dtype=target.dtype)
      else:  # a scanned leaf or an expert stack: fill one layer / expert of a preallocated stack
        if key not in out:
          out[key] = np.empty(target.shape, target.dtype)
        out[key][index] = part
      filled.add(key)
  if model_cfg.tie_embeddings and 'lm_head.weight' in names:
    _check_tied_head(reader, hf_dir, _find(table[0].name, names, fam.OPTIONAL_PREFIX))
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


def _check_tied_head(reader, hf_dir: str, embedding: str) -> None:
  """tie_word_embeddings with a different lm_head.weight in the file: two models in one; refuse."""
  head, table = reader.get('lm_head.weight'), reader.get(embedding)
  if head.shape != table.shape or not np.array_equal(head, table):
    raise ConversionError(f'config.json says tie_word_embeddings=true but {hf_dir} holds an lm_head.weight that '
                          f'differs from {embedding}; set tie_word_embeddings to false (or drop lm_head.weight)')


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
  """Write a params-only checkpoint OUT/checkpoints/<step>/{state,meta} (through the one checkpoint writer)."""
  from fmjax.training import session  # pylint: disable=import-outside-toplevel
  if not session.write_checkpoint(os.path.join(out_workdir, 'checkpoints'), step, {'params': params}, meta):
    raise ConversionError(f'{out_workdir}/checkpoints/{step} already exists; choose another output directory')
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
  """The HF dir's tokenizer, else --tokenizer ('byte', a tokenizer.json or a .model, copied in); both: an error."""
  if flag is None:
    return found
  if found is not None:
    raise ConversionError(f'--tokenizer={flag!r} contradicts the tokenizer files in {hf_dir}')
  if flag == 'byte':
    return flag
  if not os.path.isfile(flag):
    raise ConversionError(f"--tokenizer={flag!r}: not 'byte' or an existing tokenizer.json / SentencePiece .model")
  tok = fm_tokenizers.load_tokenizer(flag)
  if isinstance(tok, fm_tokenizers.HFTokenizer):
    return fm_tokenizers.place_in_workdir(tok, out_workdir)
  shutil.copyfile(flag, os.path.join(out_workdir, 'tokenizer.model'))
  return 'tokenizer.model'


def _adds_bos(workdir: str, spec: str | None) -> bool:
  """Whether the imported tokenizer puts bos before a text (Llama yes, GPT-2 no): fmjax's data.add_bos."""
  if spec is None or spec == 'byte' or not spec.endswith('.json'):
    return True
  tok = fm_tokenizers.HFTokenizer(os.path.join(workdir, spec))
  return tok.bos_id in tok.encode_with_specials('a')[:1]


def _layout(m, scan_layers: bool | None) -> bool:
  """Whether the import scans its layers: as asked, else scanned unless dense and MoE layers mix."""
  dense = [i for i in range(m.num_layers) if moe.is_moe(m) and not moe.is_moe_layer(m, i)]
  if scan_layers and dense:
    raise ConversionError(f'--layout scanned: layers {", ".join(map(str, dense))} are dense and the others MoE, '
                          'and a scanned stack needs every layer alike; use --layout unrolled (the default here)')
  return not dense if scan_layers is None else bool(scan_layers)


def from_hf(hf_dir: str, out_workdir: str, scan_layers: bool | None = None, dtype: str = 'float32', mesh_spec=None,
            step: int = 0, tokenizer: str | None = None, max_seq_len: int | None = None, overwrite: bool = False,
            check=None, log=print) -> dict:
  """Import a HF directory of a registered family (fmjax/convert/families) as a params-only fmjax checkpoint
  (a new workdir).

  `max_seq_len` lowers the context (RoPE models); `check(hf_dir, result)` runs before the output is kept.
  `scan_layers` None: scanned, unless dense and MoE layers mix (a scanned stack needs every layer alike).
  """
  start = time.perf_counter()
  output.check_writable(out_workdir, overwrite)
  hf_config = hf_io.read_config(hf_dir)
  fam = family_for(hf_config)
  m = model_from_hf_config(hf_config, fam)
  m.scan_layers, m.param_dtype = _layout(m, scan_layers), dtype
  if max_seq_len:
    if m.positions != 'rope' or max_seq_len > m.max_seq_len:
      raise ConversionError(f'--max-seq-len {max_seq_len}: only lowers the context of a RoPE model (this one: '
                            f'{m.positions} positions, max_position_embeddings={m.max_seq_len})')
    m.max_seq_len = max_seq_len
  mesh = source.mesh_of(mesh_spec)
  cfg = run_config(m)   # the default mesh (all devices) for the commands that load it; --mesh is for the copy
  abstract = source.abstract_params(m, mesh)
  params = to_device(_nest(read_hf_params(hf_dir, m, fam, abstract)), abstract)
  with output.staged(out_workdir, overwrite, protect=(hf_dir,)) as tmp:
    spec = _tokenizer_spec(hf_tokenizer.import_tokenizer(hf_dir, tmp, hf_config), tokenizer, tmp, hf_dir)
    if spec is None:
      log(f'note: {hf_dir} has no tokenizer (tokenizer.json, vocab.json + merges.txt or tokenizer.model): pass '
          '--tokenizer to record one')
    cfg.data.add_bos = _adds_bos(tmp, spec)
    meta = make_metadata(cfg, spec, extra=dict(tokenizer=spec, params_only=True,
                                               converted_from=os.path.abspath(hf_dir),
                                               hf_architecture=fam.ARCHITECTURE))
    config_lib.save(cfg, os.path.join(tmp, 'config.json'))
    save_params(tmp, step, params, meta)
    result = dict(params=params, model=m, family=fam)
    if check is not None:
      check(hf_dir, result)
  path = os.path.join(os.path.abspath(out_workdir), 'checkpoints', str(step))
  seconds = time.perf_counter() - start
  log(f'wrote {path}: {fam.NAME} model, {sum(x.size for x in jax.tree.leaves(params)) / 1e6:.2f}M params, '
      f'{dtype}, {"scanned" if m.scan_layers else "unrolled"} layers, context {m.max_seq_len}, {seconds:.1f}s')
  return dict(result, path=path, seconds=seconds)


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
                mesh_spec: str | None = None, overwrite: bool = False, log=print) -> dict:
  """Drop the optimizer state; optionally cast, change the layer layout or the sharding; save (a new workdir)."""
  start = time.perf_counter()
  output.check_writable(out_workdir, overwrite)
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
  with output.staged(out_workdir, overwrite, protect=(src.workdir,)) as tmp:
    for name in ('tokenizer.model', hf_tokenizer.KEPT_DIR):  # files the metadata refers to
      here = os.path.join(src.workdir, name)
      if os.path.isfile(here):
        shutil.copyfile(here, os.path.join(tmp, name))
      elif os.path.isdir(here):
        shutil.copytree(here, os.path.join(tmp, name))
    _save_run_config(os.path.join(src.workdir, 'config.json'), cfg, os.path.join(tmp, 'config.json'))
    save_params(tmp, src.step, params, meta)
  path = os.path.join(os.path.abspath(out_workdir), 'checkpoints', str(src.step))
  seconds = time.perf_counter() - start
  log(f'wrote {path}: params only, {dtype}, {"scanned" if target.scan_layers else "unrolled"} layers, '
      f'mesh {"x".join(str(v) for v in mesh.shape.values())}, {seconds:.1f}s')
  return dict(params=params, model=target, path=path, seconds=seconds)

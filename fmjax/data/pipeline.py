"""The Grain input pipeline: documents -> tokens -> packed (or padded) rows -> batches.

Train: the process's shard of documents (i::n) -> shuffled with `seed`, reshuffled each
epoch, repeated forever -> tokenized (optionally in `worker_count` processes) -> rows of
seq_len+1 tokens by concat-then-split packing (or one padded/truncated row per document)
-> batches of the per-process batch size, in the format of `fmjax.data.batches`.
Workers only tokenize; packing and batching run in the calling process in document order,
so the batches are identical for any worker_count, and so is the iterator state: a checkpoint
saved with one worker_count resumes with another. Iterator state (get_state/set_state)
restores the exact batch sequence; `checkpoint_save_arg`/`checkpoint_restore_arg` give the
Orbax args for a Composite checkpoint item.
"""

from __future__ import annotations

import itertools
import math

import grain
import numpy as np

from fmjax.data import batches as batches_lib
from fmjax.data import builders
from fmjax.data import formats
from fmjax.data import mixture as mixture_lib
from fmjax.data.builders import open_split
from fmjax.data.errors import DataError
from fmjax.data.packing import PackIterDataset
from fmjax.data.stream_set import StreamSetIterator, owned_streams
from fmjax.data.streams import CountedStream

# Documents are read from local ArrayRecord files: a few threads are enough and avoid GIL churn.
_READ_OPTIONS = grain.ReadOptions(num_threads=2, prefetch_buffer_size=64)


class Tokenize:
  """text -> {'tokens': int32 ids} with optional bos/eos; an empty text stays empty."""

  def __init__(self, tokenizer, add_bos: bool, add_eos: bool):
    self.tokenizer, self.add_bos, self.add_eos = tokenizer, add_bos, add_eos

  def __call__(self, text: str) -> dict[str, np.ndarray]:
    ids = np.asarray(self.tokenizer.encode(text), dtype=np.int32)
    if ids.size:
      parts = ([np.array([self.tokenizer.bos_id], np.int32)] if self.add_bos else []) + [ids] + (
          [np.array([self.tokenizer.eos_id], np.int32)] if self.add_eos else [])
      ids = np.concatenate(parts) if len(parts) > 1 else ids
    return {'tokens': ids}


class NonEmpty:
  """Filter predicate dropping empty documents; raises once `limit` in a row were empty.

  With a repeated stream, `limit` = documents per epoch means 'a whole epoch had no text'.
  """

  def __init__(self, limit: int, what: str):
    self.limit, self.what, self._empty_run = limit, what, 0

  def __call__(self, element: dict) -> bool:
    if len(element['tokens']):
      self._empty_run = 0
      return True
    self._empty_run += 1
    if self._empty_run >= self.limit:
      raise DataError(f'{self.what} has only empty documents: nothing to train on; check the data source')
    return False


class PadRow:
  def __init__(self, length: int, pad_id: int):
    self.length, self.pad_id = length, pad_id

  def __call__(self, element: dict) -> dict[str, np.ndarray]:
    return batches_lib.pad_row(element['tokens'], self.length, self.pad_id)


def _open(data_cfg, split: str, what: str = ''):
  source = open_split(data_cfg, split)
  if len(source) == 0:
    if split == data_cfg.eval_split:
      raise builders.empty_eval_error(data_cfg, what)
    what = what or builders.describe(data_cfg)
    raise DataError(f'split {split!r} of {what} is empty: add documents'
                    + (' or lower data.validation_fraction' if split == data_cfg.train_split else ''))
  return source


def _mixture_name(name: str, cfg) -> str:
  return f'mixture source {name!r} ({builders.describe(cfg)})'


def _eval_documents(data_cfg) -> grain.MapDataset:
  """The eval split's documents: of data.source, or of the mixture's sources (mixed by weight)."""
  split = data_cfg.eval_split
  if not data_cfg.get('mixture'):
    return grain.MapDataset.source(_open(data_cfg, split))
  if data_cfg.get('eval_files'):
    cfg = data_cfg.copy_and_resolve_references()
    with cfg.unlocked():
      kind = formats.kind_of(data_cfg.eval_files)
      cfg.update(dict(mixture='', source=kind, files=data_cfg.eval_files, eval_files='', validation_fraction=0.0))
    return grain.MapDataset.source(_open(cfg, cfg.train_split, f'data.eval_files={data_cfg.eval_files!r}'))
  parts, weights, names = [], [], []
  for src in mixture_lib.parse(data_cfg.mixture):
    cfg = mixture_lib.source_config(data_cfg, src)
    docs = open_split(cfg, split)
    names.append(f'{src.name!r} ({builders.describe(cfg)})')
    if len(docs):
      parts.append(grain.MapDataset.source(docs))
      weights.append(src.weight)
  if not parts:
    raise DataError(f'the eval split {split!r} of every data.mixture source is empty ({", ".join(names)}): give '
                    'validation files with data.eval_files=GLOB, or raise data.validation_fraction (or set '
                    'eval_every=0)')
  return grain.MapDataset.mix(parts, weights) if len(parts) > 1 else parts[0]


def check_eval_split(data_cfg) -> None:
  """Raise the one-line DataError that evaluation would, before anything is compiled."""
  _eval_documents(data_cfg)


def _shard(source, split: str, process_index: int, process_count: int) -> grain.MapDataset:
  """Process i reads documents i, i+n, i+2n, ... of the split."""
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} must be in [0, process_count={process_count})')
  docs = source if isinstance(source, grain.MapDataset) else grain.MapDataset.source(source)
  n = len(docs)
  docs = docs[process_index::process_count]
  if len(docs) == 0:
    raise DataError(f'split {split!r} has {n} documents, fewer than process_count={process_count}: '
                    'each process needs at least one')
  return docs


def _shard_documents(data_cfg, split: str, process_index: int, process_count: int) -> grain.MapDataset:
  return _shard(_open(data_cfg, split), split, process_index, process_count)


def _rows(tokens: grain.IterDataset, *, seq_len: int, packing: bool, pad_id: int) -> grain.IterDataset:
  """Tokenized documents -> rows of seq_len+1 tokens with segment ids and positions."""
  if seq_len <= 0:
    raise DataError(f'seq_len={seq_len} must be positive')
  if packing:
    return PackIterDataset(tokens, seq_len + 1, pad_id)
  return tokens.map(PadRow(seq_len + 1, pad_id))


def _mark_absl_flags_parsed() -> None:
  """Grain worker processes read absl flags: mark them parsed when no absl app did."""
  from absl import flags  # pylint: disable=import-outside-toplevel
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


def make_train_iterator(data_cfg, tokenizer, *, seq_len: int, batch_size: int, seed: int,
                        process_index: int = 0, process_count: int = 1):
  """An endless iterator of this process's train batches [batch_size, seq_len] (see batches.py).

  The split is read as `data_cfg.num_streams` document streams (0 = one per process), each
  filling a fixed block of rows of the global batch (see stream_set.py); with data.mixture, each
  stream reads every source and the rows' sources follow fmjax.data.mixture. With
  data_cfg.worker_count > 0 the calling script needs an `if __name__ == '__main__':` guard
  (workers are started processes); close the iterator (`it.close()`) to stop them early.
  """
  if batch_size <= 0:
    raise DataError(f'batch_size={batch_size} must be positive')
  num_streams = data_cfg.get('num_streams', 0) or process_count
  streams = owned_streams(num_streams, process_index, process_count)
  if data_cfg.get('mixture'):
    return _mixture_iterator(data_cfg, tokenizer, streams, num_streams, seq_len=seq_len, batch_size=batch_size,
                             seed=seed, process_count=process_count)
  source = _open(data_cfg, data_cfg.train_split)
  make = lambda s, rows: iter(_stream_rows(data_cfg, tokenizer, source, s, num_streams, seq_len=seq_len, seed=seed)
                              .batch(rows, drop_remainder=True).map(batches_lib.model_batch))
  return StreamSetIterator(make, streams, num_streams, batch_size)


def _mixture_iterator(data_cfg, tokenizer, streams: range, num_streams: int, *, seq_len: int, batch_size: int,
                      seed: int, process_count: int) -> mixture_lib.MixtureIterator:
  sources = mixture_lib.parse(data_cfg.mixture)
  cfgs = {src.name: mixture_lib.source_config(data_cfg, src) for src in sources}
  docs = {name: _open(cfg, cfg.train_split, _mixture_name(name, cfg)) for name, cfg in cfgs.items()}

  def make_rows(stream: int, src: mixture_lib.Source):
    source_seed = seed + int.from_bytes(src.name.encode()[:4].ljust(4, b'\0'), 'big')
    return iter(_stream_rows(cfgs[src.name], tokenizer, docs[src.name], stream, num_streams, seq_len=seq_len,
                             seed=source_seed))

  return mixture_lib.MixtureIterator(make_rows, sources, streams, num_streams, batch_size, process_count, seed)


def _stream_rows(data_cfg, tokenizer, source, stream: int, num_streams: int, *, seq_len: int,
                 seed: int) -> grain.IterDataset:
  """Rows of one document stream (documents stream, stream + num_streams, ...)."""
  docs = _shard(source, data_cfg.train_split, stream, num_streams)
  ds = docs.shuffle(seed % 2**32).repeat(None).map(Tokenize(tokenizer, data_cfg.add_bos, data_cfg.add_eos))
  tokens = ds.to_iter_dataset(_READ_OPTIONS)
  if data_cfg.worker_count > 0:
    _mark_absl_flags_parsed()
    tokens = tokens.mp_prefetch(grain.MultiprocessingOptions(
        num_workers=data_cfg.worker_count, per_worker_buffer_size=16))
  tokens = CountedStream(tokens, data_cfg.worker_count)  # state independent of worker_count
  tokens = tokens.filter(NonEmpty(len(docs), f'split {data_cfg.train_split!r}'))
  return _rows(tokens, seq_len=seq_len, packing=data_cfg.packing, pad_id=tokenizer.pad_id)


def _eval_rows(data_cfg, tokenizer, docs: grain.MapDataset, seq_len: int) -> grain.IterDataset:
  ds = docs.map(Tokenize(tokenizer, data_cfg.add_bos, data_cfg.add_eos))
  tokens = ds.to_iter_dataset(grain.ReadOptions(num_threads=0)).filter(lambda e: len(e['tokens']) > 0)
  return _rows(tokens, seq_len=seq_len, packing=data_cfg.packing, pad_id=tokenizer.pad_id)


def make_eval_batches(data_cfg, tokenizer, *, seq_len: int, batch_size: int, num_batches: int,
                      process_index: int = 0, process_count: int = 1) -> list[dict[str, np.ndarray]]:
  """The first rows of the eval split (in stored order) as at most num_batches batches.

  Deterministic. A short last batch is filled with padding rows (weight 0). Every process
  returns the same number of batches (it counts the other shards' rows too), so that
  multi-host evaluation steps stay in lockstep; with fewer eval documents than processes, the
  processes without one evaluate padding only.
  """
  if batch_size <= 0 or num_batches <= 0:
    raise DataError(f'eval batch_size={batch_size} and num_batches={num_batches} must be positive')
  split = data_cfg.eval_split
  limit = num_batches * batch_size
  source = _eval_documents(data_cfg)
  own, counts = [], []
  if not 0 <= process_index < process_count:
    raise DataError(f'process_index={process_index} must be in [0, process_count={process_count})')
  for shard in range(process_count):
    docs = source[shard::process_count]   # a process without eval documents evaluates padding rows
    rows = itertools.islice(_eval_rows(data_cfg, tokenizer, docs, seq_len), limit) if len(docs) else iter(())
    if shard == process_index:
      own = list(rows)
      counts.append(len(own))
    else:
      counts.append(sum(1 for _ in rows))
  n_batches = max(math.ceil(c / batch_size) for c in counts)
  if n_batches == 0:
    raise DataError(f'eval split {split!r} has no text: all its documents are empty')
  out = []
  for b in range(n_batches):
    chunk = own[b * batch_size:(b + 1) * batch_size]
    if not chunk:
      out.append(batches_lib.empty_batch(batch_size, seq_len, tokenizer.pad_id))
      continue
    stacked = {k: np.stack([r[k] for r in chunk]) for k in chunk[0]}
    batch = batches_lib.model_batch(stacked)
    if len(chunk) < batch_size:
      filler = batches_lib.empty_batch(batch_size - len(chunk), seq_len, tokenizer.pad_id)
      batch = {k: np.concatenate([batch[k], filler[k]]) for k in batch}
    out.append(batch)
  return out


def checkpoint_save_arg(iterator: grain.DatasetIterator):
  """Orbax save args for the iterator's state: `ocp.args.Composite(data=checkpoint_save_arg(it))`."""
  return grain.checkpoint.CheckpointSave(iterator)


def checkpoint_restore_arg(iterator: grain.DatasetIterator):
  """Orbax restore args that set a freshly made iterator to the saved state."""
  return grain.checkpoint.CheckpointRestore(iterator)

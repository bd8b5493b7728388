"""Labels and class probabilities for new text from a classification fine-tune.

    python -m fmjax.classify --workdir FT [--checkpoint best|last|STEP]
        (--input FILE.jsonl|FILE.csv | --text "..." [--text ...]) [--out FILE.jsonl] [--batch-size N]

Everything comes from the fine-tuning workdir: config.json, the tokenizer copy, the class names,
pooling and sequence length recorded in the checkpoint. `--checkpoint best` (default) is the
best-scoring evaluation's copy in WORKDIR/best, `last` the newest in WORKDIR/checkpoints, a number
that step there. Texts are encoded (and truncated) as fine-tuning encoded them, and batched and
sharded like its evaluation. The output is JSONL (fmjax/finetune/predictions.py), to --out or
stdout; when every input row has a label, the metrics report (OUT.metrics.json) and confusion
matrix (OUT.confusion.png) are written next to --out and the metric table is printed.

From Python: `classify(workdir, texts)`, or `load(workdir)` once and `.predict(texts)` per batch.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from dataclasses import dataclass
from typing import Any, Sequence

import jax
import numpy as np

from fmjax import cli
from fmjax.training import build
from fmjax.runtime import distributed
from fmjax.training import loop
from fmjax.runtime import paths
from fmjax.checkpoints import restore
from fmjax.finetune import task_metrics
from fmjax.parallel import sharding as shd
from fmjax.checkpoints.store import CheckpointError
from fmjax.data import labeled, tokenizers
from fmjax.data.errors import DataError
from fmjax.finetune import parts as parts_lib
from fmjax.finetune import predictions as predictions_lib
from fmjax.objectives.classification import predict_fn
from fmjax.training.state import OnMesh

# Fine-tuning options that shape the classifier's parameters or outputs: the checkpoint's win.
HEAD_KEYS = ('task', 'pooling', 'lora_rank', 'lora_alpha', 'lora_targets')


@dataclass
class Predictions:
  """What `classify` returns: one row per input text, in input order."""
  class_names: tuple[str, ...]
  probabilities: np.ndarray      # (n, C) float32, columns in class_names order
  predictions: list[str]         # the predicted class names
  prediction_ids: np.ndarray     # (n,) int32 class ids
  step: int                      # training step of the checkpoint
  checkpoint: str                # its directory

  def records(self, texts: Sequence[str], labels: Sequence[str | None] | None = None) -> list[dict]:
    """The JSONL records of fmjax/finetune/predictions.py for these texts."""
    return predictions_lib.prediction_records(texts, self.probabilities, self.class_names, labels,
                                              self.prediction_ids)


def _step_dirs(directory: str) -> list[int]:
  """Finished checkpoint steps in a directory (numbered subdirectories with a state/)."""
  return sorted(int(n) for n in paths.listdir(directory)
                if n.isdigit() and paths.isdir(paths.join(directory, n, 'state')))


def _classes(meta: dict, where: str) -> tuple[str, ...]:
  """The class names a checkpoint records; a one-line error for a checkpoint that is no classifier."""
  classes = meta.get('classes') or ()
  if (meta.get('finetune') or {}).get('task', 'classify') != 'classify' or len(classes) < 2:
    raise CheckpointError(f'{where} is not a classification fine-tune (its checkpoint records no classes): pass '
                          'the --workdir of a `python -m fmjax.finetune` run with finetune.task=classify')
  return tuple(str(c) for c in classes)


def _checked_meta(ckpt, step: int, workdir: str) -> dict:
  """The checkpoint's metadata, if it is a classifier's (the checkpointer is closed on any error)."""
  try:
    meta = ckpt.read_metadata(step)
    _classes(meta, workdir)
    return meta
  except Exception:
    ckpt.close()
    raise


DEMO_ARMS = ('pretrained', 'random_init')   # the fine-tunes `python -m fmjax.finetune --demo` writes, one folder each


def _check_workdir(workdir: str) -> str:
  """The absolute workdir; a one-line error when it does not exist, or when it is a `finetune --demo` folder
  (which holds one fine-tune workdir per arm)."""
  workdir = paths.resolve(workdir)
  if not paths.isdir(workdir):
    raise CheckpointError(f'--workdir {workdir} does not exist: pass the workdir of a classification fine-tune '
                          '(python -m fmjax.finetune)')
  arms = [a for a in DEMO_ARMS if paths.isdir(paths.join(workdir, a))]
  if arms and not paths.exists(paths.join(workdir, 'config.json')):
    raise CheckpointError(f'{workdir} is a finetune --demo folder: classify with --workdir '
                          f'{paths.join(workdir, DEMO_ARMS[0])} (or {paths.join(workdir, DEMO_ARMS[1])})')
  return workdir


def locate(workdir: str, checkpoint: str | int = 'best'):
  """(Checkpointer, step, metadata) of a fine-tune's 'best', 'last' or numbered checkpoint."""
  workdir = _check_workdir(workdir)
  which = str(checkpoint)
  if which not in ('best', 'last') and not which.isdigit():
    raise CheckpointError(f'--checkpoint {which!r} is not best, last or a step number')
  if which == 'best':
    steps = _step_dirs(paths.join(workdir, 'best'))
    if not steps:   # say first whether this is a classifier at all
      ckpt, step, _ = restore.locate_checkpoint(workdir)
      _checked_meta(ckpt, step, workdir)
      ckpt.close()
      raise CheckpointError(f'{workdir} has no best checkpoint (no {paths.join(workdir, "best")}): the fine-tune '
                            'has not evaluated yet; pass --checkpoint last or a step')
    ckpt, step, _ = restore.locate_checkpoint(paths.join(workdir, 'best', str(steps[-1])))
  else:
    ckpt, step, _ = restore.locate_checkpoint(workdir, None if which == 'last' else int(which))
  meta = _checked_meta(ckpt, step, workdir)
  return ckpt, step, meta


def load_config(workdir: str, meta: dict | None = None, overrides: Sequence[str] = ()):
  """The fine-tune's run config, with the head options and seq_len of the checkpoint (`meta`)."""
  cfg = restore.load_config(paths.resolve(workdir), meta, overrides)
  saved = (meta or {}).get('finetune') or {}
  for key in HEAD_KEYS:
    if key in saved:
      cfg.finetune[key] = tuple(saved[key]) if isinstance(saved[key], list) else saved[key]
  if meta and 'seq_len' in meta:
    cfg.seq_len = int(meta['seq_len'])
  return cfg


class LoadedClassifier:
  """A fine-tuned classifier on a mesh: `predict(texts)` runs it (compiled once per batch size)."""

  def __init__(self, workdir: str, checkpoint: str | int = 'best', batch_size: int | None = None,
               overrides: Sequence[str] = ()):
    workdir = paths.resolve(workdir)
    ckpt, self.step, self.meta = locate(workdir, checkpoint)
    try:
      self.checkpoint = paths.join(ckpt.directory, str(self.step))
      self.class_names = _classes(self.meta, workdir)
      cfg = self.cfg = load_config(workdir, self.meta, overrides)
      cfg.global_batch_size = int(batch_size or cfg.global_batch_size)
      self.tokenizer = restore.load_tokenizer(workdir, self.meta.get('tokenizer') or cfg.data.tokenizer)
      tokenizers.check_vocab(self.tokenizer, cfg.model.vocab_size)
      mesh = shd.make_mesh(cfg.mesh)
      try:
        build.check_batch(cfg, mesh)
      except shd.MeshError as e:
        raise shd.MeshError(f'--batch-size {cfg.global_batch_size}: {e}') from None
      self.run = build.build_run(cfg, mesh, parts_lib.task(cfg, len(self.class_names)), compile_step=False)
      self.params = ckpt.restore(self.step, self.run.state.abstract.params, params_only=True)
    finally:
      ckpt.close()
    classifier = parts_lib.make_classifier(cfg, self.run.model, len(self.class_names))
    batch_shardings = {k: self.run.batch_sharding for k in ('inputs', 'targets', 'segment_ids', 'positions',
                                                             'weights')}
    self._predict = OnMesh(jax.jit(predict_fn(classifier), in_shardings=(self.run.state.shardings.params,
                                                                         batch_shardings),
                                   out_shardings=shd.replicated(mesh)), mesh, self.run.rules)

  def encode(self, texts: Sequence[str]) -> dict[str, np.ndarray]:
    """Rows as fine-tuning encodes them (truncated to seq_len), padded to whole global batches."""
    rows = labeled.encode_classification(list(texts), np.zeros(len(texts), np.int32), self.tokenizer,
                                         self.cfg.seq_len)
    return labeled.pad_examples(rows, self.cfg.global_batch_size)

  def _local_batches(self, rows: dict[str, np.ndarray]):
    gb, n = self.cfg.global_batch_size, len(rows['inputs'])
    local = gb // jax.process_count()
    for s in range(0, n, gb):
      lo = s + jax.process_index() * local
      yield {k: v[lo:lo + local] for k, v in rows.items()}

  def predict(self, texts: Sequence[str]) -> Predictions:
    """Class probabilities and predicted names of `texts`, in order."""
    if isinstance(texts, str):
      raise TypeError('predict takes a list of texts, not one string')
    if not len(texts):
      raise DataError('no texts to classify')
    probabilities, ids = [], []
    for batch in self._local_batches(self.encode(texts)):
      out = jax.device_get(self._predict(self.params, loop.to_global(batch, self.run.batch_sharding)))
      probabilities.append(out['probabilities'][out['valid']])
      ids.append(out['prediction'][out['valid']])
    ids = np.concatenate(ids).astype(np.int32)
    return Predictions(class_names=self.class_names, probabilities=np.concatenate(probabilities).astype(np.float32),
                       predictions=[self.class_names[i] for i in ids], prediction_ids=ids, step=self.step,
                       checkpoint=self.checkpoint)


def load(workdir: str, checkpoint: str | int = 'best', batch_size: int | None = None,
         overrides: Sequence[str] = ()) -> LoadedClassifier:
  """The fine-tuned classifier of `workdir` ('best' | 'last' | a step of WORKDIR/checkpoints) on its mesh."""
  return LoadedClassifier(workdir, checkpoint, batch_size, overrides)


def classify(workdir: str, texts: Sequence[str], checkpoint: str | int = 'best',
             batch_size: int | None = None) -> Predictions:
  """Classify `texts` with a fine-tune's checkpoint (see `load`); batch_size defaults to its global batch."""
  return load(workdir, checkpoint, batch_size).predict(texts)


def label_column(labels: Sequence[str | None], class_names: Sequence[str], where: str) -> list[str] | None:
  """The labels when every row has one (else None); an unknown label is a one-line error."""
  if any(label is None for label in labels):
    return None
  known = set(class_names)
  for i, label in enumerate(labels):
    if label not in known:
      raise DataError(f'{where}: row {i + 1} has label {label!r}, which is not one of the checkpoint\'s classes '
                      f'({", ".join(class_names)}); fix the data or pass --label-field')
  return list(labels)


def read_input(path: str, text_field: str, label_field: str, label_required: bool) -> tuple[list, list]:
  """(texts, labels or Nones) of a .csv or .jsonl file."""
  columns, optional = ((text_field, label_field), ()) if label_required else ((text_field,), (label_field,))
  try:
    data = labeled.read_file(path, columns, optional)
  except DataError as e:
    if 'finetune.text_feature' not in str(e):
      raise
    raise DataError(f'{e} (fmjax.classify: --text-field / --label-field)') from None
  return data[text_field], data[label_field]


@contextlib.contextmanager
def _info_logs_off(when: bool):
  """Silence fmjax's INFO lines (they go to stdout) while stdout carries the predictions."""
  log = logging.getLogger('fmjax')
  level = log.level
  if when:
    log.setLevel(logging.WARNING)
  try:
    yield
  finally:
    log.setLevel(level)


def report_paths(out: str) -> tuple[str, str]:
  """(metrics JSON, confusion PNG) beside a predictions file."""
  stem = out[:-len('.jsonl')] if out.endswith('.jsonl') else out
  return f'{stem}.metrics.json', f'{stem}.confusion.png'


def _write_outputs(args, texts, labels, result: Predictions) -> None:
  """The predictions (to --out or stdout) and, with labels, the metrics report and confusion matrix."""
  if not distributed.is_leader():
    return
  if args.out:
    predictions_lib.write_predictions(args.out, texts, result.probabilities, result.class_names, labels,
                                      result.prediction_ids)
  else:
    sys.stdout.write(predictions_lib.to_jsonl(result.records(texts, labels)))
    sys.stdout.flush()
  if labels is None:
    return
  ids = {n: i for i, n in enumerate(result.class_names)}
  confusion = task_metrics.confusion_matrix([ids[x] for x in labels], result.prediction_ids, len(ids))
  rep = task_metrics.report(confusion, result.class_names)
  table = task_metrics.table({f'step {result.step}': rep})
  where = sys.stdout if args.out else sys.stderr
  print(f'{len(texts)} labelled texts, checkpoint {result.checkpoint}:\n{table}', file=where, flush=True)
  if args.out:
    metrics_path, png_path = report_paths(args.out)
    task_metrics.write_json(dict(rep, step=result.step, checkpoint=result.checkpoint), metrics_path)
    drawn = task_metrics.plot_confusion(rep, png_path, f'step {result.step}: accuracy {rep["accuracy"]:.3f}, '
                                                       f'macro-F1 {rep["macro_f1"]:.3f}')
    print(f'metrics: {metrics_path}' + (f'; confusion matrix: {png_path}' if drawn else ''), flush=True)


def run_command(args, overrides: Sequence[str]) -> int:
  """`python -m fmjax.classify` after its flags are parsed (fmjax/classify.py): predict and write the outputs."""
  overrides = restore.mesh_overrides(args.mesh) + list(overrides)
  with _info_logs_off(not args.out):
    _check_workdir(args.workdir)
    cli.start_run(load_config(args.workdir, None, overrides))   # GPU flags, multi-process: before JAX starts
    ckpt, _, meta = locate(args.workdir, args.checkpoint)       # a bad checkpoint fails before the input is read
    ckpt.close()
    cfg = load_config(args.workdir, meta, overrides)
    labels: Any = None
    if args.input:
      texts, labels = read_input(args.input, args.text_field or cfg.finetune.text_feature,
                                 args.label_field or cfg.finetune.label_feature, args.label_field is not None)
      labels = label_column(labels, _classes(meta, args.workdir), args.input)
    else:
      texts = list(args.text)
    start = time.perf_counter()
    result = load(args.workdir, args.checkpoint, args.batch_size, overrides).predict(texts)
    seconds = time.perf_counter() - start
  _write_outputs(args, texts, labels, result)
  if args.out and distributed.is_leader():
    print(f'classified {len(texts)} texts with {result.checkpoint} (step {result.step}) in {seconds:.1f}s: '
          f'{args.out}', flush=True)
  return 0

"""Building local documents into ArrayRecord shards: one streaming pass, bounded memory, parallel.

The input files are cut into groups of consecutive files (about `GROUP_BYTES` each); each group
is read once, document by document, and written to `train-NNNNN.arrayrecord` and/or
`validation-NNNNN.arrayrecord` (documents as UTF-8 records, in file order). Memory is one
document (or one line / Parquet row batch) plus the writers' buffers, whatever the file sizes.
Groups run in parallel worker processes (fresh interpreters) when the corpus is large. `manifest.json` lists the
shards and counts of each split; a dataset directory is complete when it exists (built in a
temporary directory, then renamed).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import pickle
import subprocess
import sys

from fmjax.runtime import paths
from fmjax.data.documents import BinaryInput, DocumentReader
from fmjax.data.errors import DataError

log = logging.getLogger(__name__)
SPLITS = ('train', 'validation')
GROUP_BYTES = 32 << 20            # input bytes per build task
PARALLEL_BYTES = 64 << 20         # build in worker processes from this corpus size on
MANIFEST = 'manifest.json'


def is_validation(text: str, fraction: float) -> bool:
  """Whether a document belongs to the validation split (stable hash of its text)."""
  digest = hashlib.sha1(text.encode('utf-8', errors='surrogatepass')).digest()
  return int.from_bytes(digest[:8], 'big') < fraction * 2.0**64


@dataclasses.dataclass
class Task:
  """Files `indices` of `reader`, written as shard `number`. split: 'hash' (by `fraction`), or
  'train' / 'validation' (every document)."""
  reader: DocumentReader
  indices: list[int]
  number: int
  split: str
  fraction: float
  out_dir: str


def plan_tasks(reader: DocumentReader, split: str, fraction: float, out_dir: str, first: int) -> list[Task]:
  """Groups of consecutive files of about GROUP_BYTES, numbered from `first`."""
  tasks, group, size = [], [], 0
  for index, path in enumerate(reader.paths):
    group.append(index)
    size += paths.size(path)
    if size >= GROUP_BYTES:
      tasks.append(Task(reader, group, first + len(tasks), split, fraction, out_dir))
      group, size = [], 0
  if group:
    tasks.append(Task(reader, group, first + len(tasks), split, fraction, out_dir))
  return tasks


def _writer(path: str):
  from array_record.python.array_record_module import ArrayRecordWriter  # pylint: disable=import-outside-toplevel
  return ArrayRecordWriter(path, 'group_size:1')


def _write_group(task: Task, excluded: set[str]) -> dict:
  """Write the task's documents; raises BinaryInput at the first binary file not yet excluded."""
  writers, counts, bad = {}, dict.fromkeys(SPLITS, 0), []
  try:
    for index in task.indices:
      if task.reader.paths[index] in excluded:
        continue
      seen: list = []
      for text in task.reader.iter_texts(index, seen):
        if not text.strip():
          continue
        split = task.split
        if split == 'hash':
          split = 'validation' if is_validation(text, task.fraction) else 'train'
        if split not in writers:
          writers[split] = _writer(os.path.join(task.out_dir, f'{split}-{task.number:05d}.arrayrecord'))
        writers[split].write(text.encode('utf-8', errors='surrogatepass'))
        counts[split] += 1
      if seen:
        bad.append(task.reader.paths[index])
  finally:
    for w in writers.values():
      w.close()
  return {'counts': counts, 'replaced': bad, 'shards': {s: f'{s}-{task.number:05d}.arrayrecord' for s in writers}}


def run_task(task: Task) -> dict:
  """Build one group; binary files are collected (and left out) rather than stopping the group."""
  excluded: set[str] = set()
  while True:
    try:
      result = _write_group(task, excluded)
    except BinaryInput as e:
      excluded.add(e.path)
      for split in SPLITS:  # drop what this attempt wrote
        path = os.path.join(task.out_dir, f'{split}-{task.number:05d}.arrayrecord')
        if os.path.exists(path):
          os.remove(path)
      continue
    result['binary'] = sorted(excluded)
    return result


def run_tasks(tasks: list[Task], total_bytes: int, workers: int = 0) -> list[dict]:
  """Results of all tasks in order: in worker processes when the corpus is large.

  Workers are fresh interpreters running this module (`python -m fmjax.data.local_build TASKS`),
  not multiprocessing children: nothing of the caller's `__main__` is re-run in them.
  """
  workers = workers or min(len(tasks), os.cpu_count() or 1, 8)
  if workers <= 1 or len(tasks) <= 1 or total_bytes < PARALLEL_BYTES:
    return [run_task(t) for t in tasks]
  out_dir = tasks[0].out_dir
  procs = []
  for w in range(workers):
    path = os.path.join(out_dir, f'tasks-{w}.pickle')
    with open(path, 'wb') as f:
      pickle.dump(tasks[w::workers], f)
    cmd = [sys.executable, '-m', 'fmjax.data.local_build', path]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # pylint: disable=consider-using-with
    procs.append(proc)
  results: list = [None] * len(tasks)
  peaks: list = []
  try:
    for w, proc in enumerate(procs):
      out, err = proc.communicate()
      os.remove(os.path.join(out_dir, f'tasks-{w}.pickle'))
      if proc.returncode != 0:
        tail = err.decode('utf-8', 'replace').strip().splitlines()[-1:] or ['no output']
        raise RuntimeError(f'a dataset build worker failed (exit {proc.returncode}): {tail[0]}')
      reply = json.loads(out)
      if 'error' in reply:
        raise DataError(reply['error'])
      results[w::workers] = reply['results']
      peaks.append(reply.get('peak_rss_mib'))
  finally:
    for proc in procs:
      if proc.poll() is None:
        proc.kill()
  log.info('built in %d worker processes (peak RSS %s MiB each)', workers, peaks)
  return results


def _peak_rss_mib() -> int | None:
  """This process's peak resident memory since it started (Linux), in MiB."""
  try:
    with open('/proc/self/status', encoding='ascii') as f:
      return next(int(line.split()[1]) // 1024 for line in f if line.startswith('VmHWM:'))
  except (OSError, StopIteration, ValueError):
    return None


def _worker_main(path: str) -> int:
  """Run the pickled tasks of `path`; print {'results': [...]} or {'error': one line} as JSON."""
  with open(path, 'rb') as f:
    tasks = pickle.load(f)
  try:
    reply = {'results': [run_task(t) for t in tasks], 'peak_rss_mib': _peak_rss_mib()}
  except DataError as e:
    reply = {'error': str(e)}
  print(json.dumps(reply))
  return 0


def merge_results(results: list[dict]) -> dict:
  """The manifest fields of all tasks: shards per split (in order), counts, binary and replaced files."""
  shards = {s: [r['shards'][s] for r in results if s in r['shards']] for s in SPLITS}
  counts = {s: sum(r['counts'][s] for r in results) for s in SPLITS}
  return {'shards': shards, 'counts': counts,
          'binary': [p for r in results for p in r['binary']],
          'replaced': [p for r in results for p in r['replaced']]}


def write_manifest(directory: str, manifest: dict) -> None:
  with open(os.path.join(directory, MANIFEST), 'w', encoding='utf-8') as f:
    json.dump(manifest, f)


def read_manifest(directory: str) -> dict | None:
  try:
    with open(os.path.join(directory, MANIFEST), encoding='utf-8') as f:
      return json.load(f)
  except (OSError, ValueError):
    return None


if __name__ == '__main__':
  sys.exit(_worker_main(sys.argv[1]))

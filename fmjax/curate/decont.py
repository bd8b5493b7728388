"""Decontamination against local evaluation files by long word n-grams.

datatrove's `NGramsDecontFilter` does the matching (same text normalisation and hashing as its
indexer); its `NGramsDecontIndexer` only reads lighteval tasks (a download), so `DecontIndexer`
here builds the same index (`<name>.index.hashes`, uint64) from local files instead. The filter
is extended to count every shared n-gram, not only the first: the report gives, per eval file,
the documents removed and how many of the eval file's n-grams the corpus contains.
"""

from __future__ import annotations

import json
import os

import numpy as np
from datatrove.data import Document, DocumentsPipeline
from datatrove.io import get_datafolder
from datatrove.pipeline.base import PipelineStep
from datatrove.pipeline.decont.n_grams import NGramsDecontConfig, NGramsDecontFilter
from datatrove.utils.hashing import create_hash_func
from datatrove.utils.text import ngrams, simplify_text

from fmjax.curate.words import WORD_TOKENIZER
from fmjax.data import documents


def eval_name(path: str) -> str:
  """The index name of an eval file: its base name without extensions, safe for file names."""
  base = os.path.basename(path).split('.')[0] or 'eval'
  return ''.join(c if c.isalnum() or c in '-_' else '_' for c in base)


def read_eval_texts(path: str, jsonl_field: str) -> list[str]:
  """An eval file's texts: each JSON line's field for .jsonl[.gz], else the whole file."""
  folder = get_datafolder(os.path.dirname(path))
  with folder.open(os.path.basename(path), 'rt', compression='infer', encoding='utf-8', errors='replace') as f:
    text = f.read()
  if '.jsonl' in os.path.basename(path):
    return list(documents.jsonl_texts(text, path, jsonl_field))
  return [text]


def ngram_hashes(text: str, config: NGramsDecontConfig) -> list[int]:
  """Hashes of the word n-grams of a text, normalised as datatrove's decontamination filter does."""
  hash_func = create_hash_func(config.hash_config)
  words = WORD_TOKENIZER.word_tokenize(simplify_text(text, config.norm_config))
  return [hash_func(' '.join(gram)) for gram in ngrams(words, config.n_grams)]


class DecontIndexer(PipelineStep):
  """Writes `<name>.index.hashes` (distinct n-gram hashes) and `<name>.json` (their count) per eval file."""

  type = 'decont'
  name = 'n-gram index of eval files'

  def __init__(self, eval_paths: list[str], output_folder: str, config: NGramsDecontConfig, jsonl_field: str = 'text'):
    super().__init__()
    self.eval_paths = list(eval_paths)
    self.output_folder = get_datafolder(output_folder)
    self.config = config
    self.jsonl_field = jsonl_field

  def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    names = {}
    for path in self.eval_paths:
      names.setdefault(eval_name(path), []).append(path)
    for name, paths in names.items():
      hashes = set()
      for path in paths:
        for text in read_eval_texts(path, self.jsonl_field):
          hashes.update(ngram_hashes(text, self.config))
      array = np.array(sorted(hashes), dtype=self.config.hash_config.np_descr)
      with self.output_folder.open(f'{name}.index.hashes', 'wb') as f:
        f.write(array.tobytes())
      with self.output_folder.open(f'{name}.json', 'w') as f:
        json.dump({'files': paths, 'ngrams': len(hashes)}, f)
      self.stat_update('ngrams', value=len(hashes))
    if data:
      yield from data


class OverlapDecontFilter(NGramsDecontFilter):
  """Removes documents sharing >= min_matches n-grams with an eval file; records every shared n-gram.

  The distinct shared hashes of each task go to `matched/<eval>/<rank>.npy` under `matches_folder`.
  """

  name = 'n-gram decontamination'

  def __init__(self, index_folder: str, matches_folder: str, config: NGramsDecontConfig, min_matches: int = 1,
               exclusion_writer=None):
    super().__init__(index_folder, config=config, exclusion_writer=exclusion_writer, language=WORD_TOKENIZER)
    self.matches_folder = get_datafolder(matches_folder)
    self.min_matches = min_matches
    self._matched: dict[str, set] = {}

  def filter(self, doc: Document) -> bool | tuple[bool, str]:
    if self._index_hashes is None:
      self.load_index_hashes()
    found: dict[str, set] = {}
    first = {}
    words = self.tokenizer.word_tokenize(simplify_text(doc.text, self.config.norm_config))
    for gram in map(' '.join, ngrams(words, self.config.n_grams)):
      h = self.hash_func(gram)
      task = self._index_hashes.get(h)
      if task is not None:
        found.setdefault(task, set()).add(h)
        first.setdefault(task, gram)
    for task, hashes in found.items():
      self._matched.setdefault(task, set()).update(hashes)
    total = sum(len(h) for h in found.values())
    if total < self.min_matches:
      return True
    task = max(found, key=lambda t: len(found[t]))
    doc.metadata.update(contaminated_task=task, contaminated_ngram=first[task], contaminated_ngrams=total)
    self.stat_update(f'contaminated_{task}')
    self.stat_update(f'shared_ngrams_{task}', value=total)
    return False, f'contaminated_{task}'

  def run(self, data: DocumentsPipeline, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    yield from super().run(data, rank, world_size)
    for task, hashes in self._matched.items():
      with self.matches_folder.open(f'{task}/{rank:05d}.npy', 'wb') as f:
        np.save(f, np.array(sorted(hashes), dtype=np.uint64))

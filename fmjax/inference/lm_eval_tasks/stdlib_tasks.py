"""The documents of fmjax's offline lm-eval sanity tasks, made from held-out standard-library files.

These are sanity tasks, not benchmarks: they check that a checkpoint reads code better than chance
and that an evaluation pipeline scores it as lm-eval's reference backend does. The files are the
ones fmjax's default corpus (data.source='stdlib', fmjax.data.corpora) holds out for validation:
a file is held out when the SHA-1 of its text falls below data.validation_fraction
(fmjax.data.local_build.is_validation), so a model pretrained on that corpus never saw them.

- next_line: multiple choice, which of four lines (the real one and three lines of the same file
  far from it) follows a few lines of code;
- last_word: LAMBADA-style cloze, the identifier ending a line, one that already occurs in the lines
  before it (scored by log-likelihood, or generated until a stop string);
- perplexity: the opening of each held-out file, scored whole by rolling log-likelihood.

The documents are a pure function of the interpreter's standard library, the fraction and VERSION.
They are written as JSONL at first use into `cache_dir` (default ~/.cache/fmjax/lm_eval, or
$FMJAX_LM_EVAL_CACHE; lm-eval passes task metadata `cache_dir` and `validation_fraction` here) and
read back from there afterwards.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re

from fmjax.errors import UserError

VERSION = 1
DEFAULT_FRACTION = 0.02          # fmjax's data.validation_fraction default
CONTEXT_LINES = 8                # lines of code before the line asked about
FEWSHOT_DOCS = 16                # the first documents of each task form its 'train' split (few-shot examples)
MAX_DOCS = 1000                  # documents per task at most (a seeded sample)
PERPLEXITY_CHARS = 2000          # each perplexity document: a file's opening, cut at a line break
TASK_FILES = ('next_line', 'last_word', 'perplexity')
_WORD = re.compile(r'^(.*[^A-Za-z0-9_])([A-Za-z_][A-Za-z0-9_]{3,15})$')


class TaskDataError(UserError):
  """The sanity tasks' documents cannot be made (nothing held out, an unwritable cache)."""


def default_cache_dir() -> str:
  return os.environ.get('FMJAX_LM_EVAL_CACHE') or os.path.join(os.path.expanduser('~'), '.cache', 'fmjax', 'lm_eval')


def held_out_files(fraction: float) -> list[tuple[str, str]]:
  """(path relative to the stdlib, text) of each stdlib file the stdlib corpus holds out at `fraction`,
  read as fmjax.data reads them (undecodable bytes replaced; such files are left out here)."""
  from fmjax.data import corpora  # pylint: disable=import-outside-toplevel
  from fmjax.data.documents import DocumentReader  # pylint: disable=import-outside-toplevel
  from fmjax.data.local_build import is_validation  # pylint: disable=import-outside-toplevel
  files = corpora.stdlib_files()
  reader = DocumentReader(files, kind='text', split_by='file', binary_files='replace')
  root, held = corpora.stdlib_dir(), []
  for i, path in enumerate(files):
    for text in reader.iter_texts(i, []):
      if text.strip() and '\ufffd' not in text and is_validation(text, fraction):
        held.append((os.path.relpath(path, root), text))
  return held


def next_line_docs(files: list[tuple[str, str]], seed: int = VERSION) -> list[dict]:
  """{'context', 'choices', 'gold', 'source'}: which line follows `context` (it ends with a newline)."""
  rng, docs = random.Random(seed), []
  for name, text in files:
    lines = text.split('\n')
    usable = [i for i, line in enumerate(lines) if 10 <= len(line.strip()) <= 100]
    for i in usable:
      context = '\n'.join(lines[max(0, i - CONTEXT_LINES):i])
      if i < 3 or not context.strip():
        continue
      far = [j for j in rng.sample(usable, min(len(usable), 12)) if abs(j - i) > 2 * CONTEXT_LINES]
      choices = []
      for j in far:   # three different lines of the same file, none equal to the real one
        if lines[j].strip() != lines[i].strip() and lines[j] not in choices and len(choices) < 3:
          choices.append(lines[j])
      if len(choices) < 3:
        continue
      gold = rng.randrange(4)
      choices.insert(gold, lines[i])
      docs.append({'context': context + '\n', 'choices': choices, 'gold': gold, 'source': f'{name}:{i + 1}'})
  return _spread(docs, rng)


def last_word_docs(files: list[tuple[str, str]], seed: int = VERSION) -> list[dict]:
  """{'context', 'target', 'source'}: the identifier (4-16 characters) that ends a line and already
  occurs in the lines before it; `context` is those lines and the line up to the identifier."""
  rng, docs = random.Random(seed), []
  for name, text in files:
    lines = text.split('\n')
    for i, line in enumerate(lines):
      match = _WORD.match(line.rstrip())
      if not match or i < 2 or line != line.rstrip():
        continue
      before = '\n'.join(lines[max(0, i - CONTEXT_LINES):i])
      prefix, word = match.groups()
      if not re.search(rf'\b{word}\b', before) or not prefix.strip():
        continue
      docs.append({'context': before + '\n' + prefix, 'target': word, 'source': f'{name}:{i + 1}'})
  return _spread(docs, rng)


def perplexity_docs(files: list[tuple[str, str]]) -> list[dict]:
  """{'text', 'source'}: the first PERPLEXITY_CHARS characters of each file, cut after a line break."""
  docs = []
  for name, text in files:
    head = text[:PERPLEXITY_CHARS]
    if len(text) > PERPLEXITY_CHARS and '\n' in head:
      head = head[:head.rindex('\n') + 1]
    if head.strip():
      docs.append({'text': head, 'source': name})
  return docs


def _spread(docs: list[dict], rng: random.Random) -> list[dict]:
  """The documents in a seeded order, so a --limit takes from every file, not the first few."""
  rng.shuffle(docs)
  return docs[:MAX_DOCS]


def build(cache_dir: str | None = None, validation_fraction: float = DEFAULT_FRACTION) -> dict[str, str]:
  """{task file name: JSONL path} of the sanity tasks' documents, made at first use (see the docstring)."""
  fraction = float(validation_fraction)
  if not 0.0 < fraction < 1.0:
    raise TaskDataError(f'validation_fraction={fraction:g} holds out no stdlib files: the sanity tasks need a '
                        'fraction in (0, 1), the one the model was trained with (fmjax default 0.02)')
  from fmjax.data import corpora  # pylint: disable=import-outside-toplevel
  key = json.dumps([VERSION, fraction, corpora.stdlib_dir(), len(corpora.stdlib_files())])
  folder = os.path.join(os.path.expanduser(cache_dir or default_cache_dir()),
                        'stdlib-' + hashlib.sha1(key.encode()).hexdigest()[:12])
  found = {name: os.path.join(folder, f'{name}.jsonl') for name in TASK_FILES}
  if all(os.path.isfile(p) for p in found.values()):
    return found
  files = held_out_files(fraction)
  if not files:
    raise TaskDataError(f'data.validation_fraction={fraction:g} holds out none of the standard library files; '
                        'use a larger fraction for the sanity tasks')
  made = {'next_line': next_line_docs(files), 'last_word': last_word_docs(files), 'perplexity': perplexity_docs(files)}
  try:
    os.makedirs(folder, exist_ok=True)
    for name, docs in made.items():
      tmp = f'{found[name]}.tmp-{os.getpid()}'
      with open(tmp, 'w', encoding='utf-8') as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + '\n' for d in docs)
      os.replace(tmp, found[name])
  except OSError as e:
    raise TaskDataError(f'cannot write the sanity tasks to {folder}: {e.strerror}; set metadata cache_dir or '
                        '$FMJAX_LM_EVAL_CACHE to a writable directory') from None
  return found


def _dataset(name: str, cache_dir=None, validation_fraction=DEFAULT_FRACTION, **_):
  """A datasets.DatasetDict {'train': FEWSHOT_DOCS few-shot documents, 'test': the rest} of one task."""
  import datasets  # pylint: disable=import-outside-toplevel
  with open(build(cache_dir, validation_fraction)[name], encoding='utf-8') as f:
    docs = [json.loads(line) for line in f]
  few = 0 if name == 'perplexity' else FEWSHOT_DOCS
  return datasets.DatasetDict({'train': datasets.Dataset.from_list(docs[:few] or docs[:1]),
                               'test': datasets.Dataset.from_list(docs[few:])})


# lm-eval's `custom_dataset` hooks (task metadata and dataset_kwargs arrive as keyword arguments).
def next_line(**kwargs):
  return _dataset('next_line', **kwargs)


def last_word(**kwargs):
  return _dataset('last_word', **kwargs)


def perplexity(**kwargs):
  return _dataset('perplexity', **kwargs)

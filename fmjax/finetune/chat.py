"""The data of chat fine-tuning (finetune.task sft) and preference tuning (finetune.task dpo).

sft  conversations (`messages` or ShareGPT `conversations`, fmjax/data/conversations.py) rendered with
     the chat template (fmjax/data/chat_templates.py), loss on assistant tokens, packed into rows
dpo  (prompt, chosen, rejected) pairs, each side one row; a batch of B rows holds B/2 pairs laid out
     as fmjax/objectives/preference.py says, with the reference log-probabilities of each token

Splits: finetune.train_files and eval_files (.jsonl / .parquet), validation from validation_files or
held out of train (finetune.validation_fraction) by a stable hash of the whole example, so copies of
an example stay on one side. Dropped and truncated examples are counted in one line per split.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Sequence

import numpy as np

from fmjax.data import chat_templates, conversations, labeled
from fmjax.data.errors import DataError
from fmjax.finetune import splits
from fmjax.objectives.preference import REFERENCE_KEY

log = logging.getLogger(__name__)
CHAT_TASKS = ('sft', 'dpo')


@dataclasses.dataclass
class ChatData:
  """Train, validation (None when off) and eval examples: Conversations (sft) or Pairs (dpo)."""
  train: list
  validation: list | None
  eval: list
  validation_from: str = ''
  rows: dict = dataclasses.field(default_factory=dict)   # sft: encoded rows by split, encoded once

  def __len__(self) -> int:
    return len(self.train)


def _example_text(example) -> str:
  if isinstance(example, conversations.Pair):
    return json.dumps([example.prompt, example.chosen, example.rejected], sort_keys=True, ensure_ascii=False)
  return json.dumps(example.messages, sort_keys=True, ensure_ascii=False)


def _read(ft, pattern: str, what: str) -> list:
  if ft.task == 'dpo':
    return conversations.read_pairs(pattern, what)
  return conversations.read_conversations(pattern, ft.chat_field, what)


def load(ft) -> ChatData:
  """The splits of an sft or dpo fine-tune (finetune section `ft`)."""
  for key in ('train_files', 'eval_files'):
    if not ft[key]:
      raise DataError(f'finetune.task={ft.task} needs finetune.{key} (a glob of .jsonl or .parquet files)')
  train = _read(ft, ft.train_files, 'finetune.train_files')
  evaluation = _read(ft, ft.eval_files, 'finetune.eval_files')
  if ft.max_train_examples:
    train = train[:ft.max_train_examples]
  if ft.max_eval_examples:
    evaluation = evaluation[:ft.max_eval_examples]
  validation, source = None, ''
  if ft.validation_files:
    validation, source = _read(ft, ft.validation_files, 'finetune.validation_files'), 'files'
  elif ft.validation_fraction > 0:
    keep, held = splits.hold_out([_example_text(e) for e in train], [''] * len(train), ft.validation_fraction)
    if len(held) == 0:
      raise DataError(f'finetune.validation_fraction={ft.validation_fraction} holds out none of the {len(train)} '
                      'train examples (they are copies of one): add examples or set finetune.validation_files')
    validation, train, source = [train[i] for i in held], [train[i] for i in keep], 'held out of train'
  if not train:
    raise DataError(f'finetune.train_files={ft.train_files!r} holds no examples')
  return ChatData(train, validation, evaluation, source)


def template_for(ft, tokenizer) -> chat_templates.ChatTemplate:
  return chat_templates.for_tokenizer(tokenizer, ft.chat_template)


def encode_sft(ft, examples: Sequence, template, seq_len: int, pack: bool, what: str) -> dict[str, np.ndarray]:
  rows, counts = conversations.encode_sft(examples, template, seq_len, ft.loss_on, ft.too_long, pack)
  log.info('%s', counts.describe(f'sft {what}'))
  return rows


def encode_pairs(ft, examples: Sequence, template, seq_len: int, what: str) -> tuple[dict, dict]:
  """(chosen rows, rejected rows) [P, seq_len] of the pairs."""
  chosen, rejected, counts = conversations.encode_pairs(examples, template, seq_len, ft.too_long)
  log.info('%s', counts.describe(f'dpo {what}'))
  return chosen, rejected


@dataclasses.dataclass
class PairRows:
  """One split's pairs: chosen and rejected rows [P, T] and their reference log-probabilities."""
  chosen: dict
  rejected: dict
  reference: tuple | None = None


def pair_layout(chosen: dict, rejected: dict, index: np.ndarray, reference: tuple | None) -> dict[str, np.ndarray]:
  """The global DPO batch of pairs `index`: their chosen rows, then their rejected rows (pair i at rows i
  and len(index) + i); `index` -1 is a padding pair (weight 0). With `reference` (chosen, rejected
  (P, T) log-probabilities) the batch carries them as REFERENCE_KEY."""
  take = np.maximum(index, 0)
  real = (index >= 0)[:, None]
  out = {}
  for k in chosen:
    c, r = chosen[k][take], rejected[k][take]
    if k == 'weights':
      c, r = c * real, r * real
    out[k] = np.concatenate([c, r])
  if reference is not None:
    out[REFERENCE_KEY] = np.concatenate([reference[0][take] * real, reference[1][take] * real]).astype(np.float32)
  return out


class PairBatches:
  """Endless DPO batches: global_batch / 2 pairs per step from a fresh permutation each epoch, a pure
  function of (seed, step); each process takes its slice of the global layout (`pair_layout`).
  `reference` (set before the first batch) holds the reference log-probabilities of every pair."""

  def __init__(self, chosen: dict, rejected: dict, global_batch: int, seed: int, process_index: int = 0,
               process_count: int = 1):
    self.chosen, self.rejected, self.seed = chosen, rejected, seed
    self.pairs = global_batch // 2
    self.n = len(chosen['inputs'])
    if self.n == 0:
      raise DataError('no training pairs')
    self.local = global_batch // process_count
    self.offset = process_index * self.local
    self.reference = None
    self.order = labeled.EpochBatches({'inputs': np.arange(self.n)}, self.pairs, seed)   # pair indices

  def start(self, step: int) -> 'PairBatches':
    self.order.start(step)
    return self

  def __iter__(self):
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self.reference is None:
      raise RuntimeError('PairBatches: the reference log-probabilities were not set')
    index = next(self.order)['inputs']
    batch = pair_layout(self.chosen, self.rejected, index, self.reference)
    return {k: v[self.offset:self.offset + self.local] for k, v in batch.items()}


def pair_eval_batches(chosen: dict, rejected: dict, reference: tuple, global_batch: int, process_index: int = 0,
                      process_count: int = 1):
  """This process's slices of the held-out pairs in order, global_batch / 2 pairs a batch (the last padded)."""
  n, per = len(chosen['inputs']), global_batch // 2
  local = global_batch // process_count
  for s in range(0, n, per):
    index = np.arange(s, s + per)
    index[index >= n] = -1
    batch = pair_layout(chosen, rejected, index, reference)
    lo = process_index * local
    yield {k: v[lo:lo + local] for k, v in batch.items()}


def prompts_and_answers(examples: Sequence, count: int) -> list[tuple[list[dict], str, str]]:
  """Up to `count` held-out (prompt messages, reference answer, where): the messages before each
  example's last assistant message and that message's content (dpo: the chosen response)."""
  out = []
  for e in examples:
    if len(out) >= count:
      break
    if isinstance(e, conversations.Pair):
      out.append((list(e.prompt), e.chosen[-1]['content'], e.where))
      continue
    last = max((i for i, m in enumerate(e.messages) if m['role'] == 'assistant'), default=None)
    if last is not None and any(m['role'] == 'user' for m in e.messages[:last]):
      out.append((list(e.messages[:last]), e.messages[last]['content'], e.where))
  return out

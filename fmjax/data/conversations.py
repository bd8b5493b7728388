"""Chat conversations and preference pairs from JSONL / Parquet files, encoded into model rows.

Rows hold `messages: [{role, content}]` (OpenAI / Hugging Face style) or ShareGPT `conversations:
[{from, value}]` (human/user -> user, gpt/assistant/model/... -> assistant, system). Preference rows
hold `prompt`, `chosen`, `rejected`: strings, or message lists; in the chat form (UltraFeedback-
binarized style) chosen and rejected are whole conversations whose shared leading messages are the
prompt. Encoding renders with a chat template (fmjax/data/chat_templates.py) and puts loss weight on
the assistant tokens as targets; what is dropped or truncated is counted (`Counts.describe`).
"""

from __future__ import annotations

import dataclasses
import os

import numpy as np

from fmjax.data import batches as batches_lib
from fmjax.data import documents, formats
from fmjax.data.chat_templates import ROLES, ChatTemplateError
from fmjax.data.errors import DataError

SHAREGPT_ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant', 'chatgpt': 'assistant',
                  'bing': 'assistant', 'bard': 'assistant', 'model': 'assistant', 'system': 'system'}


@dataclasses.dataclass
class Conversation:
  messages: list
  where: str


@dataclasses.dataclass
class Pair:
  prompt: list
  chosen: list
  rejected: list
  where: str


@dataclasses.dataclass
class Counts:
  """What encoding kept, truncated and dropped (with the first few rows of each reason)."""
  read: int = 0
  kept: int = 0
  truncated: int = 0
  dropped_too_long: int = 0
  dropped_no_assistant: int = 0
  dropped_identical: int = 0
  dropped_render: int = 0
  examples: dict = dataclasses.field(default_factory=dict)

  def drop(self, reason: str, where: str) -> None:
    setattr(self, f'dropped_{reason}', getattr(self, f'dropped_{reason}') + 1)
    self.examples.setdefault(reason, [])
    if len(self.examples[reason]) < 3:
      self.examples[reason].append(where)

  def describe(self, what: str) -> str:
    parts = [f'{what}: {self.read} read, {self.kept} kept ({self.truncated} truncated)']
    for reason in ('too_long', 'no_assistant', 'identical', 'render'):
      n = getattr(self, f'dropped_{reason}')
      if n:
        parts.append(f'{n} dropped: {reason.replace("_", " ")} ({", ".join(self.examples.get(reason, []))})')
    return ', '.join(parts)


def _rows(pattern: str, what: str):
  """(where, record) of every row of the files a glob matches, in path order."""
  for path in documents.resolve_files(pattern, what):
    name = os.path.basename(path).lower()
    if name.endswith('.parquet'):
      for i, record in enumerate(formats.parquet_records(path)):
        yield f'{path}:row {i}', record
    elif any(name.endswith(e) for e in ('.jsonl', '.json', '.jsonl.gz', '.jsonl.zst', '.json.gz', '.json.zst')):
      for n, record in documents.jsonl_records(documents.read_utf8(path), path):
        yield f'{path}:{n}', record
    else:
      raise DataError(f'{path}: chat data must be .jsonl (optionally .gz / .zst) or .parquet')


def _messages(value, where: str, sharegpt: bool) -> list:
  if not isinstance(value, (list, tuple)):
    raise DataError(f'{where}: the conversation must be a list of messages, not {type(value).__name__}')
  out = []
  for m in value:
    if not isinstance(m, dict):
      raise DataError(f'{where}: a message is {type(m).__name__}, not an object')
    role = m.get('from') if sharegpt else m.get('role')
    content = m.get('value') if sharegpt else m.get('content')
    allowed = SHAREGPT_ROLES if sharegpt else {r: r for r in ROLES}
    if role not in allowed:
      raise DataError(f'{where}: unknown {"from" if sharegpt else "role"} {role!r}; allowed: {", ".join(allowed)}')
    if not isinstance(content, str):
      raise DataError(f'{where}: a {role} message has no string {"value" if sharegpt else "content"}')
    out.append({'role': allowed[role], 'content': content})
  return out


def read_conversations(pattern: str, field: str = '', what: str = 'finetune.train_files') -> list[Conversation]:
  """The conversations of every row (see the module docstring); `field` '' takes whichever a row has."""
  out = []
  for where, record in _rows(pattern, what):
    key = field or ('messages' if 'messages' in record else 'conversations' if 'conversations' in record else None)
    if key not in record:
      raise DataError(f'{where}: no {field or "messages or conversations"} field (it has {", ".join(record)})')
    out.append(Conversation(_messages(record[key], where, key == 'conversations'), where))
  return out


def _side(value, where: str, name: str) -> list:
  if isinstance(value, str):
    return [{'role': 'assistant', 'content': value}]
  msgs = _messages(value, f'{where} ({name})', False)
  if not msgs or msgs[-1]['role'] != 'assistant':
    raise DataError(f'{where}: {name} must end with an assistant message')
  return msgs


def read_pairs(pattern: str, what: str = 'finetune.train_files') -> list[Pair]:
  """The preference pairs of every row (see the module docstring)."""
  out = []
  for where, record in _rows(pattern, what):
    for key in ('chosen', 'rejected'):
      if key not in record:
        raise DataError(f'{where}: no {key!r} field (it has {", ".join(record)})')
    chosen, rejected = _side(record['chosen'], where, 'chosen'), _side(record['rejected'], where, 'rejected')
    prompt = record.get('prompt')
    prompt = ([{'role': 'user', 'content': prompt}] if isinstance(prompt, str)
              else _messages(prompt, f'{where} (prompt)', False) if prompt is not None else [])
    shared = 0   # chat form: the leading messages chosen and rejected share are the prompt
    while shared < min(len(chosen), len(rejected)) - 1 and chosen[shared] == rejected[shared]:
      shared += 1
    if shared:
      if prompt and prompt != chosen[:shared]:
        raise DataError(f'{where}: prompt differs from the messages chosen and rejected start with')
      prompt, chosen, rejected = chosen[:shared], chosen[shared:], rejected[shared:]
    if not any(m['role'] == 'user' for m in prompt):
      raise DataError(f'{where}: the pair has no user prompt')
    out.append(Pair(prompt, chosen, rejected, where))
  return out


def _weighted(rendered, last_turn: bool) -> np.ndarray:
  mask = rendered.assistant.copy()
  if last_turn and mask.any():
    mask &= rendered.turn == rendered.turn[mask].max()
  return mask


def _fit(ids, mask, length: int, too_long: str, counts: Counts, where: str):
  """(ids, mask) cut to `length` per the too_long rule, or None when dropped."""
  if len(ids) <= length:
    return ids, mask
  if too_long == 'drop' or not mask[1:length].any():
    counts.drop('too_long', where)
    return None
  counts.truncated += 1
  return ids[:length], mask[:length]


def _row(pieces, length: int, pad_id: int) -> dict:
  """One row of `length` tokens from [(ids, mask)], a segment each; 'loss' marks weighted target tokens."""
  tokens = np.full(length, pad_id, np.int32)
  seg = np.zeros(length, np.int32)
  pos = np.zeros(length, np.int32)
  loss = np.zeros(length, bool)
  at = 0
  for s, (ids, mask) in enumerate(pieces, 1):
    n = len(ids)
    tokens[at:at + n], seg[at:at + n], pos[at:at + n], loss[at:at + n] = ids, s, np.arange(n), mask
    at += n
  return {'tokens': tokens, 'segment_ids': seg, 'positions': pos, 'loss': loss}


def _stack(rows: list[dict]) -> dict[str, np.ndarray]:
  stacked = {k: np.stack([r[k] for r in rows]) for k in rows[0]}
  batch = batches_lib.model_batch(stacked)
  batch['weights'] = batch['weights'] * stacked['loss'][:, 1:]   # the target is an assistant token
  return batch


def encode_sft(conversations, template, seq_len: int, loss_on: str = 'assistant', too_long: str = 'truncate',
               pack: bool = True) -> tuple[dict[str, np.ndarray], Counts]:
  """Rows [N, seq_len] of whole conversations (packed in order when `pack`), weight on assistant targets."""
  counts, length, pieces = Counts(), seq_len + 1, []
  for c in conversations:
    counts.read += 1
    try:
      r = template.render(c.messages)
    except ChatTemplateError as e:
      counts.drop('render', f'{c.where}: {e}')
      continue
    mask = _weighted(r, loss_on == 'last_turn')
    if not mask.any():
      counts.drop('no_assistant', c.where)
      continue
    fitted = _fit(r.ids, mask, length, too_long, counts, c.where)
    if fitted is not None:
      pieces.append(fitted)
      counts.kept += 1
  if not pieces:
    raise DataError(f'no conversation left to train on: {counts.describe("sft")}')
  rows, current, used = [], [], 0
  for ids, mask in pieces:
    if current and (not pack or used + len(ids) > length):
      rows.append(_row(current, length, template.tokenizer.pad_id))
      current, used = [], 0
    current.append((ids, mask))
    used += len(ids)
  rows.append(_row(current, length, template.tokenizer.pad_id))
  return _stack(rows), counts


def encode_pairs(pairs, template, seq_len: int, too_long: str = 'truncate') -> tuple[dict, dict, Counts]:
  """(chosen rows, rejected rows) [P, seq_len], one sequence per row, weight on the response tokens."""
  counts, length = Counts(), seq_len + 1
  chosen_rows, rejected_rows = [], []
  for p in pairs:
    counts.read += 1
    if p.chosen == p.rejected:
      counts.drop('identical', p.where)
      continue
    sides = []
    for side in (p.chosen, p.rejected):
      try:
        r = template.render(p.prompt + side)
      except ChatTemplateError as e:
        counts.drop('render', f'{p.where}: {e}')
        break
      response = r.assistant & (r.turn >= len(p.prompt))
      fitted = _fit(r.ids, response, length, too_long, counts, p.where)
      if fitted is None:
        break
      sides.append(fitted)
    if len(sides) == 2:
      chosen_rows.append(_row([sides[0]], length, template.tokenizer.pad_id))
      rejected_rows.append(_row([sides[1]], length, template.tokenizer.pad_id))
      counts.kept += 1
  if not chosen_rows:
    raise DataError(f'no preference pair left to train on: {counts.describe("dpo")}')
  return _stack(chosen_rows), _stack(rejected_rows), counts

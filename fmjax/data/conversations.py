"""Chat conversations and preference pairs for SFT / DPO: reading them and encoding them as model batches.

Files (a glob, path order) are JSONL (.jsonl/.json, a .json may also hold one JSON array; plain,
.gz or .zst) or Parquet, one example a row. A conversation row has `messages: [{role, content}]`
(OpenAI / Hugging Face style) or `conversations: [{from, value}]` (ShareGPT). A pair row has
`prompt`, `chosen`, `rejected`: strings or message lists; when chosen and rejected are whole
conversations (UltraFeedback-binarized style) their shared leading messages are the prompt.
Each example keeps `where` ('path:line', or 'path:row N' counting from 1 in Parquet files).

`encode_sft` renders conversations with a ChatTemplate into rows of the model batch format
(fmjax.data.batches), weight 1 where the target is an assistant token; `encode_pairs` gives the
chosen and rejected batches of DPO, one pair per row index. `Counts` tallies what was kept and why
the rest was dropped.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from fmjax.data import batches as batches_lib
from fmjax.data import documents, formats
from fmjax.data.chat_templates import ROLES, ChatTemplateError
from fmjax.data.errors import DataError

SHAREGPT_ROLES = {'human': 'user', 'user': 'user', 'gpt': 'assistant', 'assistant': 'assistant',
                  'chatgpt': 'assistant', 'bing': 'assistant', 'bard': 'assistant', 'model': 'assistant',
                  'system': 'system'}
LOSS_ON = ('assistant', 'last_turn')
TOO_LONG = ('truncate', 'drop')
_EXAMPLES = 3
_REASONS = (('dropped_too_long', 'too long'), ('dropped_no_assistant', 'no assistant turn'),
            ('dropped_identical', 'chosen = rejected'), ('dropped_render', 'template error'))


@dataclasses.dataclass
class Conversation:
  messages: list[dict]   # [{'role', 'content'}], roles in chat_templates.ROLES
  where: str             # 'path:line' (JSONL) or 'path:row N' (Parquet)


@dataclasses.dataclass
class Pair:
  prompt: list[dict]     # the messages before the response (at least one user message)
  chosen: list[dict]     # the chosen response's messages (normally one assistant message)
  rejected: list[dict]
  where: str


@dataclasses.dataclass
class Counts:
  """What encoding kept and dropped; `examples` maps a reason to the first few rows it dropped."""
  read: int = 0
  kept: int = 0
  truncated: int = 0
  dropped_too_long: int = 0
  dropped_no_assistant: int = 0
  dropped_identical: int = 0
  dropped_render: int = 0
  examples: dict[str, list[str]] = dataclasses.field(default_factory=dict)
  unit: str = 'conversations'

  def drop(self, field: str, where: str) -> None:
    setattr(self, field, getattr(self, field) + 1)
    shown = self.examples.setdefault(field, [])
    if len(shown) < _EXAMPLES:
      shown.append(where)

  def describe(self, what: str) -> str:
    """One line: what was read, kept (and truncated), and each reason for dropping with its first rows."""
    line = f'{what}: {self.read} {self.unit}, {self.kept} kept'
    if self.truncated:
      line += f' ({self.truncated} truncated)'
    for field, reason in _REASONS:
      n = getattr(self, field)
      if n:
        shown = self.examples.get(field, [])
        more = ', ...' if n > len(shown) else ''
        line += f', {n} dropped: {reason} ({", ".join(shown)}{more})'
    return line


# Reading.

def _file_rows(path: str):
  """(where, row) of each example of one JSONL / JSON / Parquet file."""
  kind = formats.kind_of(path)
  if kind == 'parquet':
    import pyarrow  # pylint: disable=import-outside-toplevel
    import pyarrow.parquet as pq  # pylint: disable=import-outside-toplevel
    try:
      rows = pq.read_table(path).to_pylist()
    except (OSError, pyarrow.ArrowException) as e:
      raise DataError(f'cannot read Parquet file {path}: {e}') from None
    for n, row in enumerate(rows, 1):
      yield f'{path}:row {n}', row
    return
  if kind != 'jsonl':
    raise DataError(f'{path}: chat data must be .jsonl / .json (optionally .gz / .zst) or .parquet files')
  raw = formats.read_all(path)
  try:
    text = raw.decode('utf-8')
  except UnicodeDecodeError as e:
    raise DataError(f'{path} is not UTF-8 (byte 0x{raw[e.start]:02x} at offset {e.start}): save it as UTF-8') from None
  text = text.lstrip('\ufeff')
  if text.lstrip().startswith('['):          # a .json file holding one array of examples
    try:
      records = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f'{path}:{e.lineno}: invalid JSON ({e.msg})') from None
    for n, row in enumerate(records, 1):
      if not isinstance(row, dict):
        raise DataError(f'{path}:row {n}: a JSON {type(row).__name__}, not an object')
      yield f'{path}:row {n}', row
    return
  for lineno, row in documents.jsonl_records(text, path):
    yield f'{path}:{lineno}', row


def _rows(pattern: str, what: str):
  for path in documents.resolve_files(pattern, what):
    yield from _file_rows(path)


def _message(item, where: str, key: str, i: int) -> dict:
  """One message of a row's list, OpenAI style {role, content} or ShareGPT style {from, value}."""
  if not isinstance(item, dict):
    raise DataError(f'{where}: {key}[{i}] is a {type(item).__name__}, not a {{role, content}} object')
  if 'role' in item:
    role, content = item['role'], item.get('content')
    if role not in ROLES:
      raise DataError(f'{where}: {key}[{i}] has role {role!r}; allowed roles: {", ".join(ROLES)}')
  elif 'from' in item:
    role, content = SHAREGPT_ROLES.get(str(item['from']).lower()), item.get('value')
    if role is None:
      raise DataError(f'{where}: {key}[{i}] has from {item["from"]!r}; allowed: {", ".join(SHAREGPT_ROLES)}')
  else:
    raise DataError(f'{where}: {key}[{i}] has neither role/content nor from/value (it has '
                    f'{", ".join(map(str, item)) or "no keys"})')
  if not isinstance(content, str):
    raise DataError(f'{where}: {key}[{i}] ({role}) content is {type(content).__name__}, not a string')
  return {'role': role, 'content': content}


def _messages(value, where: str, key: str) -> list[dict]:
  if not isinstance(value, (list, tuple)):
    raise DataError(f'{where}: {key} is a {type(value).__name__}, not a list of messages')
  return [_message(item, where, key, i) for i, item in enumerate(value)]


def read_conversations(pattern: str, field: str = '', what: str = 'finetune.train_files') -> list[Conversation]:
  """The conversations of the files a glob matches, in path order; `field` names the message list
  ('' = `messages` or `conversations`, whichever a row has)."""
  out = []
  for where, row in _rows(pattern, what):
    key = field or next((k for k in ('messages', 'conversations') if k in row), None)
    if key is None or key not in row:
      wanted = repr(field) if field else "'messages' or 'conversations'"
      raise DataError(f'{where}: no field {wanted} (it has {", ".join(map(str, row)) or "no keys"}); '
                      'set finetune.chat_field')
    out.append(Conversation(_messages(row[key], where, key), where))
  return out


def _side(value, where: str, key: str) -> list[dict]:
  """A chosen / rejected value as messages: a string is one assistant message."""
  if isinstance(value, str):
    return [{'role': 'assistant', 'content': value}]
  return _messages(value, where, key)


def _pair(row: dict, where: str) -> Pair:
  missing = [k for k in ('chosen', 'rejected') if k not in row]
  if missing:
    raise DataError(f'{where}: no field {missing[0]!r} (it has {", ".join(map(str, row)) or "no keys"}); a '
                    'preference pair needs prompt, chosen and rejected')
  chosen, rejected = _side(row['chosen'], where, 'chosen'), _side(row['rejected'], where, 'rejected')
  prompt = row.get('prompt')
  if isinstance(prompt, (list, tuple)):
    prompt = _messages(prompt, where, 'prompt')
    chosen, rejected = [s[len(prompt):] if s[:len(prompt)] == prompt else s for s in (chosen, rejected)]
  else:
    if prompt is not None and not isinstance(prompt, str):
      raise DataError(f'{where}: prompt is a {type(prompt).__name__}, not a string or a list of messages')
    k = 0    # the shared leading messages (identical sides: all but the last; encode_pairs drops them)
    while k < min(len(chosen), len(rejected)) - 1 and chosen[k] == rejected[k]:
      k += 1
    head, chosen, rejected = chosen[:k], chosen[k:], rejected[k:]
    if not any(m['role'] == 'user' for m in head) and isinstance(prompt, str):
      head = [{'role': 'user', 'content': prompt}] + head
    prompt = head
  if not any(m['role'] == 'user' for m in prompt):
    raise DataError(f'{where}: the prompt has no user message; give a prompt string or conversations that '
                    'start with the user turn')
  for key, side in (('chosen', chosen), ('rejected', rejected)):
    if not side or side[-1]['role'] != 'assistant':
      raise DataError(f'{where}: {key} does not end in an assistant message')
  return Pair(prompt, chosen, rejected, where)


def read_pairs(pattern: str, what: str = 'finetune.train_files') -> list[Pair]:
  """The preference pairs {prompt, chosen, rejected} of the files a glob matches, in path order."""
  return [_pair(row, where) for where, row in _rows(pattern, what)]


# Encoding.

def _check_options(seq_len: int, too_long: str, loss_on: str = 'assistant') -> None:
  if too_long not in TOO_LONG:
    raise DataError(f'finetune.too_long={too_long!r} must be one of {", ".join(TOO_LONG)}')
  if loss_on not in LOSS_ON:
    raise DataError(f'finetune.loss_on={loss_on!r} must be one of {", ".join(LOSS_ON)}')
  if seq_len < 1:
    raise DataError(f'seq_len={seq_len} must be at least 1')


def _labelled(template, messages: list[dict], where: str, counts: Counts, select) -> tuple | None:
  """(ids, label) of a rendered conversation, label = the assistant tokens `select(turn)` keeps; None if
  the template refused it (counted)."""
  try:
    rendered = template.render(messages)
  except ChatTemplateError as e:
    counts.drop('dropped_render', f'{where} ({e})')
    return None
  return rendered.ids, rendered.assistant & select(rendered.turn)


def _fit(ids, label, length: int, too_long: str) -> tuple | None:
  """The tokens kept within `length` (None: dropped) and whether they were truncated."""
  if len(ids) <= length:
    return ids, label, False
  if too_long == 'drop' or not label[1:length].any():
    return None
  return ids[:length], label[:length], True


def _batch(rows: list[list[tuple]], length: int, pad_id: int) -> dict[str, np.ndarray]:
  """Rows of (ids, label) pieces -> the model batch, weights only where the target is labelled."""
  n = len(rows)
  tokens = np.full((n, length), pad_id, np.int32)
  seg = np.zeros((n, length), np.int32)
  pos = np.zeros((n, length), np.int32)
  label = np.zeros((n, length), bool)
  for r, pieces in enumerate(rows):
    at = 0
    for s, (ids, lab) in enumerate(pieces, 1):
      k = len(ids)
      tokens[r, at:at + k], seg[r, at:at + k], pos[r, at:at + k], label[r, at:at + k] = ids, s, np.arange(k), lab
      at += k
  batch = batches_lib.model_batch({'tokens': tokens, 'segment_ids': seg, 'positions': pos})
  batch['weights'] = batch['weights'] * label[:, 1:]
  return batch


def encode_sft(conversations, template, seq_len: int, loss_on: str = 'assistant', too_long: str = 'truncate',
               pack: bool = True) -> tuple[dict[str, np.ndarray], Counts]:
  """Conversations -> model batch rows [N, seq_len], weight 1 where the target is an assistant token
  (loss_on='last_turn': of the last assistant message); packed whole, in order, when `pack`."""
  _check_options(seq_len, too_long, loss_on)
  length, counts, pieces = seq_len + 1, Counts(), []
  for conv in conversations:
    counts.read += 1
    assistants = [i for i, m in enumerate(conv.messages) if m['role'] == 'assistant']
    if not assistants:
      counts.drop('dropped_no_assistant', conv.where)
      continue
    select = (lambda turn: turn >= 0) if loss_on == 'assistant' else (lambda turn, i=assistants[-1]: turn == i)
    labelled = _labelled(template, conv.messages, conv.where, counts, select)
    if labelled is None:
      continue
    if not labelled[1][1:].any():
      counts.drop('dropped_no_assistant', conv.where)
      continue
    fitted = _fit(*labelled, length, too_long)
    if fitted is None:
      counts.drop('dropped_too_long', conv.where)
      continue
    counts.kept += 1
    counts.truncated += fitted[2]
    pieces.append(fitted[:2])
  if not pieces:
    raise DataError(f'no conversation left to train on: {counts.describe("sft")}')
  rows, used = [], length
  for piece in pieces:
    if not pack or used + len(piece[0]) > length:
      rows.append([])
      used = 0
    rows[-1].append(piece)
    used += len(piece[0])
  return _batch(rows, length, template.tokenizer.pad_id), counts


def encode_pairs(pairs, template, seq_len: int, too_long: str = 'truncate') -> tuple[dict[str, np.ndarray],
                                                                                      dict[str, np.ndarray], Counts]:
  """Preference pairs -> (chosen batch, rejected batch) [P, seq_len], one pair per row index, one sequence a
  row, weight 1 where the target is an assistant token of the response."""
  _check_options(seq_len, too_long)
  length, counts, chosen_rows, rejected_rows = seq_len + 1, Counts(unit='pairs'), [], []
  for pair in pairs:
    counts.read += 1
    if pair.chosen == pair.rejected:
      counts.drop('dropped_identical', pair.where)
      continue
    if not any(m['role'] == 'assistant' for side in (pair.chosen, pair.rejected) for m in side):
      counts.drop('dropped_no_assistant', pair.where)
      continue
    first = len(pair.prompt)
    sides = []
    for side in (pair.chosen, pair.rejected):
      sides.append(_labelled(template, pair.prompt + side, pair.where, counts, lambda turn: turn >= first))
      if sides[-1] is None:
        break
    if sides[-1] is None:
      continue
    if not (sides[0][1][1:].any() and sides[1][1][1:].any()):
      counts.drop('dropped_no_assistant', pair.where)
      continue
    fitted = [_fit(*side, length, too_long) for side in sides]
    if fitted[0] is None or fitted[1] is None:
      counts.drop('dropped_too_long', pair.where)
      continue
    counts.kept += 1
    counts.truncated += fitted[0][2] or fitted[1][2]
    chosen_rows.append([fitted[0][:2]])
    rejected_rows.append([fitted[1][:2]])
  if not chosen_rows:
    raise DataError(f'no preference pair left to train on: {counts.describe("dpo")}')
  pad = template.tokenizer.pad_id
  return _batch(chosen_rows, length, pad), _batch(rejected_rows, length, pad), counts

"""Tokenizers: bytes (ByT5-style), characters (nanoGPT-style) or a SentencePiece model.

All round-trip text exactly. Bytes and SentencePiece share the special ids pad=0, bos=1, eos=2
(SentencePiece models trained here also fix unk=3). A char tokenizer numbers the sorted
characters of its training text 0..n-1 (as nanoGPT's prepare.py does) and puts pad, bos, eos
at n, n+1, n+2; it is a small JSON file {"kind": "char", "chars": "..."}, and encoding a
character outside it is a DataError. `spec` is the string a tokenizer was loaded from ('byte'
or the file path); `load_tokenizer` tells a char JSON file from a SentencePiece model by its
content, whatever its name. `token_byte_lengths()` gives the UTF-8 bytes each id stands for
(0 for specials), so that losses can be reported in bits per byte whatever the tokenizer.
"""

from __future__ import annotations

import io
import json
import os
import shutil
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from fmjax.data import documents
from fmjax.data.errors import DataError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class ByteTokenizer:
  """UTF-8 bytes offset by 3 (pad=0, bos=1, eos=2): vocab_size 259."""

  offset = 3
  vocab_size = 256 + offset
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  spec = 'byte'
  path = None

  def encode(self, text: str) -> np.ndarray:
    data = np.frombuffer(text.encode('utf-8', errors='surrogatepass'), dtype=np.uint8)
    return data.astype(np.int32) + self.offset

  def decode(self, ids: Iterable[int]) -> str:
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    ids = ids[(ids >= self.offset) & (ids < self.vocab_size)] - self.offset
    return ids.astype(np.uint8).tobytes().decode('utf-8', errors='replace')

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.ones(self.vocab_size, dtype=np.int32)
    lengths[:self.offset] = 0
    return lengths

  def __repr__(self) -> str:
    return 'ByteTokenizer()'


class SentencePieceTokenizer:
  """A SentencePiece model file; pickles as its serialized proto (for worker processes)."""

  def __init__(self, path: str):
    self.spec = self.path = path
    try:
      with open(path, 'rb') as f:
        self._load(f.read())
    except OSError as e:
      raise DataError(f'cannot read tokenizer model {path}: {e.strerror}') from None

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except RuntimeError as e:
      raise DataError(f'{self.path} is not a SentencePiece model: {e}') from None
    self.vocab_size = self._sp.GetPieceSize()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
    if self.pad_id < 0:
      raise DataError(f'{self.path} defines no pad piece: train it with fmjax (tools/train_tokenizer.py)')

  def __getstate__(self):
    return {'path': self.path, 'proto': self._proto}

  def __setstate__(self, state):
    self.spec = self.path = state['path']
    self._load(state['proto'])

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._sp.EncodeAsIds(text), dtype=np.int32)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.DecodeIds([int(i) for i in np.asarray(ids).reshape(-1)])

  def token_byte_lengths(self) -> np.ndarray:
    sp = self._sp
    lengths = np.zeros(self.vocab_size, dtype=np.int32)
    for i in range(self.vocab_size):
      if sp.IsControl(i) or sp.IsUnknown(i) or sp.IsUnused(i):
        continue
      if sp.IsByte(i):
        lengths[i] = 1
      else:
        lengths[i] = len(sp.IdToPiece(i).replace('\u2581', ' ').encode('utf-8'))
    return lengths

  def __repr__(self) -> str:
    return f'SentencePieceTokenizer({self.path!r}, vocab_size={self.vocab_size})'


class CharTokenizer:
  """One id per character of a fixed set (sorted), then pad, bos, eos; loaded from its JSON file."""

  kind = 'char'

  def __init__(self, chars: str, path: str | None = None):
    if not chars or len(set(chars)) != len(chars):
      raise DataError(f'char tokenizer {path or ""} needs a non-empty string of distinct characters')
    self.chars = ''.join(sorted(chars))
    self.spec = self.path = path
    self._ids = {c: i for i, c in enumerate(self.chars)}
    n = len(self.chars)
    self.pad_id, self.bos_id, self.eos_id = n, n + 1, n + 2
    self.vocab_size = n + 3

  @classmethod
  def from_file(cls, path: str, text: str) -> 'CharTokenizer':
    """The tokenizer stored in `path` (its content `text`)."""
    try:
      record = json.loads(text)
    except json.JSONDecodeError as e:
      raise DataError(f'{path} is not a char tokenizer JSON file ({e.msg}): write it with '
                      'tools/train_tokenizer.py --model-type char') from None
    if not isinstance(record, dict) or record.get('kind') != 'char' or not isinstance(record.get('chars'), str):
      raise DataError(f'{path} is not a char tokenizer file: expected {{"kind": "char", "chars": "..."}}')
    return cls(record['chars'], path)

  def to_json(self) -> str:
    return json.dumps({'kind': 'char', 'chars': self.chars}, ensure_ascii=False)

  def encode(self, text: str) -> np.ndarray:
    try:
      return np.fromiter((self._ids[c] for c in text), dtype=np.int32, count=len(text))
    except KeyError as e:
      missing = e.args[0]
      raise DataError(f'character {missing!r} (U+{ord(missing):04X}) is not in the char tokenizer '
                      f'{self.path or ""} ({len(self.chars)} characters): retrain it on text that holds it '
                      '(tools/train_tokenizer.py --model-type char)') from None

  def decode(self, ids: Iterable[int]) -> str:
    n = len(self.chars)
    return ''.join(self.chars[i] for i in np.asarray(ids, dtype=np.int64).reshape(-1).tolist() if 0 <= i < n)

  def token_byte_lengths(self) -> np.ndarray:
    lengths = np.zeros(self.vocab_size, dtype=np.int32)
    lengths[:len(self.chars)] = [len(c.encode('utf-8', errors='surrogatepass')) for c in self.chars]
    return lengths

  def __repr__(self) -> str:
    return f'CharTokenizer({self.path!r}, vocab_size={self.vocab_size})'


Tokenizer = ByteTokenizer | SentencePieceTokenizer | CharTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
  """'byte', or the path of a SentencePiece .model file or a char tokenizer JSON file (told apart by content)."""
  if spec == 'byte':
    return ByteTokenizer()
  path = os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise DataError(f"tokenizer {spec!r} not found: set data.tokenizer to 'byte' or an existing "
                    '.model / char .json file (train one with tools/train_tokenizer.py)')
  try:
    with open(path, 'rb') as f:
      head = f.read(64).lstrip()
  except OSError as e:
    raise DataError(f'cannot read tokenizer {path}: {e.strerror}') from None
  if head.startswith(b'{'):
    return CharTokenizer.from_file(path, documents.read_utf8(path, 'tokenizer'))
  return SentencePieceTokenizer(path)


def train_char(paths: Sequence[str], output: str) -> CharTokenizer:
  """A char tokenizer of the sorted characters of the given UTF-8 text files, written to `output` (JSON)."""
  chars = set()
  for path in paths:
    chars.update(documents.read_utf8(path, 'tokenizer input'))
  if not chars:
    raise DataError('the tokenizer inputs are empty: give files with text')
  tok = CharTokenizer(''.join(chars), output)
  _write_atomically(output, tok.to_json().encode('utf-8'))
  return tok


def place_in_workdir(tokenizer: Tokenizer, workdir: str) -> str:
  """Copy a tokenizer file into the workdir (process 0); return the spec checkpoints record
  ('byte' or the copy's file name, relative to the workdir)."""
  if tokenizer.path is None:
    return tokenizer.spec
  import jax  # pylint: disable=import-outside-toplevel
  name = 'tokenizer.model'
  target = os.path.join(workdir, name)
  if jax.process_index() == 0 and os.path.abspath(tokenizer.path) != os.path.abspath(target):
    shutil.copyfile(tokenizer.path, target)
  return name


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """The model's embedding must cover every token id."""
  if tokenizer.vocab_size > model_vocab_size:
    raise DataError(f'tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} tokens but '
                    f'model.vocab_size={model_vocab_size}: set model.vocab_size >= {tokenizer.vocab_size}')


def _lines_of_files(paths: Sequence[str]) -> Iterator[str]:
  for path in paths:
    try:
      with open(path, 'rb') as f:
        text = f.read().decode('utf-8', errors='replace')
    except OSError as e:
      raise DataError(f'cannot read tokenizer input {path}: {e.strerror}') from None
    yield from _lines_of_texts([text])


def _lines_of_texts(texts: Iterable[str]) -> Iterator[str]:
  for text in texts:
    for line in text.split('\n'):
      if line.strip():
        yield line


def train_sentencepiece(inputs: Sequence[str] | Iterable[str], vocab_size: int,
                        model_type: str = 'bpe', output: str = 'tokenizer.model',
                        max_sentences: int = 2_000_000) -> str:
  """Train a SentencePiece model that round-trips text exactly; returns the .model path.

  inputs: a list/tuple of file paths, or any other iterable of document texts.
  Settings: identity normalization, whitespace kept as is (code indentation survives),
  byte fallback (no unknown characters), digits split, pad=0 bos=1 eos=2 unk=3.
  Newlines are encoded through byte fallback (`<0x0A>`): SentencePiece trains on lines.
  """
  if model_type not in ('bpe', 'unigram'):
    raise DataError(f'model_type={model_type!r} must be bpe or unigram')
  if vocab_size < 300:
    raise DataError(f'vocab_size={vocab_size} is too small: byte fallback alone takes 260 ids; use >= 300')
  if isinstance(inputs, (list, tuple)):
    sentences = _lines_of_files(inputs)
  elif isinstance(inputs, str):
    raise DataError('train_sentencepiece takes a list of file paths or an iterable of texts, not one string')
  else:
    sentences = _lines_of_texts(inputs)
  model = io.BytesIO()
  try:
    spm.SentencePieceTrainer.train(
        sentence_iterator=sentences, model_writer=model, vocab_size=vocab_size,
        model_type=model_type, character_coverage=1.0, byte_fallback=True,
        normalization_rule_name='identity', remove_extra_whitespaces=False,
        add_dummy_prefix=False, split_digits=True, allow_whitespace_only_pieces=True,
        split_by_whitespace=True, max_sentence_length=16384, input_sentence_size=max_sentences,
        shuffle_input_sentence=True, hard_vocab_limit=False, num_threads=2,
        pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, minloglevel=2)
  except RuntimeError as e:
    raise DataError(f'SentencePiece training failed: {str(e).strip().splitlines()[-1]}') from None
  _write_atomically(output, model.getvalue())
  return output


def _write_atomically(output: str, data: bytes) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
  tmp = f'{output}.tmp-{os.getpid()}'
  with open(tmp, 'wb') as f:
    f.write(data)
  os.replace(tmp, output)

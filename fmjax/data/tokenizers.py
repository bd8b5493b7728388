"""Tokenizers: bytes (ByT5-style), characters (nanoGPT-style), a SentencePiece model or a Hugging Face
tokenizer.json (HFTokenizer, through the `tokenizers` library).

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
import re
from typing import Iterable, Iterator, Sequence

import numpy as np
import sentencepiece as spm

from fmjax.runtime import paths
from fmjax.data import documents, formats
from fmjax.data.errors import DataError

PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3


class ByteTokenizer:
  """UTF-8 bytes offset by 3 (pad=0, bos=1, eos=2): vocab_size 259."""

  offset = 3
  vocab_size = 256 + offset
  pad_id, bos_id, eos_id = PAD_ID, BOS_ID, EOS_ID
  # Encoder specials: [CLS] = bos, [SEP] = eos, [MASK] = byte 0xFF, which no UTF-8 text holds.
  cls_id, sep_id, mask_id = BOS_ID, EOS_ID, 0xFF + offset
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


_TOKENIZER_KINDS = ("data.tokenizer must be 'byte', a SentencePiece .model file (tools/train_tokenizer.py), a "
                    'Hugging Face tokenizer.json or a char tokenizer .json file')


def _sentencepiece_reason(proto: bytes, error: Exception) -> str:
  """Why SentencePiece refused a model, without its C++ source location."""
  if not proto.strip(b'\0'):
    return 'the file is empty'
  text = re.sub(r'\S+\.cc\(\d+\)\s*(\[.*?\])?', '', str(error).strip().splitlines()[0])
  text = re.sub(r'^[A-Z_]+:\s*', '', text).strip(' .')
  return text or 'its bytes do not parse as a SentencePiece model'


class SentencePieceTokenizer:
  """A SentencePiece model file; pickles as its serialized proto (for worker processes)."""

  def __init__(self, path: str):
    self.spec = self.path = path
    try:
      self._load(paths.read_bytes(path))
    except OSError as e:
      raise DataError(f'cannot read tokenizer model {path}: {e.strerror}') from None

  def _load(self, proto: bytes) -> None:
    self._proto = proto
    self._sp = spm.SentencePieceProcessor()
    try:
      self._sp.LoadFromSerializedProto(proto)
    except RuntimeError as e:
      raise DataError(f'tokenizer {self.path} is not a SentencePiece model ({_sentencepiece_reason(proto, e)}): '
                      f'{_TOKENIZER_KINDS}') from None
    self.vocab_size = self._sp.GetPieceSize()
    self.pad_id, self.bos_id, self.eos_id = self._sp.pad_id(), self._sp.bos_id(), self._sp.eos_id()
    if self.pad_id < 0:
      raise DataError(f'{self.path} defines no pad piece: train it with fmjax (tools/train_tokenizer.py)')
    # Encoder specials: [CLS] = bos, [SEP] = eos; [MASK] = a '[MASK]' or '<mask>' piece if the model
    # has one, else unk (byte fallback: no text encodes to unk), else None (no MLM).
    self.cls_id, self.sep_id = self.bos_id, self.eos_id
    self.mask_id = next((self._sp.PieceToId(p) for p in ('[MASK]', '<mask>')
                         if self._sp.PieceToId(p) != self._sp.unk_id()), None)
    if self.mask_id is None and self._sp.unk_id() >= 0 and self._sp.IsByte(self._sp.PieceToId('<0x00>')):
      self.mask_id = self._sp.unk_id()

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


HF_DIR = 'hf_tokenizer'      # where a workdir keeps a Hugging Face tokenizer's files
HF_TOKENIZER_FILES = ('tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json', 'vocab.json',
                      'merges.txt', 'tokenizer.model', 'added_tokens.json', 'chat_template.jinja')
_HF_SPECIAL_GUESSES = {'bos': ('<|begin_of_text|>', '<s>', '<|endoftext|>', '<bos>', '[CLS]'),
                       'eos': ('<|end_of_text|>', '</s>', '<|endoftext|>', '<eos>', '[SEP]'),
                       'pad': ('<pad>', '<|pad|>', '[PAD]'),
                       'cls': ('[CLS]', '<s>'), 'sep': ('[SEP]', '</s>'), 'mask': ('[MASK]', '<mask>')}


def _token_content(value) -> str | None:
  """A special token as tokenizer_config.json writes it: a string or {"content": ...}."""
  if isinstance(value, dict):
    value = value.get('content')
  return value if isinstance(value, str) else None


def _hf_special_names(directory: str) -> dict:
  """bos/eos/pad/cls/sep/mask token strings from tokenizer_config.json or special_tokens_map.json beside
  tokenizer.json."""
  names = {}
  for file in ('special_tokens_map.json', 'tokenizer_config.json'):   # the later file wins
    path = paths.join(directory, file)
    if not paths.isfile(path):
      continue
    try:
      record = json.loads(documents.read_utf8(path, 'tokenizer config'))
    except json.JSONDecodeError as e:
      raise DataError(f'{path} is not valid JSON ({e.msg}, line {e.lineno})') from None
    for kind in _HF_SPECIAL_GUESSES:
      name = _token_content(record.get(f'{kind}_token'))
      if name:
        names[kind] = name
  return names


def _hf_chat_template(directory: str) -> str | None:
  """The chat template saved beside tokenizer.json: tokenizer_config.json's `chat_template` (a string, or
  the entry named 'default' of a list of {name, template}), else chat_template.jinja, else None."""
  config = paths.join(directory, 'tokenizer_config.json')
  if paths.isfile(config):
    try:
      template = json.loads(documents.read_utf8(config, 'tokenizer config')).get('chat_template')
    except (json.JSONDecodeError, AttributeError):
      template = None    # a bad config is reported by _hf_special_names
    if isinstance(template, list):
      template = next((t.get('template') for t in template if isinstance(t, dict) and t.get('name') == 'default'),
                      None)
    if isinstance(template, str) and template:
      return template
  jinja = paths.join(directory, 'chat_template.jinja')
  if paths.isfile(jinja):
    return documents.read_utf8(jinja, 'chat template')
  return None


class HFTokenizer:
  """A Hugging Face `tokenizer.json` (the `tokenizers` library: GPT-2 byte-level BPE, Llama 3, Mistral, ...).

  Special tokens come from tokenizer_config.json / special_tokens_map.json beside the file, else from
  well-known names (<|begin_of_text|>, <s>, <|endoftext|>, ...); pad falls back to eos. Text is encoded
  without the tokenizer's own special tokens (fmjax adds bos/eos as data.add_bos/add_eos say).
  `chat_template` is the Jinja chat template saved beside it (tokenizer_config.json or
  chat_template.jinja), else None; `directory` is the folder holding tokenizer.json.
  """

  kind = 'hf'

  def __init__(self, path: str):
    self.spec = self.path = path
    self.directory = paths.dirname(paths.resolve(path))
    self.chat_template = _hf_chat_template(self.directory)
    self._load(documents.read_utf8(path, 'tokenizer'), _hf_special_names(self.directory))

  def _load(self, text: str, names: dict) -> None:
    try:
      from tokenizers import Tokenizer as HFBackend  # pylint: disable=import-outside-toplevel
    except ImportError:
      raise DataError(f'{self.path} is a Hugging Face tokenizer.json: pip install "fmjax[hf]" (tokenizers)') from None
    self._json, self._names = text, dict(names)
    self.configured_tokens = dict(names)   # the special-token strings its config files name (chat templates)
    try:
      self._tok = HFBackend.from_str(text)
    except Exception as e:  # noqa: BLE001 - the library's parse errors become one line
      raise DataError(f'{self.path} is not a Hugging Face tokenizer.json: {str(e).splitlines()[0]}') from None
    self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
    ids = {}
    for kind in _HF_SPECIAL_GUESSES:
      candidates = ([names[kind]] if kind in names else []) + list(_HF_SPECIAL_GUESSES[kind])
      ids[kind] = next((i for i in map(self._tok.token_to_id, candidates) if i is not None), None)
    if ids['eos'] is None:
      raise DataError(f'{self.path}: no end-of-text token found; name it as eos_token in a tokenizer_config.json '
                      'beside it')
    self.bos_id = ids['bos'] if ids['bos'] is not None else ids['eos']
    self.eos_id = ids['eos']
    self.pad_id = ids['pad'] if ids['pad'] is not None else ids['eos']
    # Encoder specials ([CLS]/[SEP]/[MASK] or <s>/</s>/<mask>); cls/sep fall back to bos/eos, mask to None.
    self.cls_id = ids['cls'] if ids['cls'] is not None else self.bos_id
    self.sep_id = ids['sep'] if ids['sep'] is not None else self.eos_id
    self.mask_id = ids['mask']
    self.special_tokens = {k: self._tok.id_to_token(getattr(self, f'{k}_id')) for k in ('bos', 'eos', 'pad')}

  def __getstate__(self):
    return {'path': self.path, 'json': self._json, 'names': self._names, 'directory': self.directory,
            'chat_template': self.chat_template}

  def __setstate__(self, state):
    self.spec = self.path = state['path']
    self.directory, self.chat_template = state.get('directory'), state.get('chat_template')
    self._load(state['json'], state['names'])

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode_with_offsets(self, text: str) -> tuple[np.ndarray, list[tuple[int, int]]]:
    """Ids (special tokens written in the text recognised, none added) and each token's (start, end)
    character offsets into `text`."""
    encoding = self._tok.encode(text, add_special_tokens=False)
    return np.asarray(encoding.ids, dtype=np.int32), [tuple(o) for o in encoding.offsets]

  def special_token_ids(self) -> set[int]:
    """Ids of the added tokens marked special (<|im_end|>, <|eot_id|>, ...)."""
    return {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}

  def encode_with_specials(self, text: str) -> list[int]:
    """Ids as the Hugging Face tokenizer gives them by default (its post-processor may add bos/eos)."""
    return self._tok.encode(text, add_special_tokens=True).ids

  def decode(self, ids: Iterable[int]) -> str:
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=False)

  def token_byte_lengths(self) -> np.ndarray:
    """UTF-8 bytes per id: byte-level vocabularies count one byte per character; SentencePiece-style
    ones count '\u2581' as a space and <0xNN> as one byte; special tokens count 0."""
    record = json.loads(self._json)
    byte_level = 'ByteLevel' in json.dumps(record.get('decoder'))
    prefix = (record.get('model') or {}).get('continuing_subword_prefix') or ''   # WordPiece: '##'
    special = {i for i, t in self._tok.get_added_tokens_decoder().items() if t.special}
    lengths = np.zeros(self.vocab_size, dtype=np.int32)
    for i in range(self.vocab_size):
      piece = self._tok.id_to_token(i)
      if piece is None:
        continue
      if not byte_level and len(piece) == 6 and piece.startswith('<0x') and piece.endswith('>'):
        lengths[i] = 1    # a byte-fallback piece (whether or not it is listed as special)
      elif i in special:
        continue
      elif byte_level:
        lengths[i] = len(piece)
      else:
        if prefix and piece.startswith(prefix):
          piece = piece[len(prefix):]
        lengths[i] = len(piece.replace('\u2581', ' ').encode('utf-8'))
    return lengths

  def __repr__(self) -> str:
    return f'HFTokenizer({self.path!r}, vocab_size={self.vocab_size})'


Tokenizer = ByteTokenizer | SentencePieceTokenizer | CharTokenizer | HFTokenizer


def load_tokenizer(spec: str) -> Tokenizer:
  """'byte', or the path of a SentencePiece .model file or a char tokenizer JSON file (told apart by content)."""
  if spec == 'byte':
    return ByteTokenizer()
  path = spec if paths.is_url(spec) else os.path.expanduser(spec)
  if not paths.isfile(path):
    raise DataError(f"tokenizer {spec!r} not found: set data.tokenizer to 'byte' or an existing "
                    '.model / char .json file (train one with tools/train_tokenizer.py)')
  try:
    with paths.open_file(path, 'rb') as f:
      head = f.read(64).lstrip()
  except OSError as e:
    raise DataError(f'cannot read tokenizer {path}: {e.strerror or e}') from None
  if head.startswith(b'{') or formats.inner_name(path).lower().endswith('.json'):
    text = _json_tokenizer_text(path)
    if '"kind"' not in text[:200] and '"model"' in text:   # a Hugging Face tokenizer.json
      return HFTokenizer(path)
    return CharTokenizer.from_file(path, text)
  return SentencePieceTokenizer(path)


def _json_tokenizer_text(path: str) -> str:
  """The text of a .json tokenizer file; binary or non-JSON content is one line saying what it should be."""
  try:
    text = documents.read_utf8(path, 'tokenizer')
  except DataError:
    raise DataError(f'tokenizer {path} is not a JSON text file (binary or not UTF-8): {_TOKENIZER_KINDS}') from None
  try:
    json.loads(text)
  except json.JSONDecodeError as e:
    raise DataError(f'tokenizer {path} is not valid JSON ({e.msg} at line {e.lineno} column {e.colno}): '
                    f'{_TOKENIZER_KINDS}') from None
  return text


def train_char(files: Sequence[str], output: str) -> CharTokenizer:
  """A char tokenizer of the sorted characters of the given UTF-8 text files, written to `output` (JSON)."""
  chars = set()
  for path in files:
    chars.update(documents.read_utf8(path, 'tokenizer input'))
  if not chars:
    raise DataError('the tokenizer inputs are empty: give files with text')
  tok = CharTokenizer(''.join(chars), output)
  paths.write_bytes(output, tok.to_json().encode('utf-8'))
  return tok


def place_in_workdir(tokenizer: Tokenizer, workdir: str) -> str:
  """Copy a tokenizer file into the workdir (process 0); return the spec checkpoints record
  ('byte' or the copy's file name, relative to the workdir)."""
  if tokenizer.path is None:
    return tokenizer.spec
  import jax  # pylint: disable=import-outside-toplevel
  if isinstance(tokenizer, HFTokenizer):   # tokenizer.json with its config files, in hf_tokenizer/
    target = paths.join(workdir, HF_DIR)
    if jax.process_index() == 0 and paths.resolve(tokenizer.path) != paths.join(target, 'tokenizer.json'):
      copy_hf_tokenizer_files(paths.dirname(paths.resolve(tokenizer.path)), target)
      paths.copy(tokenizer.path, paths.join(target, 'tokenizer.json'))
    return f'{HF_DIR}/tokenizer.json'
  name = 'tokenizer.model'
  target = paths.join(workdir, name)
  if jax.process_index() == 0 and paths.resolve(tokenizer.path) != paths.resolve(target):
    paths.copy(tokenizer.path, target)
  return name


def copy_hf_tokenizer_files(source_dir: str, target_dir: str) -> list[str]:
  """Copy the Hugging Face tokenizer files of `source_dir` (tokenizer.json, configs, vocab) to `target_dir`."""
  if paths.resolve(source_dir) == paths.resolve(target_dir):
    return []
  present = [n for n in HF_TOKENIZER_FILES if paths.isfile(paths.join(source_dir, n))]
  paths.makedirs(target_dir)
  for name in present:
    paths.copy(paths.join(source_dir, name), paths.join(target_dir, name))
  return present


def check_vocab(tokenizer: Tokenizer, model_vocab_size: int) -> None:
  """The model's embedding must cover every token id."""
  if tokenizer.vocab_size > model_vocab_size:
    raise DataError(f'tokenizer {tokenizer.spec!r} has {tokenizer.vocab_size} tokens but '
                    f'model.vocab_size={model_vocab_size}: set model.vocab_size >= {tokenizer.vocab_size}')


def _lines_of_files(files: Sequence[str]) -> Iterator[str]:
  for path in files:
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
  paths.write_bytes(output, model.getvalue())
  return output

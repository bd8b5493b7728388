"""Tokenizers across the boundary, so that `AutoTokenizer` on an export gives fmjax's ids and back.

- Hugging Face `tokenizer.json` (GPT-2 byte-level BPE, Llama 3, Mistral): on import the HF tokenizer
  files are kept in the workdir's `hf_tokenizer/` and `hf_tokenizer/tokenizer.json` is the tokenizer
  (fmjax.data.tokenizers.HFTokenizer); a GPT-2 directory with only vocab.json + merges.txt gets the
  equivalent tokenizer.json (as transformers' GPT-2 converter builds it). On export they are copied back.
- SentencePiece `.model`: imported when there is no tokenizer.json; exported as `tokenizer.model` with a
  `tokenizer_config.json` for LlamaTokenizer (fmjax's pad/bos/eos/unk pieces), so HF encodes text the same.
- Byte tokenizer: exported as a `tokenizer.json` (a merge-free byte-level BPE: id = byte + 3, pad=0,
  bos=1, eos=2; bos added by the post-processor as fmjax adds it).
"""

from __future__ import annotations

import json
import os
import shutil

from fmjax.convert.mapping import ConversionError
from fmjax.data import tokenizers as fm_tokenizers

HF_FILES = fm_tokenizers.HF_TOKENIZER_FILES
KEPT_DIR = fm_tokenizers.HF_DIR

BYTE_NOTE = """## Tokenizer: fmjax bytes

This model reads UTF-8 bytes: token id = byte value + 3, with pad=0, bos=1, eos=2 (vocab 259).
`tokenizer.json` expresses it for `AutoTokenizer` (a byte-level BPE without merges; bos is added).
"""


def _need_tokenizers():
  try:
    import tokenizers  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise ConversionError('Hugging Face tokenizers need the tokenizers package: pip install "fmjax[hf]"') from None
  return tokenizers


def _write_json(path: str, record: dict) -> None:
  with open(path, 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=2, ensure_ascii=False)


# -- export ------------------------------------------------------------------------------------------

def byte_tokenizer_json(max_len: int):
  """(tokenizer.json text, tokenizer_config dict) equivalent to fmjax.data.tokenizers.ByteTokenizer."""
  tk = _need_tokenizers()
  tok = fm_tokenizers.ByteTokenizer()
  alphabet = _bytes_to_unicode()
  vocab = {'<pad>': tok.pad_id, '<s>': tok.bos_id, '</s>': tok.eos_id}
  vocab.update({alphabet[b]: b + tok.offset for b in range(256)})
  hf = tk.Tokenizer(tk.models.BPE(vocab=vocab, merges=[], fuse_unk=False))
  hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
  hf.decoder = tk.decoders.ByteLevel()
  hf.add_special_tokens(['<pad>', '<s>', '</s>'])
  hf.post_processor = tk.processors.TemplateProcessing(single='<s> $A', pair='<s> $A <s> $B',
                                                       special_tokens=[('<s>', tok.bos_id)])
  config = dict(tokenizer_class='PreTrainedTokenizerFast', bos_token='<s>', eos_token='</s>', pad_token='<pad>',
                model_max_length=max_len, clean_up_tokenization_spaces=False,
                split_special_tokens=True)   # '<s>' in a text is bytes, as fmjax reads it
  return hf.to_str(), config


def _bytes_to_unicode() -> dict:
  """GPT-2's byte -> printable character table (the ByteLevel alphabet)."""
  keep = [*range(ord('!'), ord('~') + 1), *range(ord('¡'), ord('¬') + 1), *range(ord('®'), ord('ÿ') + 1)]
  chars, n = keep[:], 0
  for b in range(256):
    if b not in keep:
      keep.append(b)
      chars.append(256 + n)
      n += 1
  return dict(zip(keep, map(chr, chars)))


def _export_sentencepiece(spec: str, out_dir: str, max_len: int) -> str:
  import sentencepiece as spm  # pylint: disable=import-outside-toplevel
  shutil.copyfile(spec, os.path.join(out_dir, 'tokenizer.model'))
  sp = spm.SentencePieceProcessor(model_file=spec)
  piece = lambda i: sp.IdToPiece(i) if i >= 0 else None
  special = dict(bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()), unk_token=piece(sp.unk_id()),
                 pad_token=piece(sp.pad_id()))
  config = dict(tokenizer_class='LlamaTokenizer', add_bos_token=True, add_eos_token=False, legacy=True,
                add_prefix_space=False, clean_up_tokenization_spaces=False, model_max_length=max_len,
                sp_model_kwargs={}, **special)
  _write_json(os.path.join(out_dir, 'tokenizer_config.json'), config)
  _write_json(os.path.join(out_dir, 'special_tokens_map.json'), {k: v for k, v in special.items() if v})
  return (f'## Tokenizer\n\nfmjax SentencePiece model ({sp.GetPieceSize()} pieces) as `tokenizer.model` for '
          'LlamaTokenizer; bos is added, eos is not.\n')


def export_tokenizer(spec: str | None, workdir: str, out_dir: str, max_len: int) -> str:
  """Write HF tokenizer files for `spec` ('byte', a workdir-relative or absolute path); returns a README section."""
  path = None if spec in (None, 'byte') else (spec if os.path.isabs(spec) else os.path.join(workdir, spec))
  kept = os.path.join(workdir, KEPT_DIR)
  if path and (isinstance(fm_tokenizers.load_tokenizer(path), fm_tokenizers.HFTokenizer) or os.path.isdir(kept)):
    folder = os.path.dirname(path) if path.endswith('.json') else kept   # HF files, as imported (or placed)
    fm_tokenizers.copy_hf_tokenizer_files(folder, out_dir)
    if path.endswith('.json'):
      shutil.copyfile(path, os.path.join(out_dir, 'tokenizer.json'))
    return '## Tokenizer\n\nThe Hugging Face tokenizer files of the checkpoint, unchanged.\n'
  if spec is None:
    return '## Tokenizer\n\nThe checkpoint records no tokenizer; none was written.\n'
  if spec == 'byte':
    text, config = byte_tokenizer_json(max_len)
    with open(os.path.join(out_dir, 'tokenizer.json'), 'w', encoding='utf-8') as f:
      f.write(text)
    _write_json(os.path.join(out_dir, 'tokenizer_config.json'), config)
    return BYTE_NOTE
  if isinstance(fm_tokenizers.load_tokenizer(path), fm_tokenizers.CharTokenizer):
    return '## Tokenizer\n\nfmjax char tokenizer: no Hugging Face equivalent was written.\n'
  return _export_sentencepiece(path, out_dir, max_len)


def special_token_ids(spec: str | None, workdir: str) -> dict:
  """{'bos_token_id', 'eos_token_id', 'pad_token_id'} of the checkpoint's tokenizer (byte's when unknown)."""
  if spec is None:
    return {}
  try:
    tok = fm_tokenizers.ByteTokenizer() if spec == 'byte' else fm_tokenizers.load_tokenizer(
        spec if os.path.isabs(spec) else os.path.join(workdir, spec))
  except fm_tokenizers.DataError:
    return {}
  return dict(bos_token_id=int(tok.bos_id), eos_token_id=int(tok.eos_id), pad_token_id=int(tok.pad_id))


# -- import ------------------------------------------------------------------------------------------

def _gpt2_tokenizer_json(hf_dir: str, hf_config: dict, target_dir: str) -> None:
  """tokenizer.json (+ tokenizer_config.json if missing) from GPT-2's vocab.json + merges.txt."""
  tk = _need_tokenizers()
  try:
    bpe = tk.models.BPE.from_file(os.path.join(hf_dir, 'vocab.json'), os.path.join(hf_dir, 'merges.txt'))
  except Exception as e:  # noqa: BLE001 - the library's parse error becomes one line
    raise ConversionError(f'{hf_dir}: vocab.json / merges.txt cannot be read as a BPE ({str(e).splitlines()[0]})') \
        from None
  hf = tk.Tokenizer(bpe)
  hf.pre_tokenizer = tk.pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = tk.decoders.ByteLevel()
  hf.post_processor = tk.processors.ByteLevel(trim_offsets=False)
  config_path = os.path.join(target_dir, 'tokenizer_config.json')
  names = fm_tokenizers._hf_special_names(target_dir)  # pylint: disable=protected-access
  for kind in ('bos', 'eos', 'pad'):
    token_id = hf_config.get(f'{kind}_token_id')
    if kind not in names and isinstance(token_id, int) and hf.id_to_token(token_id) is not None:
      names[kind] = hf.id_to_token(token_id)
  if 'eos' not in names and hf.token_to_id('<|endoftext|>') is not None:
    names.update(bos='<|endoftext|>', eos='<|endoftext|>')
  hf.add_special_tokens(sorted(set(names.values())))
  hf.save(os.path.join(target_dir, 'tokenizer.json'))
  if not os.path.isfile(config_path):
    _write_json(config_path, dict(tokenizer_class='GPT2Tokenizer', add_prefix_space=False,
                                  model_max_length=hf_config.get('n_positions', 1024),
                                  **{f'{k}_token': v for k, v in names.items()},
                                  unk_token=names.get('eos')))


def import_tokenizer(hf_dir: str, workdir: str, hf_config: dict | None = None) -> str | None:
  """Keep the HF tokenizer files in workdir/hf_tokenizer/; return the fmjax tokenizer spec or None.

  tokenizer.json (or vocab.json + merges.txt) -> 'hf_tokenizer/tokenizer.json'; else a SentencePiece
  tokenizer.model -> 'tokenizer.model'.
  """
  kept = os.path.join(workdir, KEPT_DIR)
  present = fm_tokenizers.copy_hf_tokenizer_files(hf_dir, kept)
  if not present:
    return None
  if 'tokenizer.json' not in present and {'vocab.json', 'merges.txt'} <= set(present):
    _gpt2_tokenizer_json(hf_dir, hf_config or {}, kept)
    present.append('tokenizer.json')
  if 'tokenizer.json' in present:
    fm_tokenizers.HFTokenizer(os.path.join(kept, 'tokenizer.json'))  # loads, or a one-line DataError
    return f'{KEPT_DIR}/tokenizer.json'
  if 'tokenizer.model' in present:
    shutil.copyfile(os.path.join(hf_dir, 'tokenizer.model'), os.path.join(workdir, 'tokenizer.model'))
    return 'tokenizer.model'
  return None

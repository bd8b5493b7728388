"""Tokenizers across the boundary: fmjax SentencePiece -> LlamaTokenizer files, HF files kept on import.

- SentencePiece `.model`: copied as `tokenizer.model` with a `tokenizer_config.json` for LlamaTokenizer
  (no dummy prefix, fmjax's pad/bos/eos/unk pieces), so HF encodes text to the same ids.
- Byte tokenizer: HF has no equivalent (ByT5 puts eos at id 1); the export's README.md says how to
  encode (UTF-8 bytes + 3; pad=0, bos=1, eos=2) and config.json carries those ids.
- On import, a HF `tokenizer.model` becomes the workdir's tokenizer; every tokenizer file is also kept
  in `hf_tokenizer/` so that a later export writes the original files back unchanged.
"""

from __future__ import annotations

import json
import os
import shutil

import sentencepiece as spm

HF_FILES = ('tokenizer.model', 'tokenizer.json', 'tokenizer_config.json', 'special_tokens_map.json',
            'vocab.json', 'merges.txt', 'added_tokens.json')
KEPT_DIR = 'hf_tokenizer'

BYTE_NOTE = """## Tokenizer: fmjax bytes

This model reads UTF-8 bytes: token id = byte value + 3, with pad=0, bos=1, eos=2 (vocab 259).
No Hugging Face tokenizer class matches this exactly (ByT5 uses eos=1), so none is written. Encode with

    ids = [1] + [b + 3 for b in text.encode('utf-8')]            # bos + bytes
    text = bytes(i - 3 for i in ids if 3 <= i < 259).decode('utf-8', errors='replace')
"""


def export_tokenizer(spec: str | None, workdir: str, out_dir: str, max_len: int) -> str:
  """Write HF tokenizer files for `spec`; returns a README section."""
  kept = os.path.join(workdir, KEPT_DIR)
  if os.path.isdir(kept):
    for name in os.listdir(kept):
      shutil.copyfile(os.path.join(kept, name), os.path.join(out_dir, name))
    return '## Tokenizer\n\nThe Hugging Face tokenizer files this model was imported with, unchanged.\n'
  if spec is None:
    return '## Tokenizer\n\nThe checkpoint records no tokenizer; none was written.\n'
  if spec == 'byte':
    return BYTE_NOTE
  shutil.copyfile(spec, os.path.join(out_dir, 'tokenizer.model'))
  sp = spm.SentencePieceProcessor(model_file=spec)
  piece = lambda i: sp.IdToPiece(i) if i >= 0 else None
  special = dict(bos_token=piece(sp.bos_id()), eos_token=piece(sp.eos_id()), unk_token=piece(sp.unk_id()),
                 pad_token=piece(sp.pad_id()))
  config = dict(tokenizer_class='LlamaTokenizer', add_bos_token=True, add_eos_token=False, legacy=True,
                add_prefix_space=False, clean_up_tokenization_spaces=False, model_max_length=max_len,
                sp_model_kwargs={}, **special)
  with open(os.path.join(out_dir, 'tokenizer_config.json'), 'w') as f:
    json.dump(config, f, indent=2)
  with open(os.path.join(out_dir, 'special_tokens_map.json'), 'w') as f:
    json.dump({k: v for k, v in special.items() if v}, f, indent=2)
  return (f'## Tokenizer\n\nfmjax SentencePiece model ({sp.GetPieceSize()} pieces) as `tokenizer.model` for '
          'LlamaTokenizer; bos is added, eos is not.\n')


def import_tokenizer(hf_dir: str, workdir: str) -> str | None:
  """Keep the HF tokenizer files; return the fmjax tokenizer spec (a workdir-relative .model) or None."""
  present = [n for n in HF_FILES if os.path.isfile(os.path.join(hf_dir, n))]
  if present:
    os.makedirs(os.path.join(workdir, KEPT_DIR), exist_ok=True)
    for name in present:
      shutil.copyfile(os.path.join(hf_dir, name), os.path.join(workdir, KEPT_DIR, name))
  if 'tokenizer.model' in present:
    shutil.copyfile(os.path.join(hf_dir, 'tokenizer.model'), os.path.join(workdir, 'tokenizer.model'))
    return 'tokenizer.model'
  return None

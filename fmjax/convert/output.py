"""Output directories of conversions: never clobbered, never half-written.

A conversion writes into a fresh sibling directory `OUT.partial-<pid>` and renames it to OUT only
when everything (including --verify) succeeded. A non-empty OUT is refused unless `overwrite`, which
replaces it as a whole: only the new files remain. Files get the umask's mode (`as_created`).
"""

from __future__ import annotations

import contextlib
import os
import shutil

from fmjax.convert.mapping import ConversionError


def check_writable(out_dir: str, overwrite: bool, flag: str = '--out') -> str:
  """The absolute output path; a non-empty directory (or a file) there is an error unless `overwrite`."""
  out = os.path.abspath(os.path.expanduser(out_dir))
  if os.path.isfile(out):
    raise ConversionError(f'{flag} {out} is a file; pass a directory')
  if os.path.isdir(out) and os.listdir(out) and not overwrite:
    raise ConversionError(f'{flag} {out} is not empty ({len(os.listdir(out))} entries): choose a new directory or '
                          'pass --overwrite (which replaces its contents)')
  return out


def as_created(path: str) -> None:
  """Give a file written with a private mode the mode `open()` gives new files: 0666 less the umask.

  safetensors creates its files 0600; an exported model directory is meant to be read by others
  (0644 under the usual umask 022), like its config.json and tokenizer files.
  """
  mask = os.umask(0)
  os.umask(mask)
  os.chmod(path, 0o666 & ~mask)


@contextlib.contextmanager
def staged(out_dir: str, overwrite: bool, protect: tuple = ()):
  """Yield a fresh directory to write into; on success it becomes `out_dir`, on any error it is removed.

  `protect`: paths the output must not contain or be inside of (the conversion's own input).
  """
  out = check_writable(out_dir, overwrite)
  for path in protect:
    path = os.path.abspath(path)
    if out == path or path.startswith(out + os.sep) or out.startswith(path + os.sep):
      raise ConversionError(f'--out {out} overlaps the input {path}; choose another directory')
  os.makedirs(os.path.dirname(out) or '.', exist_ok=True)
  tmp = f'{out}.partial-{os.getpid()}'
  shutil.rmtree(tmp, ignore_errors=True)
  os.makedirs(tmp)
  try:
    yield tmp
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  if os.path.isdir(out):
    shutil.rmtree(out)
  os.replace(tmp, out)

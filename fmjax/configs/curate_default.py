"""Curation of prose (web text, books): datatrove's Gopher and FineWeb quality filters at their
published thresholds, exact + MinHash dedup, e-mail/IP redaction. Offline; nothing downloaded.

  python -m fmjax.curate --config configs/curate_default.py --config.input='raw/*.jsonl.gz' --config.output=OUT
Decontaminate against eval files with --config.decontaminate.eval_files='evals/*.txt'.
"""

from fmjax.curate.schema import curate_defaults


def get_config():
  cfg = curate_defaults()
  cfg.preset = 'text'
  return cfg

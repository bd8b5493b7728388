"""Curation of source code: quality thresholds that keep real code (measured on CPython's standard
library: 2 of 1758 modules removed) yet drop repetition, symbol soup and one-word-per-line junk.

  python -m fmjax.curate --config configs/curate_code.py --config.input='src/**/*.py' --config.output=OUT
Prose checks that code fails by nature are off (0 = off): terminal punctuation, stop words,
'#' per word (comments), short lines, the most common n-gram's share.
"""

import os

from fmjax.config import load_config_file


def get_config():
  cfg = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'curate_default.py'))
  cfg.preset = 'code'
  cfg.near_dedup.threshold = 0.5  # code near-copies (renamed identifiers) sit lower than prose: 3% of words changed ~ 0.75
  q = cfg.quality
  q.gopher_repetition.update(dict(dup_line_frac=0.8, dup_para_frac=0.6, dup_line_char_frac=0.75,
                                  dup_para_char_frac=0.5, top_ngrams=(), dup_ngrams=((10, 0.6),)))
  q.gopher_quality.update(dict(min_doc_words=0, max_doc_words=0, min_avg_word_length=2.0, max_avg_word_length=20.0,
                               max_symbol_word_ratio=0.0, min_alpha_words_ratio=0.1, min_stop_words=0))
  q.fineweb.update(dict(line_punct_thr=0.0, short_line_thr=0.0, char_duplicates_ratio=0.0, new_line_ratio=0.75))
  return cfg

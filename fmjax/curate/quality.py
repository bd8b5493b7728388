"""The quality filters of a curation config, as datatrove blocks (Gopher, FineWeb, C4, fastText language ID).

A threshold of 0 turns that check off. The one block that needs a download (language ID) is
checked before anything runs: turned on without its model, it is a one-line error naming the file.
"""

from __future__ import annotations

import importlib.util
import os
import warnings
from typing import Callable

import ml_collections
from datatrove.pipeline.filters import C4QualityFilter, FineWebQualityFilter, GopherQualityFilter
from datatrove.pipeline.filters import GopherRepetitionFilter
from datatrove.pipeline.filters.base_filter import BaseFilter
from datatrove.utils.lid import FT176LID

from fmjax.curate.words import WORD_TOKENIZER
from fmjax.errors import UserError

LID_URL = 'https://dl.fbaipublicfiles.com/fasttext/supervised-models/lid.176.bin'
_NEVER = float('inf')


class MissingModelError(UserError):
  """An optional block was turned on without the model or package it needs."""


def _or(value: float, off: float | None):
  """`off` (a value that never triggers) for a threshold of 0, else the threshold."""
  return off if not value else value


def check_language_model(lang: ml_collections.ConfigDict) -> None:
  """One line naming what to fetch when language ID is on but its model or package is missing."""
  if not lang.model_path or not os.path.isfile(os.path.expanduser(lang.model_path)):
    where = f' ({lang.model_path} does not exist)' if lang.model_path else ''
    raise MissingModelError(f'quality.language needs the fastText language-ID model{where}: download {LID_URL} '
                            'and pass --config.quality.language.model_path=PATH (or turn it off)')
  missing = [m for m, pkg in (('fasttext', 'fasttext-numpy2-wheel'), ('fasteners', 'fasteners'))
             if importlib.util.find_spec(m) is None]
  if missing:
    raise MissingModelError(f'quality.language needs {" and ".join(missing)}: pip install fasttext-numpy2-wheel fasteners')


class GopherQualityFilterQuiet(GopherQualityFilter):
  """GopherQualityFilter without numpy's 'mean of empty slice' warning on documents with no words."""

  def filter(self, doc):
    with warnings.catch_warnings():
      warnings.simplefilter('ignore', RuntimeWarning)
      return super().filter(doc)


class LocalFT176LID(FT176LID):
  """fastText lid.176 loaded from a local path instead of datatrove's download cache."""

  def __init__(self, languages, path: str):
    super().__init__(languages)
    self.path = path

  @property
  def model(self):
    if self._model is None:
      from fasttext.FastText import _FastText  # pylint: disable=import-outside-toplevel
      self._model = _FastText(self.path)
    return self._model


def _language_filter(lang: ml_collections.ConfigDict, exclusion_writer) -> BaseFilter:
  """datatrove's LanguageFilter reading the local model file."""
  from datatrove.pipeline.filters import LanguageFilter  # pylint: disable=import-outside-toplevel
  block = LanguageFilter(languages=list(lang.languages), language_threshold=lang.min_score,
                         exclusion_writer=exclusion_writer)
  block.model = LocalFT176LID(list(lang.languages), os.path.expanduser(lang.model_path))
  return block


def quality_filters(q: ml_collections.ConfigDict, exclusion_writer: Callable[[str], object]) -> list[tuple[str, BaseFilter]]:
  """(name, block) for each enabled quality filter, in pipeline order; `exclusion_writer(name)` keeps removals."""
  blocks = []
  if q.language.enabled:
    blocks.append(('language', _language_filter(q.language, exclusion_writer('language'))))
  r = q.gopher_repetition
  if r.enabled:
    blocks.append(('gopher_repetition', GopherRepetitionFilter(
        dup_line_frac=r.dup_line_frac, dup_para_frac=r.dup_para_frac, dup_line_char_frac=r.dup_line_char_frac,
        dup_para_char_frac=r.dup_para_char_frac,
        top_n_grams=tuple((int(n), f) for n, f in r.top_ngrams if f),
        dup_n_grams=tuple((int(n), f) for n, f in r.dup_ngrams if f),
        exclusion_writer=exclusion_writer('gopher_repetition'), language=WORD_TOKENIZER)))
  g = q.gopher_quality
  if g.enabled:
    blocks.append(('gopher_quality', GopherQualityFilterQuiet(
        min_doc_words=g.min_doc_words, max_doc_words=g.max_doc_words, min_avg_word_length=g.min_avg_word_length,
        max_avg_word_length=g.max_avg_word_length, max_symbol_word_ratio=g.max_symbol_word_ratio,
        max_bullet_lines_ratio=g.max_bullet_lines_ratio, max_ellipsis_lines_ratio=g.max_ellipsis_lines_ratio,
        max_non_alpha_words_ratio=g.min_alpha_words_ratio, min_stop_words=g.min_stop_words,
        exclusion_writer=exclusion_writer('gopher_quality'), language=WORD_TOKENIZER)))
  f = q.fineweb
  if f.enabled:
    blocks.append(('fineweb', FineWebQualityFilter(
        line_punct_thr=f.line_punct_thr, short_line_thr=_or(f.short_line_thr, _NEVER),
        short_line_length=f.short_line_length, char_duplicates_ratio=_or(f.char_duplicates_ratio, _NEVER),
        new_line_ratio=_or(f.new_line_ratio, _NEVER), exclusion_writer=exclusion_writer('fineweb'),
        language=WORD_TOKENIZER)))
  c = q.c4
  if c.enabled:
    blocks.append(('c4', C4QualityFilter(
        filter_no_terminal_punct=c.filter_no_terminal_punct, min_num_sentences=c.min_num_sentences or -1,
        min_words_per_line=c.min_words_per_line or -1, max_word_length=c.max_word_length or -1,
        filter_lorem_ipsum=c.filter_lorem_ipsum, filter_javascript=c.filter_javascript,
        filter_curly_bracket=c.filter_curly_bracket, filter_policy=c.filter_policy,
        exclusion_writer=exclusion_writer('c4'), language=WORD_TOKENIZER)))
  return blocks

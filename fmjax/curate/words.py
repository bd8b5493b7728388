"""An offline word tokenizer for datatrove's blocks.

datatrove's English tokenizer is spaCy (an extra ~100 MB install); its filters and dedup blocks
accept any `WordTokenizer` in place of a language code, so fmjax passes this regex one: words
(letters/digits/underscore, with inner apostrophes) and single punctuation marks, like spaCy's
blank English tokenizer on ordinary text.
"""

from __future__ import annotations

import re

from datatrove.utils.word_tokenizers import WhitespaceTokenizer

_WORD = re.compile(r"\w+(?:['\u2019]\w+)*|[^\w\s]")


class RegexWordTokenizer(WhitespaceTokenizer):
  """Words and punctuation marks by regex; sentences by datatrove's terminal-punctuation regex."""

  def word_tokenize(self, text: str) -> list[str]:
    return _WORD.findall(text)

  def __eq__(self, other):
    return type(other) is type(self)

  def __hash__(self):
    return hash(type(self).__name__)


WORD_TOKENIZER = RegexWordTokenizer()

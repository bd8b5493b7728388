"""fmjax's offline lm-eval tasks: sanity tasks over held-out standard-library files, not benchmarks.

    fmjax_stdlib_next_line      multiple choice: the real next line of code among four (acc, acc_norm)
    fmjax_stdlib_last_word      LAMBADA-style cloze of a line's last identifier, by log-likelihood (acc, perplexity)
    fmjax_stdlib_last_word_gen  the same cloze, generated until a stop string (exact_match)
    fmjax_stdlib_perplexity     rolling log-likelihood of each held-out file's opening (bits_per_byte, ...)
    fmjax_sanity                the tag of all four

They need no download: the documents come from the interpreter's standard library, the files that
fmjax's default corpus holds out for validation (see stdlib_tasks.py), written as JSONL into a cache
directory at first use. `TASKS_DIR` is this folder, for lm-eval's include_path.
"""

from __future__ import annotations

import os

TASKS_DIR = os.path.dirname(os.path.abspath(__file__))
SANITY_TAG = 'fmjax_sanity'
TASK_NAMES = ('fmjax_stdlib_next_line', 'fmjax_stdlib_last_word', 'fmjax_stdlib_last_word_gen',
              'fmjax_stdlib_perplexity')

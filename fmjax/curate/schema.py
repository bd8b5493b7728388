"""The curation config: every option of `python -m fmjax.curate`, declared once in `curate_defaults()`.

Config files (configs/curate_default.py, configs/curate_code.py) start from it and change values;
`--config.a.b=c` flags change them again. Loading, overrides and unknown-key errors reuse
fmjax.config. A threshold of 0 turns that one check off (datatrove's convention for "None").
"""

from __future__ import annotations

import os

import ml_collections

from fmjax import config as config_lib
from fmjax.config import ConfigError


def quality_defaults() -> ml_collections.ConfigDict:
  """Heuristic quality filters (datatrove's Gopher / FineWeb / C4 blocks); thresholds as in their papers."""
  return ml_collections.ConfigDict(dict(
      gopher_repetition=ml_collections.ConfigDict(dict(
          enabled=True,
          dup_line_frac=0.3,       # share of lines that repeat an earlier line
          dup_para_frac=0.3,       # share of paragraphs that repeat an earlier one
          dup_line_char_frac=0.2,  # share of characters in repeated lines
          dup_para_char_frac=0.2,  # share of characters in repeated paragraphs
          top_ngrams=((2, 0.2), (3, 0.18), (4, 0.16)),  # (n, max character share of the most common n-gram)
          dup_ngrams=((5, 0.15), (6, 0.14), (7, 0.13), (8, 0.12), (9, 0.11), (10, 0.10)),  # (n, max share repeated)
      )),
      gopher_quality=ml_collections.ConfigDict(dict(
          enabled=True,
          min_doc_words=50,
          max_doc_words=100000,
          min_avg_word_length=3.0,
          max_avg_word_length=10.0,
          max_symbol_word_ratio=0.1,     # '#' or '...' per word
          max_bullet_lines_ratio=0.9,
          max_ellipsis_lines_ratio=0.3,
          min_alpha_words_ratio=0.8,     # share of words holding a letter (datatrove: max_non_alpha_words_ratio)
          min_stop_words=2,              # of: the be to of and that have with
      )),
      fineweb=ml_collections.ConfigDict(dict(
          enabled=True,
          line_punct_thr=0.12,           # min share of lines ending in terminal punctuation
          short_line_thr=0.67,           # max share of lines of <= short_line_length characters
          short_line_length=30,
          char_duplicates_ratio=0.01,    # max share of characters in duplicated lines
          new_line_ratio=0.3,            # max newlines per word (one-word lines)
      )),
      c4=ml_collections.ConfigDict(dict(
          enabled=False,                 # rewrites documents line by line (drops lines without end punctuation)
          filter_no_terminal_punct=True,
          min_num_sentences=5,
          min_words_per_line=3,
          max_word_length=1000,
          filter_lorem_ipsum=True,
          filter_javascript=True,
          filter_curly_bracket=True,
          filter_policy=True,
      )),
      language=ml_collections.ConfigDict(dict(
          enabled=False,                 # needs the fastText lid.176.bin model (a download) and `fasttext`
          model_path='',                 # local path of lid.176.bin
          languages=('en',),
          min_score=0.65,
      )),
  ))


def curate_defaults() -> ml_collections.ConfigDict:
  """The full schema with defaults. Curation config files start here."""
  return ml_collections.ConfigDict(dict(
      input='',                  # glob of raw documents: text files (one document each), .jsonl (`jsonl_field`), plain or .gz
      input_format='auto',       # auto (.jsonl/.jsonl.gz/.json -> jsonl, anything else -> text) | text | jsonl
      jsonl_field='text',
      output='',                 # directory of the curated shards OUT/*.jsonl.gz and the report
      tokenizer='byte',          # for the token counts of the report: byte | a tokenizer file (as data.tokenizer)
      preset='text',             # a label recorded in the report: text | code
      executor='local',          # local | slurm
      tasks=4,                   # shards of the input (one task each); also the number of output shards
      workers=0,                 # local worker processes (0 = min(tasks, CPUs))
      shard_max_mb=0,            # > 0: split each output shard at this many MB
      keep_removed=True,         # keep removed documents (OUT/.curate/removed/) for audits and report examples
      exact_dedup=ml_collections.ConfigDict(dict(enabled=True)),
      near_dedup=ml_collections.ConfigDict(dict(
          enabled=True,
          threshold=0.7,           # Jaccard similarity of word n-gram sets counted as a near-duplicate
          ngram_size=5,            # words per shingle
          num_hashes=112,          # MinHash permutations (bands x rows <= num_hashes)
          bands=0,                 # LSH bands; 0 = chosen from threshold (fewest false positives + negatives)
          seed=1,
      )),
      quality=quality_defaults(),
      pii=ml_collections.ConfigDict(dict(
          enabled=True,
          emails=True,
          ips=True,
          only_public_ips=False,   # true: also keep private/link-local/documentation addresses (10.x, 192.168.x,
                                   # fe80::); loopback/unspecified (127.0.0.1, 0.0.0.0, ::1) are always kept
          email_placeholder='<EMAIL>',
          ip_placeholder='<IP_ADDRESS>',
      )),
      decontaminate=ml_collections.ConfigDict(dict(
          eval_files='',           # glob of evaluation texts (text or .jsonl); '' = off
          ngram_size=13,           # words per n-gram shared with an eval file that marks a document
          min_matches=1,           # remove a document sharing at least this many n-grams
      )),
      slurm=ml_collections.ConfigDict(dict(
          partition='',
          time='04:00:00',
          cpus_per_task=1,
          mem_per_cpu_gb=2,
          qos='',
          job_name='fmjax-curate',
          env_command='',          # shell line that activates the environment ('' = this virtualenv)
          max_array_size=1001,
      )),
  ))


_CHOICES = {'input_format': ('auto', 'text', 'jsonl'), 'preset': ('text', 'code'), 'executor': ('local', 'slurm')}


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Choices and ranges that types alone cannot check."""
  for key, choices in _CHOICES.items():
    if cfg[key] not in choices:
      raise ConfigError(f'{key}={cfg[key]!r} is not one of {", ".join(choices)}')
  if not cfg.input:
    raise ConfigError('no input: pass --config.input=GLOB (text files and/or .jsonl[.gz])')
  if not cfg.output:
    raise ConfigError('no output directory: pass --config.output=DIR')
  if cfg.tasks <= 0 or cfg.workers < 0:
    raise ConfigError(f'tasks must be > 0 and workers >= 0, got tasks={cfg.tasks} workers={cfg.workers}')
  nd = cfg.near_dedup
  if not 0 < nd.threshold < 1:
    raise ConfigError(f'near_dedup.threshold must be in (0, 1), got {nd.threshold}')
  if nd.ngram_size <= 0 or nd.num_hashes <= 0 or nd.bands < 0 or nd.bands > nd.num_hashes:
    raise ConfigError('near_dedup: ngram_size and num_hashes must be > 0 and 0 <= bands <= num_hashes')
  if cfg.decontaminate.ngram_size <= 0 or cfg.decontaminate.min_matches <= 0:
    raise ConfigError('decontaminate.ngram_size and decontaminate.min_matches must be > 0')
  if cfg.tokenizer != 'byte' and not os.path.isfile(os.path.expanduser(cfg.tokenizer)):
    raise ConfigError(f"tokenizer {cfg.tokenizer!r} not found: 'byte' or the path of a tokenizer file "
                      '(as data.tokenizer of the training config)')
  if cfg.executor == 'slurm' and not cfg.slurm.partition:
    raise ConfigError('executor=slurm needs a partition: pass --config.slurm.partition=NAME')
  cfg.output = os.path.abspath(os.path.expanduser(cfg.output))
  return cfg


def resolve(path: str, overrides) -> ml_collections.ConfigDict:
  """Load a curation config file, check it against the schema, apply overrides and validate."""
  cfg = config_lib.load_config_file(path)
  config_lib.check_schema(cfg, curate_defaults())
  return validate(config_lib.apply_overrides(cfg, overrides))

"""A curation config -> the datatrove stages that run it, in order.

Stages (each a datatrove executor; its `completions/` make every stage resumable per task):
  decont_index   1 task    n-gram index of the eval files                      (if eval files)
  filter         N tasks   read -> blank/quality/decontamination filters -> shard -> exact-dedup signatures
  exact_find     1 task    find exact duplicates among all signatures          (if exact dedup)
  exact_filter   N tasks   drop exact duplicates -> shard -> MinHash signatures (if any dedup)
  near_buckets   B tasks   LSH: one task per band finds colliding pairs        (if near dedup)
  near_cluster   1 task    union-find of the pairs: one document kept per cluster
  finish         N tasks   drop near duplicates -> PII redaction -> OUT/*.jsonl.gz
Every filter keeps what it removed (OUT/.curate/removed/<block>/) for the report's examples.
"""

from __future__ import annotations

import dataclasses
import os

import ml_collections
from datatrove.pipeline.dedup import ExactDedupConfig, ExactDedupFilter, ExactDedupSignature, ExactFindDedups
from datatrove.pipeline.dedup import MinhashConfig, MinhashDedupBuckets, MinhashDedupCluster
from datatrove.pipeline.dedup import MinhashDedupFilter, MinhashDedupSignature
from datatrove.pipeline.decont.n_grams import NGramsDecontConfig
from datatrove.pipeline.readers import JsonlReader
from datatrove.pipeline.writers import JsonlWriter

from fmjax.curate import blocks, decont, quality
from fmjax.curate.words import WORD_TOKENIZER

WORK = '.curate'  # the working directory inside OUT: inputs list, intermediate shards, logs, removed documents


@dataclasses.dataclass
class Stage:
  """One datatrove run: `pipeline` on `tasks` tasks."""
  name: str
  pipeline: list
  tasks: int


def work_dir(cfg: ml_collections.ConfigDict, *parts: str) -> str:
  return os.path.join(cfg.output, WORK, *parts)


def lsh_bands(threshold: float, num_hashes: int) -> tuple[int, int]:
  """(bands, rows), bands * rows <= num_hashes, whose LSH S-curve 1-(1-s^r)^b crosses 50% closest to
  `threshold`: pairs more similar than the threshold are likely found, less similar ones likely not."""
  def midpoint(bands: int, rows: int) -> float:
    return (1 - 0.5 ** (1 / bands)) ** (1 / rows)
  splits = [(b, num_hashes // b) for b in range(1, num_hashes + 1)]
  return min(splits, key=lambda br: (abs(midpoint(*br) - threshold), -br[0] * br[1]))


def minhash_config(nd: ml_collections.ConfigDict) -> MinhashConfig:
  if nd.bands:
    bands, rows = nd.bands, nd.num_hashes // nd.bands
  else:
    bands, rows = lsh_bands(nd.threshold, nd.num_hashes)
  return MinhashConfig(n_grams=nd.ngram_size, num_buckets=bands, hashes_per_bucket=rows, seed=nd.seed)


def _exact_config() -> ExactDedupConfig:
  return ExactDedupConfig(content_getter=_document_text)


def _document_text(doc) -> str:
  return doc.text


def _lean_output(self, document) -> dict:  # pylint: disable=unused-argument
  """What the curated shards hold per line: the text (what fmjax.train reads) and the document id."""
  return {'text': document.text, 'id': document.id}


def _readers(cfg: ml_collections.ConfigDict, inputs: dict) -> list:
  """Readers of the raw inputs, from the frozen lists written at the first run (inputs.root, .text, .jsonl)."""
  readers = []
  if inputs['text']:
    readers.append(blocks.TextFileReader(inputs['root'], paths_file=work_dir(cfg, 'inputs', 'text.txt')))
  if inputs['jsonl']:
    readers.append(JsonlReader(inputs['root'], paths_file=work_dir(cfg, 'inputs', 'jsonl.txt'),
                               text_key=cfg.jsonl_field))
  return readers


def build_stages(cfg: ml_collections.ConfigDict, inputs: dict, eval_paths: list[str]) -> list[Stage]:
  """The stages of a resolved config; `inputs` from `fmjax.curate.inputs.freeze`."""
  tok, tasks = cfg.tokenizer, cfg.tasks

  def removed(block: str):
    if not cfg.keep_removed:
      return None
    return JsonlWriter(work_dir(cfg, 'removed', block), output_filename='${rank}.jsonl.gz')

  def shard_writer(folder: str):
    return JsonlWriter(work_dir(cfg, 'shards', folder), output_filename='${rank}.jsonl.gz')

  stages = []
  first = _readers(cfg, inputs) + [blocks.Measure('input', tok), blocks.BlankFilter(removed('blank')),
                                   blocks.Measure('after blank', tok)]
  for name, block in quality.quality_filters(cfg.quality, removed):
    first += [block, blocks.Measure(f'after {name}', tok)]
  if eval_paths:
    dc = NGramsDecontConfig(n_grams=cfg.decontaminate.ngram_size)
    stages.append(Stage('decont_index', [decont.DecontIndexer(eval_paths, work_dir(cfg, 'decont', 'index'), dc,
                                                              cfg.jsonl_field)], 1))
    first += [decont.OverlapDecontFilter(work_dir(cfg, 'decont', 'index'), work_dir(cfg, 'decont', 'matched'), dc,
                                         cfg.decontaminate.min_matches, removed('decontaminate')),
              blocks.Measure('after decontaminate', tok)]
  first.append(shard_writer('filtered'))
  exact, near = cfg.exact_dedup.enabled, cfg.near_dedup.enabled
  if exact:
    first.append(ExactDedupSignature(work_dir(cfg, 'exact', 'sigs'), _exact_config()))
  stages.append(Stage('filter', first, tasks))
  source = 'filtered'
  if exact or near:
    middle = [blocks.RankShardReader(work_dir(cfg, 'shards', 'filtered'))]
    if exact:
      stages.append(Stage('exact_find', [ExactFindDedups(work_dir(cfg, 'exact', 'sigs'), work_dir(cfg, 'exact', 'dups'),
                                                         _exact_config())], 1))
      middle += [ExactDedupFilter(work_dir(cfg, 'exact', 'dups'), _exact_config(), removed('exact_dedup')),
                 blocks.Measure('after exact_dedup', tok, cluster_key='duplicate_count')]
    middle.append(shard_writer('deduped'))
    source = 'deduped'
    if near:
      mh = minhash_config(cfg.near_dedup)
      middle.append(MinhashDedupSignature(work_dir(cfg, 'minhash', 'sigs'), mh, language=WORD_TOKENIZER))
    stages.append(Stage('exact_filter', middle, tasks))
    if near:
      stages.append(Stage('near_buckets', [MinhashDedupBuckets(work_dir(cfg, 'minhash', 'sigs'),
                                                               work_dir(cfg, 'minhash', 'buckets'), config=mh)],
                          mh.num_buckets))
      stages.append(Stage('near_cluster', [MinhashDedupCluster(work_dir(cfg, 'minhash', 'buckets'),
                                                               work_dir(cfg, 'minhash', 'remove'), config=mh,
                                                               save_cluster_size=True)], 1))
  last = [blocks.RankShardReader(work_dir(cfg, 'shards', source))]
  if near:
    last += [MinhashDedupFilter(work_dir(cfg, 'minhash', 'remove'), exclusion_writer=removed('near_dedup')),
             blocks.Measure('after near_dedup', tok)]
  if cfg.pii.enabled:
    p = cfg.pii
    last += [blocks.CountingPIIFormatter(remove_emails=p.emails, remove_ips=p.ips,
                                         only_remove_public_ips=p.only_public_ips,
                                         email_placeholder=p.email_placeholder, ip_placeholder=p.ip_placeholder),
             blocks.Measure('after pii', tok)]
  last += [blocks.Measure('output', tok),
           JsonlWriter(cfg.output, output_filename='${rank}.jsonl.gz', adapter=_lean_output,
                       max_file_size=int(cfg.shard_max_mb * 2**20) if cfg.shard_max_mb > 0 else -1)]
  stages.append(Stage('finish', last, tasks))
  return stages

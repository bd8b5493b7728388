"""The data report of a curation: OUT/report.json, OUT/length_histogram.png and a console summary.

Everything is read back from disk (datatrove's per-task stats, removed documents, cluster
files), so a resumed run, or the last job of a SLURM run, reports the whole curation.
"""

from __future__ import annotations

import glob
import gzip
import json
import os
import struct
from collections import Counter

import ml_collections
import numpy as np
from datatrove.data import DocumentsPipeline
from datatrove.pipeline.base import PipelineStep

from fmjax.curate.blocks import LENGTH_BINS
from fmjax.curate.pipeline import work_dir

STAGE_ORDER = ('filter', 'exact_filter', 'finish')
EXAMPLES = 3
_SNIPPET = 160


def _total(value) -> float:
  return value.get('total', 0) if isinstance(value, dict) else value


def stage_steps(cfg: ml_collections.ConfigDict, stage: str) -> list[tuple[str, Counter]]:
  """(step name, summed stats) of each step of a stage, over all its finished tasks."""
  steps: list[tuple[str, Counter]] = []
  for path in sorted(glob.glob(work_dir(cfg, 'logs', stage, 'stats', '*.json'))):
    with open(path) as f:
      for i, step in enumerate(json.load(f)):
        if i == len(steps):
          steps.append((step['name'], Counter()))
        steps[i][1].update({k: _total(v) for k, v in step['stats'].items()})
  return steps


def measured_rows(cfg: ml_collections.ConfigDict) -> list[dict]:
  """One row per measuring point: documents/bytes/tokens there, and what the block before it removed and why."""
  rows, previous = [], None
  for stage in STAGE_ORDER:
    steps = stage_steps(cfg, stage)
    for i, (name, stats) in enumerate(steps):
      if not name.startswith('measure: '):
        continue
      point = name[len('measure: '):]
      row = {'point': point, 'documents': int(stats['documents']), 'bytes': int(stats['bytes']),
             'tokens': int(stats['tokens']), 'stats': stats}
      if point.startswith('after ') and i > 0:
        block = steps[i - 1][1]
        row['block'] = point[len('after '):]
        row['removed'] = previous['documents'] - row['documents'] if previous else 0
        row['reasons'] = {k[len('dropped_'):]: int(v) for k, v in block.items() if k.startswith('dropped_') and v}
        row['block_stats'] = block
      rows.append(row)
      if point != 'output':
        previous = row
  return rows


def removed_examples(cfg: ml_collections.ConfigDict, block: str, limit_docs: int = 5000) -> dict[str, list]:
  """Up to three removed documents per reason (id and the start of the text) from OUT/.curate/removed/<block>."""
  examples: dict[str, list] = {}
  seen = 0
  for path in sorted(glob.glob(work_dir(cfg, 'removed', block, '*.jsonl.gz'))):
    with gzip.open(path, 'rt', encoding='utf-8') as f:
      for line in f:
        seen += 1
        doc = json.loads(line)
        meta = doc.get('metadata', {})
        reason = meta.get('filter_reason') or block
        if len(examples.setdefault(reason, [])) < EXAMPLES:
          example = {'id': doc.get('id'), 'text': doc.get('text', '')[:_SNIPPET]}
          if 'contaminated_ngram' in meta:
            example['shared_ngram'] = meta['contaminated_ngram']
            example['shared_ngrams'] = meta.get('contaminated_ngrams')
          examples[reason].append(example)
        if seen >= limit_docs:
          return examples
  return examples


def near_cluster_sizes(cfg: ml_collections.ConfigDict) -> dict[int, int]:
  """{cluster size: clusters} of the MinHash clusters (from the cluster stage's .sizes files)."""
  members = Counter()
  for path in glob.glob(work_dir(cfg, 'minhash', 'remove', '*.sizes')):
    with open(path, 'rb') as f:
      data = f.read()
    for _, size in struct.iter_unpack('<II', data):
      members[size] += 1
  return {size: count // size for size, count in sorted(members.items())}


def decontamination(cfg: ml_collections.ConfigDict, decont_stats: Counter | None) -> dict:
  """Per eval file: its n-grams, how many occur in the corpus, documents removed."""
  result = {}
  for path in sorted(glob.glob(work_dir(cfg, 'decont', 'index', '*.json'))):
    name = os.path.basename(path)[:-len('.json')]
    with open(path) as f:
      info = json.load(f)
    found = set()
    for part in glob.glob(work_dir(cfg, 'decont', 'matched', name, '*.npy')):
      found.update(np.load(part).tolist())
    stats = decont_stats or Counter()
    result[name] = {'files': info['files'], 'ngram_size': cfg.decontaminate.ngram_size, 'ngrams': info['ngrams'],
                    'ngrams_in_corpus': len(found), 'overlap': len(found) / max(1, info['ngrams']),
                    'documents_removed': int(stats[f'contaminated_{name}']),
                    'shared_ngram_occurrences': int(stats[f'shared_ngrams_{name}'])}
  return result


def _histogram(stats: Counter) -> list[int]:
  return [int(stats[f'length_bin_{i:02d}']) for i in range(LENGTH_BINS)]


def build_report(cfg: ml_collections.ConfigDict) -> dict:
  """The report as a JSON-ready dict."""
  rows = measured_rows(cfg)
  by_point = {r['point']: r for r in rows}
  stages, removed = [], {}
  for r in rows:
    stages.append({k: r[k] for k in ('point', 'documents', 'bytes', 'tokens')} |
                  ({'removed': r['removed']} if 'block' in r else {}))
    if 'block' in r and r['block'] != 'pii':
      removed[r['block']] = {'documents': r['removed'], 'reasons': r['reasons'] or (
          {r['block']: r['removed']} if r['removed'] else {}), 'examples': removed_examples(cfg, r['block'])}
  pii_stats = by_point.get('after pii', {}).get('block_stats', Counter())
  exact = by_point.get('after exact_dedup', {}).get('stats', Counter())
  exact_sizes = {int(k[len('cluster_size_'):]): int(v) for k, v in exact.items() if k.startswith('cluster_size_')}
  near_sizes = near_cluster_sizes(cfg)
  report = {
      'output': cfg.output, 'preset': cfg.preset, 'tokenizer': cfg.tokenizer,
      'input': by_point.get('input', {}).get('documents', 0), 'output_documents': by_point.get('output', {}).get(
          'documents', 0),
      'stages': stages, 'removed': removed,
      'duplicates': {
          'exact': {'clusters': sum(exact_sizes.values()), 'sizes': dict(sorted(exact_sizes.items()))},
          'near': {'clusters': sum(near_sizes.values()), 'sizes': near_sizes}},
      'pii': {'email': int(pii_stats['email']), 'ip': int(pii_stats['ip']),
              'documents': int(pii_stats['documents_with_pii'])},
      'pii_kept': {'ip': int(pii_stats['ip_kept'])},
      'decontamination': decontamination(cfg, by_point.get('after decontaminate', {}).get('block_stats')),
      'length_histogram': {'bin_lower_bytes': [2 ** i if i else 0 for i in range(LENGTH_BINS)],
                           'before': _histogram(by_point.get('input', {}).get('stats', Counter())),
                           'after': _histogram(by_point.get('output', {}).get('stats', Counter()))},
      'config': cfg.to_dict(),
  }
  return report


def plot_lengths(report: dict, path: str) -> None:
  """Length histograms (log2 bins of UTF-8 bytes) before and after curation, as a PNG."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use('Agg')
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  hist = report['length_histogram']
  used = [i for i in range(LENGTH_BINS) if hist['before'][i] or hist['after'][i]] or [0]
  bins = list(range(min(used), max(used) + 1))
  x = np.arange(len(bins))
  fig, ax = plt.subplots(figsize=(8, 4))
  ax.bar(x - 0.2, [hist['before'][i] for i in bins], 0.4, label=f'before ({report["input"]} documents)')
  ax.bar(x + 0.2, [hist['after'][i] for i in bins], 0.4, label=f'after ({report["output_documents"]} documents)')
  ax.set_xticks(x, [_size(2 ** i) for i in bins], rotation=45)
  ax.set_xlabel('document length (UTF-8 bytes, lower bin edge)')
  ax.set_ylabel('documents')
  ax.set_title('fmjax.curate: document lengths')
  ax.legend()
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)


def _size(n: float) -> str:
  for unit in ('B', 'KB', 'MB', 'GB'):
    if n < 1024 or unit == 'GB':
      return f'{n:.0f}{unit}' if unit == 'B' else f'{n:.1f}{unit}'
    n /= 1024
  return str(n)


def summary(report: dict) -> str:
  """The readable console summary of a report."""
  lines = [f'fmjax.curate report for {report["output"]} (preset {report["preset"]}, tokenizer {report["tokenizer"]})',
           f'{"stage":<24}{"documents":>11}{"bytes":>11}{"tokens":>13}{"removed":>9}']
  for s in report['stages']:
    lines.append(f'{s["point"]:<24}{s["documents"]:>11}{_size(s["bytes"]):>11}{s["tokens"]:>13}'
                 f'{s.get("removed", ""):>9}')
  for block, info in report['removed'].items():
    if info['documents']:
      reasons = ', '.join(f'{k} {v}' for k, v in sorted(info['reasons'].items(), key=lambda kv: -kv[1]))
      lines.append(f'removed by {block}: {info["documents"]} ({reasons})')
      for reason, examples in info['examples'].items():
        lines.append(f'  e.g. {reason}: ' + '; '.join(str(e['id']) for e in examples))
  for kind, d in report['duplicates'].items():
    sizes = ', '.join(f'{k}: {v}' for k, v in d['sizes'].items())
    lines.append(f'{kind} duplicate clusters: {d["clusters"]}' + (f' (size: clusters {sizes})' if sizes else ''))
  p = report['pii']
  kept = report.get('pii_kept', {}).get('ip', 0)
  public = report.get('config', {}).get('pii', {}).get('only_public_ips')
  lines.append(f'PII redacted: {p["email"]} e-mail and {p["ip"]} IP addresses in {p["documents"]} documents'
               + (f'; {kept} IP addresses kept ({"non-public" if public else "loopback/unspecified"}: '
                  f'pii.only_public_ips={str(bool(public)).lower()})' if kept else ''))
  for name, d in report['decontamination'].items():
    lines.append(f'decontamination {name}: {d["documents_removed"]} documents removed; {d["ngrams_in_corpus"]} of '
                 f'its {d["ngrams"]} {d["ngram_size"]}-grams ({100 * d["overlap"]:.1f}%) occur in the corpus')
  lines.append(f'report: {os.path.join(report["output"], "report.json")}, length histogram: '
               f'{os.path.join(report["output"], "length_histogram.png")}')
  return '\n'.join(lines)


def write_report(cfg: ml_collections.ConfigDict) -> dict:
  """Write report.json and length_histogram.png into OUT; return the report."""
  report = build_report(cfg)
  tmp = os.path.join(cfg.output, 'report.json.tmp')
  with open(tmp, 'w') as f:
    json.dump(report, f, indent=2, default=list)
  os.replace(tmp, os.path.join(cfg.output, 'report.json'))
  plot_lengths(report, os.path.join(cfg.output, 'length_histogram.png'))
  return report


class ReportStep(PipelineStep):
  """The last job of a SLURM run: writes the data report into the output directory."""

  type = 'report'
  name = 'data report'

  def __init__(self, cfg_json: str):
    super().__init__()
    self.cfg_json = cfg_json

  def run(self, data: DocumentsPipeline = None, rank: int = 0, world_size: int = 1) -> DocumentsPipeline:
    write_report(ml_collections.ConfigDict(json.loads(self.cfg_json)))
    if data:
      yield from data

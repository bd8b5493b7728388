"""`python -m fmjax.curate` on a planted corpus built from Python's own standard library.

The corpus holds stdlib modules (the originals) plus exact copies, near copies (3% of the words
replaced), junk (repetition, symbol soup, one-word lines), modules carrying fake e-mail and IP
addresses and modules holding passages of an eval file (the Zen of Python). The test knows what
it planted and checks the curated shards and the report against its own counts; Jaccard
similarity, e-mail/IP patterns and n-gram overlap are recomputed here independently.
"""

from __future__ import annotations

import ast
import codecs
import gzip
import importlib.util
import json
import os
import random
import re

import pytest

from fmjax.curate.cli import main
from fmjax.curate.pipeline import lsh_bands
from fmjax.data.corpora import stdlib_files
from fmjax.data.tokenizers import train_char

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
CODE = os.path.join(REPO, 'configs', 'curate_code.py')
DEFAULT = os.path.join(REPO, 'configs', 'curate_default.py')


def _zen() -> str:
  """The Zen of Python, read (not imported: that prints it) from the rot13 string `s` of this.py."""
  with open(importlib.util.find_spec('this').origin, encoding='utf-8') as f:
    tree = ast.parse(f.read())
  encoded = next(n.value.value for n in tree.body if isinstance(n, ast.Assign) and n.targets[0].id == 's')
  return codecs.decode(encoded, 'rot13')


ZEN = _zen()
_EMAILISH = re.compile(r'[\w.+-]+@[\w-]+\.[\w.-]+')
_IPISH = re.compile(r'\b\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}\b')
_WORD = re.compile(r'[A-Za-z]+')


def _shingles(text: str, n: int = 5) -> set:
  words = re.findall(r'[a-z0-9]+', text.lower())
  return {' '.join(words[i:i + n]) for i in range(len(words) - n + 1)}


def _jaccard(a: set, b: set) -> float:
  return len(a & b) / max(1, len(a | b))


def _candidates(count: int, seed: int) -> list[str]:
  """Distinct stdlib modules of 1.5-20 KB without anything that looks like an e-mail/IP address or a
  13-gram of the Zen, and no two with 5-gram Jaccard >= 0.3 (natural near-duplicates are not originals)."""
  zen13 = _shingles(ZEN, 13)
  paths = [p for p in stdlib_files() if 1500 < os.path.getsize(p) < 20000]
  random.Random(seed).shuffle(paths)
  chosen, sets = [], []
  for path in paths:
    with open(path, 'rb') as f:
      raw = f.read()
    try:
      text = raw.decode('utf-8')
    except UnicodeDecodeError:
      continue
    if _EMAILISH.search(text) or _IPISH.search(text) or _shingles(text, 13) & zen13:
      continue
    s = _shingles(text)
    if not s or any(_jaccard(s, o) >= 0.3 for o in sets):
      continue
    chosen.append(text)
    sets.append(s)
    if len(chosen) == count:
      break
  return chosen


def _near_copy(text: str, rng: random.Random, fraction: float = 0.03) -> str:
  spans = [m.span() for m in _WORD.finditer(text)]
  for a, b in sorted(rng.sample(spans, max(1, round(fraction * len(spans)))), reverse=True):
    text = text[:a] + rng.choice(['alpha', 'bravo', 'charlie', 'delta', 'echo', 'foxtrot']) + text[b:]
  return text


def _junk(rng: random.Random) -> dict[str, str]:
  words = ZEN.split()
  para = 'def handler(event):\n    queue.put(event)\n    return process(event, retries=3)\n'
  junk = {}
  for i in range(5):
    junk[f'junk_repeat_{i}.txt'] = (para + '\n') * 30
    junk[f'junk_symbols_{i}.txt'] = ' '.join(''.join(rng.choice('#$%^&*()[]{}<>;:~|=+') for _ in range(rng.randint(1, 6)))
                                             for _ in range(400))
    junk[f'junk_oneword_{i}.txt'] = '\n'.join(rng.choice(words).strip('.,!*-') or 'word' for _ in range(300))
  return junk


def _pii_text(text: str, i: int) -> tuple[str, list[str], list[str]]:
  emails = [f'jane.doe{i}@mail-{i}.example.net', f'ops+{i}@corp{i}.org']
  ips = [f'23.{i + 10}.45.67', f'81.2.{i + 3}.200']
  header = (f'# Maintainer: {emails[0]} (server {ips[0]})\n'
            f'# Reports go to {emails[1]}; mirror at {ips[1]}\n')
  return header + text, emails, ips


def _contaminated(text: str, i: int) -> str:
  words = ZEN.split()
  start = 5 + 12 * i
  passage = ' '.join(words[start:start + 40])
  return f'"""Design notes.\n\n{passage}\n"""\n' + text


@pytest.fixture(scope='module')
def planted(tmp_path_factory):
  """The planted corpus on disk: {'dir', 'eval', 'docs': {file name: text}, 'groups', ...}."""
  root = tmp_path_factory.mktemp('planted')
  rng = random.Random(18)
  texts = _candidates(150 + 15, seed=18)
  originals, spare = texts[:150], texts[150:]
  docs, groups = {}, {}
  for i, text in enumerate(originals):
    docs[f'orig_{i:03d}.py'] = text
    groups[i] = [f'orig_{i:03d}.py']
  for i in range(30):
    docs[f'exact_{i:03d}.py'] = originals[i]
    groups[i].append(f'exact_{i:03d}.py')
  near = {}
  for i in range(30, 60):
    docs[f'near_{i:03d}.py'] = near[i] = _near_copy(originals[i], rng)
    groups[i].append(f'near_{i:03d}.py')
  docs.update(_junk(rng))
  emails, ips = [], []
  for i in range(10):
    docs[f'pii_{i:03d}.py'], e, p = _pii_text(spare[i], i)
    emails += e
    ips += p
  for i in range(5):
    docs[f'contam_{i:03d}.py'] = _contaminated(spare[10 + i], i)
  corpus = root / 'corpus'
  corpus.mkdir()
  for name, text in docs.items():
    (corpus / name).write_text(text, encoding='utf-8')
  (root / 'zen.txt').write_text(ZEN, encoding='utf-8')
  near_j = [_jaccard(_shingles(originals[i]), _shingles(near[i])) for i in near]
  return dict(dir=str(corpus), eval=str(root / 'zen.txt'), docs=docs, groups=groups, emails=emails, ips=ips,
              near_jaccard=near_j, root=root)


def _read_output(out: str) -> list[dict]:
  rows = []
  for name in sorted(os.listdir(out)):
    if name.endswith('.jsonl.gz'):
      with gzip.open(os.path.join(out, name), 'rt', encoding='utf-8') as f:
        rows += [json.loads(line) for line in f]
  return rows


def _args(config: str, input_glob: str, out: str, *extra: str) -> list[str]:
  return ['--config', config, f'--config.input={input_glob}', f'--config.output={out}', '--config.tasks=2',
          '--config.workers=1', *extra]


@pytest.fixture(scope='module')
def curated(planted):
  out = str(planted['root'] / 'out')
  code = main(_args(CODE, planted['dir'] + '/*', out, f'--config.decontaminate.eval_files={planted["eval"]}'))
  assert code == 0
  with open(os.path.join(out, 'report.json')) as f:
    report = json.load(f)
  return dict(out=out, rows=_read_output(out), report=report)


@pytest.mark.slow
def test_planted_corpus_is_curated_and_reported(planted, curated):
  docs, rows, report = planted['docs'], curated['rows'], curated['report']
  kept = {r['id'] for r in rows}
  assert len(kept) == len(rows)
  assert min(planted['near_jaccard']) > 0.5  # the near copies really are near (independent Jaccard)
  # duplicates: per group (original + copies), how many survive
  survivors = {i: sum(n in kept for n in names) for i, names in planted['groups'].items()}
  exact_groups = range(30)
  near_groups = range(30, 60)
  assert sum(2 - survivors[i] for i in exact_groups) / 30 >= 0.99
  assert sum(2 - survivors[i] for i in near_groups) / 30 >= 0.90
  lost_originals = [i for i, n in survivors.items() if n == 0]
  assert len(lost_originals) <= 0.02 * 150, lost_originals
  # junk and contaminated documents are all gone; PII documents stay, redacted
  assert not [n for n in kept if n.startswith(('junk_', 'contam_'))]
  assert {f'pii_{i:03d}.py' for i in range(10)} <= kept
  output_text = '\n'.join(r['text'] for r in rows)
  assert not [s for s in planted['emails'] + planted['ips'] if s in output_text]
  assert output_text.count('<EMAIL>') == len(planted['emails'])
  assert output_text.count('<IP_ADDRESS>') == len(planted['ips'])
  # the report's counts are the test's own
  stages = {s['point']: s for s in report['stages']}
  assert report['input'] == len(docs)
  assert stages['input']['bytes'] == stages['input']['tokens'] == sum(len(t.encode()) for t in docs.values())
  assert report['output_documents'] == len(rows)
  assert stages['output']['bytes'] == sum(len(r['text'].encode()) for r in rows)
  removed = {k: v['documents'] for k, v in report['removed'].items()}
  quality_removed = sum(removed[k] for k in ('gopher_repetition', 'gopher_quality', 'fineweb'))
  assert quality_removed == 15 + sum(1 for i in lost_originals)  # junk (+ originals lost to filters, if any)
  assert removed['decontaminate'] == 5
  assert removed['exact_dedup'] == sum(survivors[i] == 1 for i in exact_groups)
  assert removed['near_dedup'] == len(docs) - len(rows) - quality_removed - 5 - removed['exact_dedup']
  assert sum(removed.values()) == len(docs) - len(rows)
  assert report['duplicates']['exact']['sizes'] == {'2': 30}
  assert report['pii'] == {'email': len(planted['emails']), 'ip': len(planted['ips']), 'documents': 10}
  zen = report['decontamination']['zen']
  assert zen['documents_removed'] == 5 and 0 < zen['overlap'] <= 1
  for block in ('gopher_repetition', 'fineweb', 'gopher_quality', 'exact_dedup', 'near_dedup', 'decontaminate'):
    for reason, examples in report['removed'][block]['examples'].items():
      assert 1 <= len(examples) <= 3, (block, reason)
  assert os.path.getsize(os.path.join(curated['out'], 'length_histogram.png')) > 1000
  assert sum(report['length_histogram']['before']) == len(docs)
  assert sum(report['length_histogram']['after']) == len(rows)


def _small_corpus(root, count: int = 6) -> str:
  corpus = root / 'small'
  corpus.mkdir(exist_ok=True)
  for i, text in enumerate(_candidates(count, seed=7)):
    (corpus / f'm{i}.py').write_text(text, encoding='utf-8')
  return str(corpus)


def test_pii_redacts_private_ipv4_and_ipv6_addresses_and_reports_them(tmp_path, capsys):
  corpus = _small_corpus(tmp_path, 3)
  header = ('# hosts: db at 192.168.1.20, cache at 10.1.2.3, edge at [2001:db8::7]:443 and 2606:4700:4700::1111\n'
            '# bind 127.0.0.1 for tests; version 1.2.3.4.5\n')
  path = os.path.join(corpus, 'm0.py')
  with open(path, encoding='utf-8') as f:
    body = f.read()
  with open(path, 'w', encoding='utf-8') as f:
    f.write(header + body)
  out = str(tmp_path / 'out')
  assert main(_args(CODE, corpus + '/*', out, '--config.near_dedup.enabled=false')) == 0
  text = next(r['text'] for r in _read_output(out) if r['text'].endswith(body))
  assert text[:-len(body)] == ('# hosts: db at <IP_ADDRESS>, cache at <IP_ADDRESS>, edge at [<IP_ADDRESS>]:443 and '
                               '<IP_ADDRESS>\n# bind 127.0.0.1 for tests; version 1.2.3.4.5\n')
  with open(os.path.join(out, 'report.json')) as f:
    report = json.load(f)
  assert report['pii'] == {'email': 0, 'ip': 4, 'documents': 1} and report['pii_kept'] == {'ip': 1}
  assert 'PII redacted: 0 e-mail and 4 IP addresses in 1 documents; 1 IP addresses kept' in capsys.readouterr().out


def test_non_empty_output_is_refused_and_overwrite_replaces_it(tmp_path, capsys):
  corpus = _small_corpus(tmp_path, 3)
  out = tmp_path / 'out'
  out.mkdir()
  (out / 'notes.txt').write_text('mine')
  with open(os.path.join(corpus, 'accents.py'), 'w', encoding='utf-8') as f:  # chars != bytes here
    f.write('def greet(name):\n    """Say héllo to a naïve café owner – politely."""\n    return f"Grüße, {name}!"\n')
  assert main(_args(CODE, corpus + '/*', str(out))) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'not empty' in err and '--overwrite' in err
  assert (out / 'notes.txt').read_text() == 'mine'
  before = sorted(os.listdir(corpus))
  assert main(_args(CODE, corpus + '/*', corpus, '--overwrite')) == 2  # never deletes its own inputs
  assert 'inside the output directory' in capsys.readouterr().err and sorted(os.listdir(corpus)) == before
  chars = str(tmp_path / 'chars.json')
  texts = [open(os.path.join(corpus, n), encoding='utf-8').read() for n in sorted(os.listdir(corpus))]
  train_char([os.path.join(corpus, n) for n in sorted(os.listdir(corpus))], chars)
  assert main(_args(CODE, corpus + '/*', str(out), '--overwrite', f'--config.tokenizer={chars}')) == 0
  assert not (out / 'notes.txt').exists()
  assert sorted(r['text'] for r in _read_output(str(out))) == sorted(texts)
  with open(out / 'report.json') as f:
    stages = {s['point']: s for s in json.load(f)['stages']}
  assert stages['input']['tokens'] == sum(len(t) for t in texts)  # a char tokenizer: one token per character
  assert stages['input']['bytes'] == sum(len(t.encode()) for t in texts)


def test_interrupted_run_resumes_without_redoing_finished_shards(tmp_path, capsys):
  corpus = tmp_path / 'jsonl'
  corpus.mkdir()
  texts = _candidates(8, seed=3)
  for i in range(4):
    with gzip.open(corpus / f'part{i}.jsonl.gz', 'wt') as f:
      f.writelines(json.dumps({'text': t}) + '\n' for t in texts[2 * i:2 * i + 2])
  good = (corpus / 'part2.jsonl.gz').read_bytes()
  (corpus / 'part2.jsonl.gz').write_bytes(b'not gzip at all')  # task 2 of 4 fails, as if killed there
  out = tmp_path / 'out'
  args = ['--config', CODE, f'--config.input={corpus}/*.jsonl.gz', f'--config.output={out}', '--config.tasks=4',
          '--config.workers=1']
  assert main(args) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'stage filter failed' in err and 'part2.jsonl.gz' in err
  shards = out / '.curate' / 'shards' / 'filtered'
  done = {p.name: p.stat().st_mtime_ns for p in shards.iterdir()}
  assert sorted(done) == ['00000.jsonl.gz', '00001.jsonl.gz']
  (corpus / 'part2.jsonl.gz').write_bytes(good)
  assert main(args) == 0
  assert 'resuming' in capsys.readouterr().out
  assert {p.name: p.stat().st_mtime_ns for p in shards.iterdir() if p.name in done} == done
  assert sorted(r['text'] for r in _read_output(str(out))) == sorted(texts)


def test_slurm_dry_run_prints_the_jobs_and_writes_nothing(tmp_path, capsys):
  corpus = _small_corpus(tmp_path, 2)
  out = tmp_path / 'out'
  assert main(_args(DEFAULT, corpus + '/*', str(out), '--config.executor=slurm', '--config.slurm.partition=cpu',
                    '--config.tasks=3', '--dry-run')) == 0
  printed = capsys.readouterr().out
  assert 'fmjax.curate would submit' in printed
  assert printed.count('#!/bin/bash') == printed.count('# job ') >= 5
  assert '#SBATCH --partition=cpu' in printed and '#SBATCH --array=0-2' in printed
  assert 'launch_pickled_pipeline' in printed and 'fmjax-curate-finish' in printed
  assert not out.exists()


def test_language_id_without_its_model_names_what_to_fetch(tmp_path, capsys):
  corpus = _small_corpus(tmp_path, 1)
  assert main(_args(DEFAULT, corpus + '/*', str(tmp_path / 'out'), '--config.quality.language.enabled=true')) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'lid.176.bin' in err and 'model_path' in err
  assert not (tmp_path / 'out').exists()


def test_unknown_config_key_is_one_line(tmp_path, capsys):
  assert main(_args(DEFAULT, 'x', str(tmp_path / 'out'), '--config.near_dedup.treshold=0.5')) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and 'treshold' in err


@pytest.mark.parametrize('threshold', [0.5, 0.6, 0.7, 0.8])
def test_lsh_bands_put_the_s_curve_midpoint_at_the_threshold(threshold):
  bands, rows = lsh_bands(threshold, 112)
  assert bands * rows <= 112
  found = lambda s: 1 - (1 - s ** rows) ** bands  # noqa: E731
  assert 0.35 < found(threshold) < 0.65
  assert found(threshold - 0.2) < 0.1 and found(threshold + 0.2) > 0.9


@pytest.mark.slow
def test_curated_shards_train(curated, tmp_path):
  import subprocess  # pylint: disable=import-outside-toplevel
  import sys  # pylint: disable=import-outside-toplevel
  cmd = [sys.executable, '-m', 'fmjax.train', '--config', os.path.join(REPO, 'configs', 'default.py'),
         '--workdir', str(tmp_path / 'run'), '--config.data.source=jsonl',
         f'--config.data.files={curated["out"]}/*.jsonl.gz', '--config.steps=2', '--config.model.d_model=32',
         '--config.model.num_layers=1', '--config.model.num_heads=2', '--config.model.mlp_dim=64',
         '--config.model.max_seq_len=32', '--config.seq_len=32', '--config.global_batch_size=8',
         '--config.eval_every=0', '--config.log_every=1', '--config.progress_bar=false']
  done = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=REPO)
  assert done.returncode == 0, done.stderr[-2000:]

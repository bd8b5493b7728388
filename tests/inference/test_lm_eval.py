"""fmjax's lm-eval backend against lm-eval's own `hf` backend on the same model (exported with fmjax-convert).

The reference is independent: transformers runs the exported weights through lm-eval's HFLM, with its
own tokenizer (the exported tokenizer.json), batching, padding, truncation and stop handling.
"""

import dataclasses
import json
import logging
import os
import sys
import time

import numpy as np
import pytest

pytest.importorskip('lm_eval')
pytest.importorskip('transformers')
os.environ.setdefault('HF_DATASETS_OFFLINE', '1')
os.environ.setdefault('HF_HUB_OFFLINE', '1')

from lm_eval.api.instance import Instance  # noqa: E402

from fmjax.inference import api, lm_eval_compute, lm_eval_errors, lm_eval_run  # noqa: E402
from fmjax.inference.lm_eval_backend import FmjaxLM  # noqa: E402
from fmjax.inference.lm_eval_tasks import TASKS_DIR, stdlib_tasks  # noqa: E402
from helpers import tiny_config  # noqa: E402

CONTEXT = 128
GEN = {'until': ['\n', ' ', '('], 'max_gen_toks': 12, 'do_sample': False}
NOTICE = 'cut from the left'


def _random_workdir(workdir, seed=1):
  """A params-only fmjax checkpoint of a random byte-level model (every weight, norms too, perturbed)."""
  import jax
  from fmjax import config as config_lib
  from fmjax.checkpoints import store
  from fmjax.convert import driver, source
  cfg = tiny_config(vocab_size=264, max_seq_len=CONTEXT, rope_theta=500.0, scan_layers=False)
  cfg.seq_len = CONTEXT
  rng = np.random.default_rng(seed)
  params = jax.tree.map(lambda a: (1.0 if a.ndim == 1 else 0.0) + 0.2 * rng.standard_normal(a.shape, np.float32),
                        source.abstract_params(cfg.model))
  driver.save_params(str(workdir), 0, params, store.make_metadata(cfg, 'byte'))
  config_lib.save(cfg, os.path.join(str(workdir), 'config.json'))
  return str(workdir)


@pytest.fixture(scope='module')
def setup(tmp_path_factory):
  """(fmjax workdir, its HF export, the loaded fmjax model, lm-eval's hf backend on the export, task docs)."""
  from lm_eval.models.huggingface import HFLM
  from fmjax.convert.cli import main as convert_main
  root = tmp_path_factory.mktemp('lm_eval')
  workdir = _random_workdir(root / 'fm')
  assert convert_main(['to-hf', '--workdir', workdir, '--out', str(root / 'hf')]) == 0
  hf = HFLM(pretrained=str(root / 'hf'), dtype='float32', device='cpu', batch_size=8)
  files = stdlib_tasks.build(str(root / 'cache'))
  docs = {name: [json.loads(line) for line in open(path)] for name, path in files.items()}
  return dict(workdir=workdir, hf_dir=str(root / 'hf'), lm=api.load(workdir), hf=hf, docs=docs,
              cache=str(root / 'cache'))


def _loglikelihood_requests(docs):
  """12 multiple-choice requests longer than the model (cut from the left), 14 cloze requests of 49-62 tokens
  (so that, longest first, batches of 8 fill two buckets, 128 and 64, at several widths), an empty context
  (scored after the prefix token) and a context ending in spaces (moved to the continuation)."""
  out = [Instance('loglikelihood', d, (d['context'], c), i)
         for d in docs['next_line'][:3] for i, c in enumerate(d['choices'])]
  for j, d in enumerate(docs['last_word'][:14]):
    context = d['context'].encode('ascii', 'replace').decode()[-(62 - j - len(d['target'])):]
    out.append(Instance('loglikelihood', d, (context, d['target']), 0))   # BOS + context + target - 1 = 62 - j
  out += [Instance('loglikelihood', {}, ('', 'def f(x):\n    return x'), 0),
          Instance('loglikelihood', {}, ('total = 1 +  ', 'count'), 0)]
  return out


def _rolling_requests(docs):
  return [Instance('loglikelihood_rolling', d, (d['text'][:n],), 0) for d, n in zip(docs['perplexity'], (700, 300, 60))]


def _generate_requests(docs):
  return [Instance('generate_until', d, (d['context'][-n:], dict(GEN)), 0)
          for d, n in zip(docs['last_word'][:5], (40, 300, 70, 15, 120))]


def _assert_close(ours, reference, windows=None):
  """Per-request log-likelihoods within 1e-4 (per rolling window: the reference sums each in float32),
  and the same greedy flags."""
  for i, (a, b) in enumerate(zip(ours, reference)):
    a_value, b_value = (a[0], b[0]) if isinstance(a, tuple) else (a, b)
    limit = 1e-4 * (windows[i] if windows else 1)
    assert abs(a_value - b_value) <= limit, (i, a, b)
    if isinstance(a, tuple):
      assert a[1] == b[1], (i, a, b)


def _windows(lm, requests):
  from lm_eval import utils
  return [len(list(utils.get_rolling_token_windows(lm.tok_encode(r.args[0]), lm.prefix_token_id, lm.max_length, 1)))
          for r in requests]


def _check_against_hf(setup, caplog, variants, generate=()):
  """Each variant's scores and generations against the hf backend's; returns each variant's compiles."""
  docs, hf = setup['docs'], setup['hf']
  ll, rolling, gen = _loglikelihood_requests(docs), _rolling_requests(docs), _generate_requests(docs)
  want_ll, want_rolling = hf.loglikelihood(ll), hf.loglikelihood_rolling(rolling)
  want_gen = hf.generate_until(gen) if generate else None
  restored = dataclasses.replace(setup['lm'].restored, compiled={})   # compiles counted from none
  compiles = []
  for options in variants:
    lm = FmjaxLM(lm=restored, **options)
    with caplog.at_level(logging.WARNING, logger='fmjax.inference.lm_eval_backend'):
      caplog.clear()
      got_ll = lm.loglikelihood(ll)
      notices = [r for r in caplog.records if NOTICE in r.getMessage()]
    assert len(notices) == 1 and f'12 of {len(ll)} requests' in notices[0].getMessage()   # one line per call
    _assert_close(got_ll, want_ll)
    _assert_close(lm.loglikelihood_rolling(rolling), want_rolling, _windows(lm, rolling))
    if options in generate:
      assert lm.generate_until(gen) == want_gen
    compiles.append(lm.runner.compiles)
    diff = max(abs(a[0] - b[0]) for a, b in zip(got_ll, want_ll))
    print(f'fmjax {options} vs hf backend: max |loglikelihood diff| {diff:.2e} over {len(ll)} requests, '
          f'{lm.runner.compiles} compiles')
  return compiles


def test_requests_match_the_hf_backend_at_any_batch_size_and_padding(setup, caplog):
  """Batches of 8 in the default buckets, then one request at a time among padding rows, then each batch at its
  own width: the same scores as the hf backend, and programs compiled once per width, reused across batch sizes."""
  variants = [dict(batch_size=8), dict(batch_size=1, buckets='64;128'), dict(batch_size=8, buckets=False)]
  compiles = _check_against_hf(setup, caplog, variants, generate=variants[:1])
  assert compiles == [3, 0, 2]   # scoring at 128 and 64 and one decoder; none new; the two unbucketed widths


@pytest.mark.slow
def test_more_batchings_match_the_hf_backend(setup, caplog):
  variants = [dict(batch_size=1, buckets=False), dict(batch_size=3, buckets='24;48'), dict(batch_size=16)]
  _check_against_hf(setup, caplog, variants, generate=variants)


class _LeakyPaddingRunner(lm_eval_compute.RowRunner):
  """A deliberately broken scorer: rows padded on the left with the padding attended (segment 1) and counted in
  the positions, the Levanter #860 class of bug (padding or packing changing a request's score)."""

  def score(self, inputs, targets, width):
    shifted = [[0] * (width - len(r)) + list(r) for r in inputs]
    logp, greedy = super().score(shifted, [[0] * (width - len(t)) + list(t) for t in targets], width)
    keep = [np.arange(width - len(r), width) for r in inputs]   # back to the request's own columns, left-aligned
    return (np.stack([np.pad(row[k], (0, width - len(k))) for row, k in zip(logp, keep)]),
            np.stack([np.pad(row[k], (0, width - len(k))) for row, k in zip(greedy, keep)]))


def test_the_comparison_catches_padding_that_changes_scores(setup):
  ll = _loglikelihood_requests(setup['docs'])[12:]   # the requests shorter than their batch's width
  want = setup['hf'].loglikelihood(ll)
  lm = FmjaxLM(lm=setup['lm'], batch_size=8)
  lm.runner = _LeakyPaddingRunner(setup['lm'].restored, rows=8)
  with pytest.raises(AssertionError):
    _assert_close(lm.loglikelihood(ll), want)


@pytest.mark.slow
def test_compiles_are_one_per_bucket_and_reused(setup):
  lm = FmjaxLM(lm=dataclasses.replace(setup['lm'].restored, compiled={}), batch_size=8)   # compiles counted from none
  text = setup['docs']['perplexity'][0]['text'].encode('ascii', 'replace').decode()   # one byte per character
  first = [Instance('loglikelihood', {}, (text[:n], text[n:n + 3]), 0) for n in range(4, 124, 4)]   # 30 lengths
  lengths = sorted((n + 3 for n in range(4, 124, 4)), reverse=True)    # BOS + context + continuation - 1
  scores = lm.loglikelihood(first)
  used = {lm_eval_compute.pick_length(lengths[i], lm.buckets) for i in range(0, len(lengths), 8)}
  assert lm.runner.compiles == len(used) == 4
  second = [Instance('loglikelihood', {}, (text[200:200 + n], text[300 + n:303 + n]), 0) for n in range(4, 124, 4)]
  lm.loglikelihood(second)                                              # other requests of the same lengths
  again = FmjaxLM(lm=lm.restored, batch_size=8)
  again.loglikelihood(first)
  assert lm.runner.compiles == len(used) and again.runner.compiles == 0   # every bucket's program reused
  _assert_close(setup['hf'].loglikelihood(first), scores)


def test_run_tasks_in_process_with_new_params(setup):
  import jax
  lm = setup['lm']
  options = dict(limit=3, task_metadata={'cache_dir': setup['cache']}, batch_size=8)
  evaluate_tasks = lm_eval_run.make_task_evaluator(lm, ['fmjax_stdlib_perplexity'], **options)
  before = evaluate_tasks()
  assert set(before) == {f'fmjax_stdlib_perplexity/{m}' for m in ('word_perplexity', 'byte_perplexity',
                                                                    'bits_per_byte')}
  scaled = jax.tree.map(lambda x: x * 0.5, lm.params)          # the same shapes and shardings, other values
  after = evaluate_tasks(scaled)
  assert after['fmjax_stdlib_perplexity/bits_per_byte'] != before['fmjax_stdlib_perplexity/bits_per_byte']
  assert evaluate_tasks() == before
  assert lm_eval_run.run_tasks(lm, ['fmjax_stdlib_perplexity'], **options) == before
  live = lm_eval_run.for_run(lm.restored.run, lm.config, lm.tokenizer, step=7)   # what a training loop holds
  assert lm_eval_run.make_task_evaluator(live, ['fmjax_stdlib_perplexity'], **options)(scaled) == after


def test_command_writes_results_and_samples(setup, tmp_path, capsys, monkeypatch):
  from fmjax.lm_eval import main
  monkeypatch.setenv('FMJAX_LM_EVAL_CACHE', setup['cache'])
  out = tmp_path / 'eval' / 'results.json'
  assert main(['--workdir', setup['workdir'], '--tasks', 'fmjax_stdlib_next_line', '--limit', '4',
               '--batch-size', '8', '--out', str(out)]) == 0
  printed = capsys.readouterr().out
  assert '|fmjax_stdlib_next_line' in printed and 'acc_norm' in printed
  results = json.loads(out.read_text())['results']['fmjax_stdlib_next_line']
  samples = [json.loads(line) for line in (tmp_path / 'eval' / 'results.samples.jsonl').read_text().splitlines()]
  assert len(samples) == 4 and all(len(s['resps']) == 4 for s in samples)   # 4 documents, 4 choices each
  chosen = [int(np.argmax([r[0][0] for r in s['resps']])) == s['doc']['gold'] for s in samples]
  assert results['acc,none'] == pytest.approx(np.mean(chosen))


def test_help_is_fast_and_needs_no_jax():
  import subprocess
  start = time.perf_counter()
  code = ('import sys; from fmjax.lm_eval import main\ntry:\n  main(["--help"])\nexcept SystemExit:\n  pass\n'
          'assert "jax" not in sys.modules and "lm_eval" not in sys.modules, sorted(sys.modules)')
  out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=60,
                       env={**os.environ, 'FMJAX_HUGEPAGES': '0'})
  assert out.returncode == 0, out.stderr
  assert '--tasks' in out.stdout and '--include-path' in out.stdout
  assert time.perf_counter() - start < 5   # the import alone; < 1 s on an idle machine


def test_bad_inputs_are_one_line(setup, tmp_path, capsys, monkeypatch):
  with pytest.raises(lm_eval_errors.UnknownTask, match="'fmjax_stdlib_nextline'.*did you mean fmjax_stdlib_next_line"):
    lm_eval_run.task_manager(['fmjax_stdlib_nextline'], builtin=False)
  (tmp_path / 'tasks').mkdir()
  (tmp_path / 'tasks' / 'mine.yaml').write_text(
      'task: my_local_task\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: '
      f'{tmp_path}/missing.jsonl\noutput_type: loglikelihood\ntest_split: test\ndoc_to_text: a\ndoc_to_target: b\n')
  manager = lm_eval_run.task_manager(['my_local_task'], str(tmp_path / 'tasks'))
  with pytest.raises(lm_eval_errors.TaskDataMissing, match=f'my_local_task .*{tmp_path}/missing.jsonl'):
    lm_eval_run.evaluate(FmjaxLM(lm=setup['lm']), ['my_local_task'], manager=manager)
  from fmjax.lm_eval import main
  monkeypatch.setitem(sys.modules, 'lm_eval', None)   # what Python's import system says when it is not installed
  assert main(['--workdir', setup['workdir'], '--tasks', 'fmjax_sanity']) == 2
  err = capsys.readouterr().err.strip()
  assert err == f'fmjax.lm_eval: error: lm-eval is not installed: {lm_eval_errors.INSTALL}'


def test_imported_hf_llama_scores_as_the_hf_backend(setup, tmp_path):
  """A Llama-3-style model with a BPE tokenizer, imported with fmjax-convert from-hf: the context/continuation
  split is made on BPE tokens here, so this checks the encoding conventions as well as the scores."""
  from lm_eval.models.huggingface import HFLM
  from fmjax.convert.cli import main as convert_main
  from hf_models import make_llama3
  make_llama3(str(tmp_path / 'llama'))
  assert convert_main(['from-hf', '--hf-dir', str(tmp_path / 'llama'), '--out', str(tmp_path / 'fm')]) == 0
  hf = HFLM(pretrained=str(tmp_path / 'llama'), dtype='float32', device='cpu', batch_size=8)
  ours = FmjaxLM(pretrained=str(tmp_path / 'fm'), batch_size=8)
  assert ours.max_length == hf.max_length == 256 and ours.prefix_token_id == hf.prefix_token_id
  docs = setup['docs']
  ll = [Instance('loglikelihood', d, (d['context'], c), i)
        for d in docs['next_line'][:2] for i, c in enumerate(d['choices'])]
  ll += [Instance('loglikelihood', d, (d['context'][-80:], ' ' + d['target']), 0) for d in docs['last_word'][:8]]
  ll.append(Instance('loglikelihood', {}, ('', 'the quick brown fox'), 0))
  rolling = [Instance('loglikelihood_rolling', d, (d['text'][:n],), 0) for d, n in zip(docs['perplexity'], (1500, 200))]
  for request in ll[:3]:
    assert ours._encode_pair(*request.args) == hf._encode_pair(*request.args)   # pylint: disable=protected-access
  want, got = hf.loglikelihood(ll), ours.loglikelihood(ll)
  _assert_close(got, want)
  _assert_close(ours.loglikelihood_rolling(rolling), hf.loglikelihood_rolling(rolling), _windows(ours, rolling))
  print(f'imported Llama, fmjax vs hf backend: max |loglikelihood diff| '
        f'{max(abs(a[0] - b[0]) for a, b in zip(got, want)):.2e} over {len(ll)} requests')


SANITY = ['fmjax_stdlib_next_line', 'fmjax_stdlib_perplexity', 'fmjax_stdlib_last_word_gen']


@pytest.mark.slow
def test_whole_harness_matches_the_hf_backend(setup):
  """lm_eval.simple_evaluate with model='fmjax' and model='hf' on the same tasks: the same per-sample choices,
  generations and metrics, per-request log-likelihoods within 1e-4, at batch sizes 1 and 8, bucketed or not."""
  import lm_eval
  manager = lm_eval_run.task_manager(SANITY, metadata={'cache_dir': setup['cache']}, builtin=False)
  common = dict(tasks=SANITY, limit=6, task_manager=manager, bootstrap_iters=0, log_samples=True)
  want = lm_eval.simple_evaluate(model='hf', model_args={'pretrained': setup['hf_dir'], 'dtype': 'float32',
                                                         'device': 'cpu'}, batch_size=8, **common)
  for batch_size, model_args in ((8, {}), (1, {}), (8, {'buckets': 'none'})):
    got = lm_eval.simple_evaluate(model='fmjax', model_args={'pretrained': setup['workdir'], **model_args},
                                  batch_size=batch_size, **common)
    for task in SANITY:
      ours, theirs = got['samples'][task], want['samples'][task]
      assert [s['doc_id'] for s in ours] == [s['doc_id'] for s in theirs] and len(ours) == 6
      for a, b in zip(ours, theirs):
        if task.endswith('_gen'):
          assert a['resps'] == b['resps']
        elif task.endswith('_perplexity'):   # one total per document, over ceil(tokens / context) windows
          _assert_close([a['resps'][0][0]], [b['resps'][0][0]], [-(-(1 + len(a['doc']['text'].encode())) // CONTEXT)])
        else:                                # (log-likelihood, greedy) per choice
          _assert_close([r[0] for r in a['resps']], [r[0] for r in b['resps']])
      for metric, value in want['results'][task].items():
        if isinstance(value, float):
          assert got['results'][task][metric] == pytest.approx(value, rel=1e-6), (task, metric)
    assert got['results']['fmjax_stdlib_next_line']['acc,none'] == want['results']['fmjax_stdlib_next_line']['acc,none']


def _task_requests(manager, name, limit):
  task = manager.load([name])['tasks'][name]
  task.build_all_requests(limit=limit)
  return [Instance(i.request_type, i.doc, i.arguments, i.idx) for i in task.instances]


@pytest.mark.slow
def test_speed_against_the_hf_backend(setup):
  """Requests per second of both backends on the same model and multiple-choice requests, in one process,
  alternating (best of 3 each, after fmjax's compiles); the scores agree."""
  from lm_eval.models.huggingface import HFLM
  manager = lm_eval_run.task_manager(['fmjax_stdlib_next_line'], metadata={'cache_dir': setup['cache']}, builtin=False)
  requests = _task_requests(manager, 'fmjax_stdlib_next_line', 64)   # 256 requests
  hf = HFLM(pretrained=setup['hf_dir'], dtype='float32', device='cpu', batch_size=16)
  ours = FmjaxLM(lm=setup['lm'], batch_size=16)
  start = time.perf_counter()
  ours.loglikelihood(requests, disable_tqdm=True)
  cold = time.perf_counter() - start
  best = {'fmjax': float('inf'), 'hf': float('inf')}
  for _ in range(3):
    for name, lm in (('fmjax', ours), ('hf', hf)):
      start = time.perf_counter()
      scores = lm.loglikelihood(requests, disable_tqdm=True)
      best[name] = min(best[name], time.perf_counter() - start)
      if name == 'fmjax':
        got = scores
      else:
        _assert_close(got, scores)
  rates = {k: len(requests) / v for k, v in best.items()}
  print(f'\nloglikelihood requests/s on {len(requests)} next-line requests (batch 16, {CONTEXT} tokens): '
        f'fmjax {rates["fmjax"]:.0f} (first call with compiles: {len(requests) / cold:.0f}), hf {rates["hf"]:.0f}; '
        f'fmjax / hf = {rates["fmjax"] / rates["hf"]:.2f}x (load average {os.getloadavg()[0]:.1f} on '
        f'{os.cpu_count()} CPUs)')


@pytest.mark.slow
def test_command_names_an_unknown_task_after_searching_lm_evals_own(setup, capsys):
  from fmjax.lm_eval import main
  assert main(['--workdir', setup['workdir'], '--tasks', 'fmjax_stdlib_next_line,hellaswagg']) == 2
  err = capsys.readouterr().err.strip().splitlines()
  assert len(err) == 1 and "unknown lm-eval task 'hellaswagg'" in err[0] and 'did you mean hellaswag' in err[0]

"""Downstream benchmarks while pretraining (eval_tasks): the logged task metrics against lm-eval run
independently on each saved checkpoint read back from disk; one-line errors for bad input."""

from __future__ import annotations

import json
import os
import sys
import time

import pytest

from fmjax import config as config_lib
from fmjax.config.errors import ConfigError
from fmjax.train import train
from helpers import text_run_config

pytest.importorskip('lm_eval')

TASK = 'fmjax_stdlib_next_line'
PERPLEXITY = 'fmjax_stdlib_perplexity'   # continuous metrics: they move with every step's parameters
LIMIT = 16


def _config(tmp_path, **top):
  top = dict(steps=8, checkpoint_every=4, eval_every=3, eval_tasks=TASK, eval_tasks_limit=LIMIT,
             eval_tasks_batch_size=8) | top
  cfg = text_run_config(tmp_path, **top)
  cfg.model.max_seq_len = 128   # the context lm-eval scores in (RoPE); training reads 16 tokens a row
  return cfg


@pytest.fixture(autouse=True)
def _task_cache(tmp_path_factory, monkeypatch):
  """The sanity tasks' documents, written once for this module's tests (not in ~/.cache)."""
  monkeypatch.setenv('FMJAX_LM_EVAL_CACHE', str(tmp_path_factory.getbasetemp() / 'lm_eval_tasks'))


def _records(workdir) -> list[dict]:
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_task_metrics_at_checkpoints_match_lm_eval_on_the_saved_checkpoints(tmp_path, capsys):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  from fmjax.inference import api, lm_eval_run
  cfg = _config(tmp_path, eval_tasks=f'{TASK}, {PERPLEXITY}')
  started = time.perf_counter()
  train(cfg)
  took = time.perf_counter() - started
  records = _records(cfg.workdir)
  downstream = {r['step']: r for r in records if r['split'] == 'downstream'}
  assert sorted(downstream) == [4, 8]        # every checkpoint (eval_tasks_every=0) and the end, once each
  assert [r['step'] for r in records if r['split'] == 'eval'] == [3, 6, 8]   # eval_every keeps its own schedule
  assert all(set(r) - {'step', 'split'} for r in records)   # no empty record where only one schedule was due
  acc = f'{TASK}/acc'
  events = EventAccumulator(os.path.join(cfg.workdir, 'tensorboard'))
  events.Reload()
  board = {e.step: e.value for e in events.Scalars(f'downstream/{acc}')}
  assert sorted(board) == [4, 8]
  for step in (4, 8):   # independent: the checkpoint of that step read from disk, scored by lm_eval_run
    want = lm_eval_run.run_tasks(api.load(cfg.workdir, step=step), [TASK, PERPLEXITY], limit=LIMIT, batch_size=8)
    assert {acc, f'{PERPLEXITY}/bits_per_byte'} <= set(want) and set(want) <= set(downstream[step])
    for key, value in want.items():
      assert downstream[step][key] == pytest.approx(value, abs=1e-6), (step, key)
    assert board[step] == pytest.approx(want[acc], abs=1e-6)
    assert 0 < downstream[step]['seconds'] < took
  bits = f'{PERPLEXITY}/bits_per_byte'
  assert downstream[8][bits] < downstream[4][bits]   # each step's own parameters were scored
  printed = capsys.readouterr().out
  assert f'eval_tasks: {TASK}, {PERPLEXITY} every 4 steps and at the end, {LIMIT} documents per task' in printed
  assert f'[downstream] step 4: {acc}=' in printed
  print(f"downstream seconds {[round(downstream[s]['seconds'], 2) for s in (4, 8)]}, acc "
        f"{[downstream[s][acc] for s in (4, 8)]}, bits/byte {[round(downstream[s][bits], 4) for s in (4, 8)]}, "
        f"run {took:.1f}s", file=sys.__stderr__)


def _build_calls(monkeypatch) -> list:
  """Records each compile of the run (the real build, called through)."""
  from fmjax.training import build
  calls, real = [], build.build_lm_run
  monkeypatch.setattr(build, 'build_lm_run', lambda *a, **k: calls.append(1) or real(*a, **k))
  return calls


def test_an_unknown_task_is_one_line_before_anything_is_compiled(tmp_path, monkeypatch):
  from fmjax.inference import lm_eval_errors
  calls = _build_calls(monkeypatch)
  cfg = _config(tmp_path, eval_tasks=f'{TASK},fmjax_stdlib_nextline')
  with pytest.raises(lm_eval_errors.UnknownTask) as e:
    train(cfg)
  message = str(e.value)
  assert '\n' not in message and "unknown lm-eval task 'fmjax_stdlib_nextline'" in message
  assert 'did you mean fmjax_stdlib_next_line' in message
  assert calls == [] and not os.path.exists(cfg.workdir)   # nothing compiled; the fresh workdir removed


def test_lm_eval_missing_is_one_line_before_anything_is_compiled(tmp_path, monkeypatch):
  from fmjax.inference import lm_eval_errors
  calls = _build_calls(monkeypatch)
  for name in [m for m in sys.modules if m == 'lm_eval' or m.startswith('lm_eval.')]:
    monkeypatch.delitem(sys.modules, name)
  monkeypatch.setitem(sys.modules, 'lm_eval', None)   # `import lm_eval` now fails as if it were not installed
  with pytest.raises(ImportError):
    import lm_eval  # noqa: F401
  with pytest.raises(lm_eval_errors.LmEvalMissing) as e:
    train(_config(tmp_path))
  assert str(e.value) == f'lm-eval is not installed: {lm_eval_errors.INSTALL}'
  assert calls == [] and not os.path.exists(tmp_path / 'workdir')
  train(_config(tmp_path, steps=1, eval_tasks=''))   # without eval_tasks the run needs no lm-eval
  assert calls == [1]


@pytest.mark.parametrize('key,value,match', [
    ('eval_tasks_every', -1, 'eval_tasks_every must be an integer >= 0, got -1'),
    ('eval_tasks_limit', -2, 'eval_tasks_limit must be an integer >= 0, got -2'),
    ('eval_tasks_batch_size', 0, 'eval_tasks_batch_size must be an integer >= 1, got 0'),
])
def test_bad_values_are_one_line(tmp_path, key, value, match):
  cfg = _config(tmp_path)
  cfg[key] = value
  with pytest.raises(ConfigError, match=match):
    config_lib.validate(cfg)


def test_an_encoder_cannot_run_eval_tasks(tmp_path):
  cfg = _config(tmp_path)
  cfg.model.kind = 'encoder'
  with pytest.raises(ConfigError, match="eval_tasks scores a causal decoder.*set eval_tasks=''"):
    config_lib.validate(cfg)
  cfg.eval_tasks = ''
  config_lib.validate(cfg)


@pytest.mark.slow
def test_a_task_the_model_cannot_run_stops_downstream_with_one_line_and_training_goes_on(tmp_path, capsys):
  cfg = _config(tmp_path, eval_every=0)
  cfg.model.max_seq_len = 64    # next_line's continuations are longer: lm-eval's one-line refusal
  result = train(cfg)
  assert result.last_step == 8
  records = _records(cfg.workdir)
  assert not [r for r in records if r['split'] == 'downstream']
  assert [r['step'] for r in records if r['split'] == 'train'][-1] == 8
  assert sorted(int(n) for n in os.listdir(os.path.join(cfg.workdir, 'checkpoints')) if n.isdigit()) == [4, 8]
  out = capsys.readouterr()
  lines = [l for l in (out.out + out.err).splitlines() if 'eval_tasks stopped at step 4, training goes on' in l]
  assert len(lines) == 1 and 'longer than the model context' in lines[0], lines

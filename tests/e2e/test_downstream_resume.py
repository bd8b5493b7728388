"""Downstream benchmarks (eval_tasks) across a SIGKILL and a resume: each step's task metrics logged
once, equal to an uninterrupted run's."""

import json
import os
import signal
import subprocess

import pytest

from cli_runs import ROOT, SERIAL, _wait_for, base_env, checkpoints, command, train_cli
from helpers import write_corpus

pytestmark = pytest.mark.slow
pytest.importorskip('lm_eval')

ARGS = ('--config.steps=12', '--config.optim.decay_steps=12', '--config.eval_tasks=fmjax_stdlib_next_line',
        '--config.eval_tasks_every=2', '--config.eval_tasks_limit=16', '--config.eval_tasks_batch_size=8',
        '--config.model.max_seq_len=128')   # the context lm-eval scores in (RoPE); rows of 32 tokens train


@pytest.fixture
def data(tmp_path, monkeypatch):
  monkeypatch.setenv('FMJAX_LM_EVAL_CACHE', str(tmp_path / 'lm_eval_tasks'))   # the runs inherit it
  return {'files': write_corpus(tmp_path / 'corpus', n_files=24), 'cache': str(tmp_path / 'cache')}


def _downstream(workdir) -> list[dict]:
  if not os.path.exists(os.path.join(workdir, 'metrics.jsonl')):
    return []
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    return [json.loads(line) for line in f if '"split": "downstream"' in line]


def _kill_after_downstream_past_checkpoint(run, data, step: int) -> None:
  """SIGKILL a one-process run once checkpoint `step` exists and a later step's downstream record is logged."""
  proc = subprocess.Popen(command(run, data, *ARGS), env=base_env(1, **SERIAL), cwd=ROOT)
  try:
    assert _wait_for(lambda: step in checkpoints(run) and max((r['step'] for r in _downstream(run)), default=0) > step,
                     240, proc), f'no checkpoint at step {step} followed by a downstream record'
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
  finally:
    if proc.poll() is None:
      proc.kill()


def test_sigkill_then_resume_logs_each_downstream_step_once(tmp_path, data):
  ref = tmp_path / 'ref'
  assert train_cli(ref, data, *ARGS, devices=1, env=SERIAL) == [0]
  want = {r['step']: r for r in _downstream(ref)}
  assert sorted(want) == [2, 4, 6, 8, 10, 12]
  run = tmp_path / 'run'
  _kill_after_downstream_past_checkpoint(run, data, step=4)
  killed = [r['step'] for r in _downstream(run)]
  assert checkpoints(run)[-1] == 4 and killed[-1] > 4, (checkpoints(run), killed)   # records past the checkpoint
  assert train_cli(run, data, *ARGS, devices=1, env=SERIAL) == [0]
  got = _downstream(run)
  assert [r['step'] for r in got] == [2, 4, 6, 8, 10, 12]   # once each: those after the restored checkpoint dropped
  for record in got:
    metrics = {k: v for k, v in record.items() if k != 'seconds'}
    assert metrics == {k: v for k, v in want[record['step']].items() if k != 'seconds'}
  assert 'fmjax_stdlib_next_line/acc' in got[0]

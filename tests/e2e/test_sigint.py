"""Ctrl-C through `python -m fmjax.train`: the signal goes to the whole process group, as a terminal sends it.

One Ctrl-C: a checkpoint at the step boundary, one line, exit code 130, and the rerun resumes
bit-identically. A second one: aborted at once with one line, the last complete checkpoint intact.
"""

import os
import re
import signal
import subprocess
import time

import pytest

from cli_runs import (ROOT, SERIAL, _wait_for, base_env, checkpoints, command, logged_losses, train_cli,
                      train_records)
from helpers import write_corpus

pytestmark = pytest.mark.slow

ARGS = ('--config.model.d_model=64', '--config.model.mlp_dim=256', '--config.seq_len=32',
        '--config.global_batch_size=32', '--config.steps=40', '--config.checkpoint_every=10',
        '--config.async_checkpoints=false', '--config.optim.decay_steps=40')


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('sigint')
  return {'files': write_corpus(root / 'corpus', n_files=24), 'cache': str(root / 'cache')}


@pytest.fixture(scope='module')
def reference(tmp_path_factory, data):
  """The uninterrupted run: its losses and train records."""
  ref = tmp_path_factory.mktemp('ref') / 'run'
  assert train_cli(ref, data, *ARGS, devices=1, env=SERIAL) == [0]
  return logged_losses(ref), train_records(ref)


def _start(run, data, args, out):
  """A one-process run in its own process group, stdout and stderr into `out`."""
  return subprocess.Popen(command(run, data, *args), env=base_env(1, **SERIAL), cwd=ROOT, stdout=out,
                          stderr=subprocess.STDOUT, start_new_session=True)


def _ctrl_c(proc):
  os.killpg(proc.pid, signal.SIGINT)


def _lines(path, word):
  with open(path) as f:
    text = f.read()
  assert 'Traceback' not in text, text[-3000:]
  return [x for x in text.splitlines() if word in x]


def test_ctrl_c_saves_at_the_step_exits_130_with_one_line_and_resumes_bit_identically(tmp_path, data, reference):
  args = (*ARGS, '--config.checkpoint_every=0')   # the Ctrl-C's checkpoint is the only one
  run, log = tmp_path / 'run', tmp_path / 'out.txt'
  with open(log, 'w') as out:
    proc = _start(run, data, args, out)
    try:
      assert _wait_for(lambda: os.path.exists(run / 'metrics.jsonl') and len(logged_losses(run)) >= 3, 180, proc)
      _ctrl_c(proc)
      assert proc.wait(timeout=60) == 130
    finally:
      if proc.poll() is None:
        proc.kill()
  saved = checkpoints(run)
  assert len(saved) == 1 and 3 <= saved[0] < 40, saved
  assert max(logged_losses(run)) == saved[0]          # it stopped at the step it saved
  lines = _lines(log, 'Ctrl-C')
  assert lines == [f'interrupted (Ctrl-C): checkpoint at step {saved[0]} written, exiting; rerun the same '
                   'command to resume'], lines
  assert not (run / 'fmjax.lock').exists()
  assert train_cli(run, data, *args, devices=1, env=SERIAL) == [0]
  want, got = reference[0], logged_losses(run)
  assert sorted(got) == list(range(1, 41))
  for step in range(1, 41):
    assert got[step] == want[step], step             # bit-identical (fp32, CPU, one thread)
  assert train_records(run) == reference[1]          # each step once, as the uninterrupted run logged it


def test_a_second_ctrl_c_aborts_at_once_and_the_last_complete_checkpoint_resumes(tmp_path, data, reference):
  run, log = tmp_path / 'run', tmp_path / 'out.txt'
  partial = re.compile(r'^(\d+)\.orbax-checkpoint-tmp')
  with open(log, 'w') as out:
    proc = _start(run, data, ARGS, out)
    try:
      assert _wait_for(lambda: 10 in checkpoints(run) and max(logged_losses(run), default=0) >= 12, 180, proc)
      _ctrl_c(proc)
      # the first asks for a checkpoint at the next step: send the second while that save is being written
      saving = lambda: any(partial.match(n) and int(partial.match(n).group(1)) > 10
                           for n in os.listdir(run / 'checkpoints'))
      _wait_for(saving, 30, proc)
      sent = time.time()
      _ctrl_c(proc)
      assert proc.wait(timeout=30) == 130
      took = time.time() - sent
    finally:
      if proc.poll() is None:
        proc.kill()
  assert took < 5, took
  complete = checkpoints(run)                         # finalised saves only (Orbax renames them into place)
  assert complete and complete[0] == 10, complete
  halfway = [int(partial.match(n).group(1)) for n in os.listdir(run / 'checkpoints') if partial.match(n)]
  assert all(s > complete[-1] for s in halfway), (halfway, complete)   # a half-written save is never the latest
  print(f'aborted with checkpoints {complete} complete and {halfway} half-written')
  lines = _lines(log, 'Ctrl-C')
  assert lines == [f'fmjax: aborted by a second Ctrl-C; the last complete checkpoint is step {complete[-1]}; rerun '
                   'the same command to resume from it'], lines
  assert not (run / 'fmjax.lock').exists()
  assert train_cli(run, data, *ARGS, devices=1, env=SERIAL) == [0]   # resumes from that checkpoint
  assert not [n for n in os.listdir(run / 'checkpoints') if partial.match(n)]   # the partial save is cleaned up
  want, got = reference[0], logged_losses(run)
  for step in range(complete[-1] + 1, 41):
    assert got[step] == want[step], step

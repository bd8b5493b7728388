"""The run lifecycle (fmjax/training/session.py): the one checkpoint writer, thin entry points, failed
starts that leave nothing behind, and Ctrl-C (one stop at a step boundary, a second one aborts).

The subprocess checks of Ctrl-C (exit code 130, one line, bit-identical resume) are in
tests/e2e/test_sigint.py."""

import ast
import json
import os
import pathlib
import signal
import sys
import threading
import time

import pytest

from fmjax import train
from fmjax.checkpoints import lock as workdir_lock
from fmjax.checkpoints import store
from fmjax.training import loop, objective, session
from helpers import losses_of, text_run_config

FMJAX = pathlib.Path(__file__).resolve().parents[2] / 'fmjax'


def _calls(path: pathlib.Path, name: str) -> list[int]:
  """Lines of `path` that call `name(...)` or `x.name(...)`."""
  lines = []
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Call):
      f = node.func
      if (isinstance(f, ast.Name) and f.id == name) or (isinstance(f, ast.Attribute) and f.attr == name):
        lines.append(node.lineno)
  return lines


def test_only_the_session_constructs_a_checkpoint_writer():
  writers, managers = {}, {}
  for path in sorted(FMJAX.rglob('*.py')):
    rel = str(path.relative_to(FMJAX.parent))
    if _calls(path, 'Checkpointer'):
      writers[rel] = _calls(path, 'Checkpointer')
    if _calls(path, 'CheckpointManager'):
      managers[rel] = _calls(path, 'CheckpointManager')
  assert list(writers) == ['fmjax/training/session.py'], writers
  assert len(writers['fmjax/training/session.py']) == 1      # one construction, in `_writer`
  assert list(managers) == ['fmjax/checkpoints/store.py'], managers   # nobody goes round the store


def _names(path: pathlib.Path) -> set[str]:
  """Every name, attribute and imported module of `path`."""
  out = set()
  for node in ast.walk(ast.parse(path.read_text())):
    if isinstance(node, ast.Name):
      out.add(node.id)
    elif isinstance(node, ast.Attribute):
      out.add(node.attr)
    elif isinstance(node, ast.ImportFrom):
      out.add(node.module or '')
      out.update(f'{node.module}.{a.name}' for a in node.names)
    elif isinstance(node, ast.Import):
      out.update(a.name for a in node.names)
  return out


@pytest.mark.parametrize('entry', ['train.py', 'finetune/run.py'])
def test_entry_points_hold_no_lifecycle_code(entry):
  names = _names(FMJAX / entry)
  lifecycle = {'lock_for_run', 'WorkdirLock', 'Checkpointer', 'MetricWriter', 'run_loop', 'PreemptionWatch',
               'ExitStack', 'check_compatible', 'resume_changes', 'make_metadata', 'make_mesh', 'PRNGKey',
               'fmjax.checkpoints.lock', 'fmjax.training.writers', 'fmjax.training.loop',
               'fmjax.checkpoints.resume', 'fmjax.checkpoints.store', 'fmjax.training.loop.run_loop'}
  assert not names & lifecycle, names & lifecycle
  assert 'fmjax.training.session' in names and 'run' in names   # session.run(cfg, objective, ...)


def test_a_reader_writes_nothing_and_refuses_to_save(tmp_path):
  import numpy as np
  directory = str(tmp_path / 'ckpt')
  assert session.write_checkpoint(directory, 3, {'w': np.arange(2.0)}, {'note': 'x'})
  assert not session.write_checkpoint(directory, 3, {'w': np.full(2, 9.0)}, {})   # the step is there: untouched
  before = sorted(os.listdir(directory))
  reader = store.Checkpointer.open_for_reading(directory)
  assert reader.latest_step() == 3 and reader.read_metadata(3) == {'note': 'x'}
  assert np.array_equal(reader.restore(3, {'w': np.zeros(2)})['w'], np.arange(2.0))
  with pytest.raises(store.CheckpointError, match='opened for reading'):
    reader.save(4, {'w': np.zeros(2)}, {})
  reader.close()
  assert sorted(os.listdir(directory)) == before
  assert store.finalised_steps(directory) == [3]
  try:
    store.Checkpointer.open_for_reading(str(tmp_path / 'absent')).close()
  except Exception:  # noqa: BLE001 - raising is fine; creating it is not
    pass
  assert not (tmp_path / 'absent').exists()


# --- a failed start leaves nothing behind ------------------------------------------------------------

def _failing(tmp_path, how):
  cfg = text_run_config(tmp_path, steps=2)
  if how == 'tokenizer':
    cfg.data.tokenizer = str(tmp_path / 'missing.model')
  elif how == 'mesh':
    cfg.mesh.data = 3                                     # 8 devices do not split into 3
  elif how == 'data':
    cfg.data.files = str(tmp_path / 'nothing' / '*.txt')   # found when the data is built, after the writers
  elif how == 'sharding':
    cfg.mesh.update(dict(data=1, fsdp=1, tensor=8))        # 2 kv heads over 8 tensor shards: found by the build
  return cfg


@pytest.mark.parametrize('how', ['tokenizer', 'mesh', 'data', 'sharding'])
def test_a_failed_fresh_start_removes_what_it_created(tmp_path, how):
  cfg = _failing(tmp_path, how)
  cfg.workdir = str(tmp_path / 'runs' / 'new' / 'w')        # none of these directories exist yet
  with pytest.raises(Exception) as e:
    train.train(cfg)
  assert not isinstance(e.value, KeyboardInterrupt)
  assert not (tmp_path / 'runs').exists(), list((tmp_path / 'runs').rglob('*'))


def test_a_failed_fresh_start_on_gs_leaves_no_object(tmp_path, gcs):
  from fmjax.runtime import paths
  cfg = _failing(tmp_path, 'sharding')
  cfg.workdir = f'{gcs}/failed-start/run'
  with pytest.raises(Exception):
    train.train(cfg)
  assert not paths.exists(cfg.workdir) or paths.listdir(cfg.workdir) == []
  done = text_run_config(tmp_path, workdir=f'{gcs}/failed-start/done', steps=2, checkpoint_every=1)
  train.train(done)                        # on an object store a finished save is told by its commit file
  assert store.finalised_steps(f'{done.workdir}/checkpoints') == [1, 2]


def test_a_failed_start_in_an_existing_directory_keeps_what_was_there(tmp_path):
  cfg = _failing(tmp_path, 'sharding')
  os.makedirs(cfg.workdir)
  (pathlib.Path(cfg.workdir) / 'notes.txt').write_text('mine')
  with pytest.raises(Exception):
    train.train(cfg)
  assert os.listdir(cfg.workdir) == ['notes.txt']


def test_a_failure_after_a_checkpoint_or_on_resume_keeps_everything(tmp_path):
  first = train.train(text_run_config(tmp_path, steps=2, checkpoint_every=2))
  workdir = pathlib.Path(tmp_path / 'workdir')
  before = sorted(p.name for p in workdir.iterdir())
  assert 'checkpoints' in before and 'config.json' in before and 'metrics.jsonl' in before
  cfg = text_run_config(tmp_path, steps=4, checkpoint_every=2, allow_config_change=True)
  cfg.mesh.update(dict(data=1, fsdp=1, tensor=8))
  with pytest.raises(Exception):
    train.train(cfg)
  assert sorted(p.name for p in workdir.iterdir()) == before
  assert store.finalised_steps(str(workdir / 'checkpoints')) == [2]
  assert first.last_step == 2


class _FailsInTheLoop(objective.Pretraining):
  """Pretraining whose evaluation fails at step 2: a failure after training started (a NaN stop, an OOM)."""

  def evaluation(self, s):
    def evaluate(state, step):
      if step == 2:
        raise RuntimeError('failed in the loop')
      return {}
    return evaluate, 1


def test_a_failure_once_training_started_keeps_its_logs(tmp_path):
  cfg = text_run_config(tmp_path, steps=4, checkpoint_every=0)
  with pytest.raises(RuntimeError, match='failed in the loop'):
    session.run(cfg, _FailsInTheLoop())
  kept = sorted(p.name for p in pathlib.Path(cfg.workdir).iterdir())
  assert 'config.json' in kept and 'metrics.jsonl' in kept and 'tensorboard' in kept, kept
  steps = [json.loads(line)['step'] for line in open(os.path.join(cfg.workdir, 'metrics.jsonl'))]
  assert 1 in steps


# --- Ctrl-C ---------------------------------------------------------------------------------------

class _CtrlCAt(objective.Pretraining):
  """Pretraining that sends this process a real SIGINT while evaluating step `at` (eval every step)."""

  def __init__(self, at: int):
    self.at = at

  def evaluation(self, s):
    def evaluate(state, step):
      if step == self.at:
        os.kill(os.getpid(), signal.SIGINT)
      return {}
    return evaluate, 1


@pytest.mark.slow   # a whole run: with the slow suite (CI runs both)
def test_ctrl_c_checkpoints_at_the_next_step_and_the_rerun_resumes(tmp_path, capsys):
  ref = text_run_config(tmp_path, steps=6, checkpoint_every=0)
  ref.workdir = str(tmp_path / 'ref')
  ref = train.train(ref)
  cfg = text_run_config(tmp_path, steps=6, checkpoint_every=0)
  with pytest.raises(KeyboardInterrupt) as e:
    session.run(cfg, _CtrlCAt(3))
  assert isinstance(e.value, session.RunInterrupted) and isinstance(e.value, SystemExit)
  assert e.value.code == 130
  result = e.value.result
  assert result.interrupted and result.preempted and result.last_step == 4   # asked during step 3's eval
  assert store.finalised_steps(os.path.join(cfg.workdir, 'checkpoints')) == [4]
  assert not os.path.exists(os.path.join(cfg.workdir, workdir_lock.LOCK_FILE))
  out = capsys.readouterr()
  lines = [x for x in (out.out + out.err).splitlines() if 'Ctrl-C' in x]
  assert lines == ['interrupted (Ctrl-C): checkpoint at step 4 written, exiting; rerun the same command to resume']
  assert 'Traceback' not in out.out + out.err
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler   # the handlers are put back
  resumed = train.train(text_run_config(tmp_path, steps=6, checkpoint_every=0))
  assert sorted(losses_of(resumed)) == [5, 6]
  for step in (5, 6):
    assert losses_of(resumed)[step] == pytest.approx(losses_of(ref)[step], rel=1e-5)


def _wait(predicate, timeout=10.0):
  deadline = time.time() + timeout
  while time.time() < deadline and not predicate():
    time.sleep(0.01)
  return predicate()


@pytest.mark.parametrize('armed', [False, True])
def test_a_second_ctrl_c_aborts_at_once_from_the_abort_thread(capsys, armed):
  exits = []
  wakeup_before = signal.set_wakeup_fd(-1)
  signal.set_wakeup_fd(wakeup_before)

  def exit_(code):
    exits.append((code, threading.current_thread() is threading.main_thread(), time.time()))

  watch = loop.PreemptionWatch(on_abort=lambda: 'fmjax: aborted by a second Ctrl-C; test', exit=exit_)
  try:
    if armed:   # the loop: the first one asks to stop at the next step
      watch.arm()
      os.kill(os.getpid(), signal.SIGINT)
      assert _wait(lambda: watch.requested) and watch.interrupted
    else:       # set-up: the first one raises KeyboardInterrupt as usual
      with pytest.raises(KeyboardInterrupt):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
    assert not exits
    sent = time.time()
    try:
      os.kill(os.getpid(), signal.SIGINT)
      assert _wait(lambda: exits, timeout=5)
    except KeyboardInterrupt:   # unarmed, the main thread gets its usual KeyboardInterrupt too
      assert not armed and _wait(lambda: exits, timeout=5)
  finally:
    watch.close()
  (code, on_main_thread, at), = exits
  assert code == 130 and not on_main_thread and at - sent < 2
  lines = [x for x in capsys.readouterr().err.splitlines() if 'Ctrl-C' in x]
  assert lines == ['fmjax: aborted by a second Ctrl-C; test']
  assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
  assert signal.set_wakeup_fd(wakeup_before) == wakeup_before      # the wakeup fd is put back


def test_a_ctrl_c_during_set_up_stops_at_once_and_leaves_nothing(tmp_path, capsys):
  class CtrlCInBuild(objective.Pretraining):
    def build(self, s):
      os.kill(os.getpid(), signal.SIGINT)
      time.sleep(5)   # interrupted: KeyboardInterrupt, as in any Python code
      raise AssertionError('not interrupted')

  cfg = text_run_config(tmp_path, steps=4)
  with pytest.raises(session.RunInterrupted) as e:
    session.run(cfg, CtrlCInBuild())
  assert e.value.code == 130 and e.value.result is None
  assert not os.path.exists(cfg.workdir)
  err = capsys.readouterr().err
  assert [x for x in err.splitlines() if 'Ctrl-C' in x] == [f'fmjax: interrupted (Ctrl-C); no checkpoint was written, and what this run created '
                              f'in {cfg.workdir} is removed']


def test_run_interrupted_exits_130_silently():
  import subprocess
  code = 'from fmjax.training.session import RunInterrupted\nraise RunInterrupted()\n'
  proc = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, timeout=120,
                        env={**os.environ, 'JAX_PLATFORMS': 'cpu'})
  assert proc.returncode == 130 and 'Traceback' not in proc.stderr, proc.stderr


@pytest.mark.slow   # a whole run: with the slow suite (CI runs both)
def test_a_finished_fine_tune_reruns_with_nothing_to_do_and_the_same_answer(pretrained, tmp_path, capsys):
  from fmjax.finetune import finetune
  from helpers import ft_config
  cfg = ft_config(pretrained, tmp_path, lora_rank=4)
  cfg.steps, cfg.eval_every = 4, 2
  first = finetune(cfg.copy_and_resolve_references())
  assert first['last_step'] == 4 and store.finalised_steps(str(tmp_path / 'ft' / 'adapters')) == [4]
  capsys.readouterr()
  again = finetune(cfg.copy_and_resolve_references())
  assert 'nothing to do: the checkpoint is at step 4 and steps=4' in capsys.readouterr().out
  assert again['last_step'] == 4 and again['best'] == first['best']
  assert again['summary']['best_step'] == first['summary']['best_step']
  assert store.finalised_steps(str(tmp_path / 'ft' / 'adapters')) == [4]

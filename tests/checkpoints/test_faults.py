"""Faults become one line naming the file and what to do: disk full, damaged checkpoints, garbage data
state, non-UTF-8 fine-tuning data."""

import errno
import glob
import json
import os
import re
import shutil
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from etils import epath

from fmjax import config
from fmjax.checkpoints import store as checkpoint
from fmjax.checkpoints.store import Checkpointer, CheckpointError, WorkdirWriteError
from fmjax.data import labeled, stream_set
from fmjax.data.errors import DataError
from fmjax.training.writers import MetricWriter
from helpers import write_corpus

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def small_state(seed: int = 0) -> dict:
  keys = jax.random.split(jax.random.PRNGKey(seed), 3)
  return {'params': {'w': jax.random.normal(keys[0], (64, 32)), 'b': jax.random.normal(keys[1], (32,))},
          'count': jnp.asarray(seed, jnp.int32)}


def assert_one_clean_line(message: str) -> None:
  assert '\n' not in message
  assert '<bound method' not in message and 'TensorStore(' not in message and 'tensorstore_spec' not in message


def assert_same(a, b) -> None:
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


# --- disk full while saving ----------------------------------------------------------------------

@pytest.fixture
def full_disk_for_step(monkeypatch):
  """Make the lowest-level writer Orbax's JSON items use (etils' write_text) fail with ENOSPC for one step."""
  cls = type(epath.Path('/'))
  real = cls.write_text
  failing = {}

  def write_text(self, data, *args, **kwargs):
    step = failing.get('step')
    if step is not None and f'{os.sep}{step}.orbax-checkpoint-tmp' in str(self) and self.name == 'metadata':
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
    return real(self, data, *args, **kwargs)

  monkeypatch.setattr(cls, 'write_text', write_text)
  return failing


@pytest.mark.parametrize('async_save', [True, False])
def test_a_save_on_a_full_disk_is_one_line_and_keeps_the_earlier_checkpoint(tmp_path, full_disk_for_step,
                                                                            async_save):
  ckpt = Checkpointer(str(tmp_path / 'ckpt'), keep=3, async_save=async_save)
  ckpt.save(1, small_state(1), {'note': 'one'})
  ckpt.wait()
  full_disk_for_step['step'] = 2
  with pytest.raises(WorkdirWriteError) as e:
    ckpt.save(2, small_state(2), {'note': 'two'})
    ckpt.wait()
  message = str(e.value)
  assert_one_clean_line(message)
  assert isinstance(e.value, CheckpointError)      # the CLIs print it as one line and exit 2
  assert f'cannot save checkpoint 2 in {ckpt.directory}: no space left on device' in message
  assert 'meta' in message and 'checkpoint 1 is intact' in message and 'free disk space' in message
  ckpt.close()
  again = Checkpointer(str(tmp_path / 'ckpt'), async_save=False)
  assert again.latest_step() == 1
  assert_same(again.restore(1, checkpoint.abstract_like(small_state(1))), small_state(1))
  assert again.read_metadata(1) == {'note': 'one'}
  again.close()


def test_a_failed_async_save_is_raised_by_check_before_the_next_save(tmp_path, full_disk_for_step):
  ckpt = Checkpointer(str(tmp_path / 'ckpt'), keep=3, async_save=True)
  ckpt.save(1, small_state(1), {})
  ckpt.wait()
  full_disk_for_step['step'] = 2
  ckpt.save(2, small_state(2), {})                 # returns while the write goes on in the background
  deadline = time.time() + 60
  with pytest.raises(WorkdirWriteError, match='cannot save checkpoint 2 .*no space left on device'):
    while time.time() < deadline:
      ckpt.check()                                 # never blocks; raises once the background save failed
      time.sleep(0.05)
  ckpt.check()                                     # reported once
  ckpt.close()


def test_a_sync_save_that_succeeds_raises_nothing_and_check_is_quiet(tmp_path):
  ckpt = Checkpointer(str(tmp_path / 'ckpt'), async_save=True)
  ckpt.save(3, small_state(3), {'x': 1})
  ckpt.check()
  ckpt.close()
  assert Checkpointer(str(tmp_path / 'ckpt')).read_metadata(3) == {'x': 1}


def test_a_full_disk_on_the_metrics_log_is_one_line(tmp_path):
  os.symlink('/dev/full', tmp_path / 'metrics.jsonl')   # every write: ENOSPC, a real OS error
  writer = MetricWriter(str(tmp_path), total_steps=5, enabled=True, progress_bar=False)
  with pytest.raises(WorkdirWriteError) as e:
    writer.write(1, {'loss': 1.0})
  assert_one_clean_line(str(e.value))
  assert 'metrics.jsonl: no space left on device; free disk space' in str(e.value)
  writer.write(2, {'loss': 1.0})                   # no second report, no hang
  writer.close()


# --- a damaged checkpoint -------------------------------------------------------------------------

def _truncate_data(step_dir):
  files = glob.glob(os.path.join(step_dir, 'state', '**', 'd', '*'), recursive=True)
  assert files
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(8)


def _garble(name):
  def damage(step_dir):
    paths = glob.glob(os.path.join(step_dir, '**', name), recursive=True)
    assert paths
    for path in paths:
      with open(path, 'w') as f:
        f.write('garbage')
  return damage


@pytest.mark.parametrize('damage, names', [
    (_truncate_data, r'array (params\.w|params\.b|count) in \S+/2/state: '),
    (_garble('manifest.ocdbt'), r'\S+/2/state/manifest\.ocdbt \(array \S+\): error decoding manifest'),
    (_garble('_METADATA'), r'\S+/2/state/_METADATA is not valid JSON'),
])
def test_a_damaged_checkpoint_names_the_step_the_file_and_the_intact_one(tmp_path, damage, names):
  directory = str(tmp_path / 'ckpt')
  ckpt = Checkpointer(directory, async_save=False)
  for step in (1, 2):
    ckpt.save(step, small_state(step), {'step': step})
  ckpt.close()
  damage(os.path.join(directory, '2'))
  ckpt = Checkpointer(directory, async_save=False)
  with pytest.raises(CheckpointError) as e:
    ckpt.restore(2, checkpoint.abstract_like(small_state(2)))
  message = str(e.value)
  assert_one_clean_line(message)
  assert message.startswith(f'cannot restore checkpoint 2 in {directory}: it is damaged: ')
  assert re.search(names, message), message
  assert f'checkpoint 1 is intact: move this one aside (mv {directory}/2 {directory}/2.bad)' in message
  ckpt.close()
  os.rename(os.path.join(directory, '2'), os.path.join(directory, '2.bad'))   # what the message says
  ckpt = Checkpointer(directory, async_save=False)
  assert ckpt.latest_step() == 1
  assert_same(ckpt.restore(1, checkpoint.abstract_like(small_state(1))), small_state(1))
  ckpt.close()


def test_damaged_metadata_of_the_only_checkpoint(tmp_path):
  directory = str(tmp_path / 'ckpt')
  ckpt = Checkpointer(directory, async_save=False)
  ckpt.save(5, small_state(5), {'a': 1})
  ckpt.close()
  with open(os.path.join(directory, '5', 'meta', 'metadata'), 'w') as f:
    f.write('{"a": ')
  with pytest.raises(CheckpointError) as e:
    Checkpointer(directory, async_save=False).read_metadata(5)
  message = str(e.value)
  assert_one_clean_line(message)
  assert f'cannot read the metadata of checkpoint 5 in {directory}: it is damaged: ' in message
  assert f'{directory}/5/meta/metadata is not valid JSON' in message
  assert 'no earlier checkpoint is intact' in message


def test_a_checkpoint_of_another_shape_is_not_called_damaged(tmp_path):
  directory = str(tmp_path / 'ckpt')
  ckpt = Checkpointer(directory, async_save=False)
  ckpt.save(1, small_state(1), {})
  ckpt.save(2, small_state(2), {})
  other = {'params': {'w': jnp.zeros((64, 32)), 'b': jnp.zeros((32,)), 'extra': jnp.zeros(3)},
           'count': jnp.zeros((), jnp.int32)}
  with pytest.raises(CheckpointError) as e:
    ckpt.restore(2, checkpoint.abstract_like(other))
  ckpt.close()
  assert_one_clean_line(str(e.value))
  assert 'damaged' not in str(e.value) and 'aside' not in str(e.value)   # never advise discarding a good one
  assert 'made with this model config' in str(e.value)


# --- garbage data-iterator state --------------------------------------------------------------------

def test_garbage_data_state_json_is_one_line_naming_the_file(tmp_path):
  data_dir = tmp_path / 'checkpoints' / '8' / 'data'
  data_dir.mkdir(parents=True)
  (data_dir / 'process_0-of-1.json').write_bytes(b'{"num_streams": 2, "streams": {"0": \x00garbage')
  with pytest.raises(DataError) as e:
    stream_set.read_saved_state(str(data_dir))
  message = str(e.value)
  assert_one_clean_line(message)
  assert f"the checkpoint's data state {data_dir}/process_0-of-1.json is unreadable (not valid JSON" in message
  assert f'move {tmp_path}/checkpoints/8 aside' in message
  (data_dir / 'process_0-of-1.json').write_text('[1, 2]')
  with pytest.raises(DataError, match="process_0-of-1.json is unreadable: not a mapping with 'streams'"):
    stream_set.read_saved_state(str(data_dir))


def test_a_malformed_stream_entry_is_one_line(tmp_path):
  class Stream:  # the protocol of a per-stream iterator: set_state reads its own keys
    def set_state(self, state):
      self.position = state['parent']['next_index']

  iterator = stream_set.StreamSetIterator(lambda s, rows: Stream(), range(2), num_streams=2, batch_size=2)
  iterator.set_state(json.dumps({'num_streams': 2, 'streams': {'0': {'parent': {'next_index': 3}},
                                                                '1': {'parent': {'next_index': 4}}}}))
  with pytest.raises(DataError, match="stream 1 has a malformed entry .KeyError: 'parent'."):
    iterator.set_state({'num_streams': 2, 'streams': {'0': {'parent': {'next_index': 3}}, '1': {}}})
  with pytest.raises(DataError, match="data state is unreadable .not valid JSON"):
    iterator.set_state(b'\xff\xfe')


# --- encodings of fine-tuning data -------------------------------------------------------------------

def finetune_files(tmp_path, source, text: str, encoding: str):
  ft = config.base_config().finetune
  ft.source = source
  tmp_path.mkdir(parents=True, exist_ok=True)
  path = tmp_path / f'train.{source}'
  path.write_bytes(text.encode(encoding))
  ft.train_files = str(path)
  return ft, str(path)


@pytest.mark.parametrize('source, text, line', [
    ('csv', 'text,label\nplain words,a\nun café noir,b\n', 3),
    ('jsonl', '{"text": "plain", "label": "a"}\n{"text": "déjà vu", "label": "b"}\n', 2),
])
def test_a_latin1_file_is_one_line_naming_the_byte_and_line(tmp_path, source, text, line):
  ft, path = finetune_files(tmp_path, source, text, 'latin-1')
  offset = text.encode('latin-1').index(b'\xe9')
  with pytest.raises(DataError) as e:
    labeled.load_split(ft, 'train', ['text', 'label'])
  message = str(e.value)
  assert_one_clean_line(message)
  assert f'{path} is not UTF-8: byte 0xe9 at offset {offset} (line {line},' in message
  assert 'save it as UTF-8' in message


@pytest.mark.parametrize('source, text', [
    ('csv', 'text,label\nplain words,a\nun café noir,b\n'),
    ('jsonl', '{"text": "plain words", "label": "a"}\n{"text": "un café noir", "label": "b"}\n'),
])
def test_utf8_with_and_without_bom_reads_the_same(tmp_path, source, text):
  plain = labeled.load_split(finetune_files(tmp_path / 'a', source, text, 'utf-8')[0], 'train', ['text', 'label'])
  bom = labeled.load_split(finetune_files(tmp_path / 'b', source, text, 'utf-8-sig')[0], 'train', ['text', 'label'])
  assert plain == bom == {'text': ['plain words', 'un café noir'], 'label': ['a', 'b']}


# --- a real full disk: a small tmpfs (needs root) ---------------------------------------------------

def _mount_tmpfs(directory, size: str) -> bool:
  os.makedirs(directory, exist_ok=True)
  if not hasattr(os, 'geteuid') or os.geteuid() != 0 or shutil.which('mount') is None:
    return False
  return subprocess.run(['mount', '-t', 'tmpfs', '-o', f'size={size}', 'tmpfs', str(directory)],
                        capture_output=True).returncode == 0


@pytest.mark.slow
def test_train_on_a_full_disk_exits_2_with_one_line_and_resumes_after_space_is_freed(tmp_path):
  disk = tmp_path / 'disk'
  if not _mount_tmpfs(disk, '700k'):
    pytest.skip('mounting a tmpfs needs root (mount -t tmpfs); the injected-failure tests above still run')
  try:
    files = write_corpus(tmp_path / 'corpus', n_files=24)
    workdir = disk / 'w'
    env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
    env.update(JAX_PLATFORMS='cpu', FMJAX_NUM_CPU_DEVICES='1', PYTHONUNBUFFERED='1')
    command = [sys.executable, '-m', 'fmjax.train', '--config', os.path.join(ROOT, 'tests', 'configs', 'tiny.py'),
               '--workdir', str(workdir), f'--config.data.files={files}',
               f'--config.data.cache_dir={tmp_path / "cache"}', '--config.log_every=100']
    # A checkpoint of the tiny model takes ~480 KB: step 4 fits in 700 KB, step 8 does not.
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    lines = run.stderr.strip().splitlines()
    assert run.returncode == 2, run.stderr[-3000:]
    assert len(lines) <= 3, run.stderr[-3000:]
    assert 'fmjax.train: error: cannot save checkpoint 8' in lines[-1]
    assert 'no space left on device' in lines[-1] and 'checkpoint 4 is intact' in lines[-1]
    assert sorted(n for n in os.listdir(workdir / 'checkpoints') if n.isdigit()) == ['4']
    for partial in glob.glob(str(workdir / 'checkpoints' / '8.orbax-checkpoint-tmp*')):
      shutil.rmtree(partial)                       # what the message says can be deleted
    subprocess.run(['mount', '-o', 'remount,size=4m', str(disk)], check=True)
    run = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert run.returncode == 0, run.stderr[-3000:]
    assert f'resumed from {workdir}/checkpoints/4' in run.stdout + run.stderr
    with open(workdir / 'metrics.jsonl') as f:
      steps = [json.loads(line)['step'] for line in f]
    assert steps == sorted(set(steps))            # each step once after the resume
  finally:
    subprocess.run(['umount', '-l', str(disk)], capture_output=True)

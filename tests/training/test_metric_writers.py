"""metrics.jsonl and TensorBoard after a resume, strict JSON, eval lines on the console with the bar."""

import glob
import io
import json
import math
import os
import struct

import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from fmjax.training.writers import MetricWriter, keep_steps_up_to


def strict_records(path):
  """Every line parsed as strict JSON (a bare NaN / Infinity fails)."""
  def refuse(name):
    raise ValueError(f'non-standard JSON constant {name}')
  with open(path) as f:
    return [json.loads(line, parse_constant=refuse) for line in f]


def metrics_for(step, stale_after=None):
  """A step's scalars; the steps of a killed run after its last checkpoint (`stale_after`) log other values, so
  a stale point is told apart from its resumed replacement."""
  stale = stale_after is not None and step > stale_after
  return {'loss': 10.0 / step + (100.0 if stale else 0.0), 'grad_norm': float(step)}


def run_writer(workdir, steps, resume_step=None, progress_bar=False, killed_after=None):
  """Write `steps`; `killed_after`: the run will be killed, its last checkpoint is that step."""
  writer = MetricWriter(str(workdir), total_steps=10, enabled=True, progress_bar=progress_bar,
                        resume_step=resume_step)
  for s in steps:
    writer.write(s, metrics_for(s, killed_after))
  writer.close()


def tb_file_events(path):
  """The events of one TensorBoard event file (TFRecord framing read by hand)."""
  events, data = [], open(path, 'rb').read()
  i = 0
  while i < len(data):
    (n,) = struct.unpack('<Q', data[i:i + 8])
    events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
    i += 12 + n + 4
  return events


def tb_events(workdir):
  """All events of all TensorBoard event files, file by file, in the order the writers were opened."""
  out = [tb_file_events(p) for p in glob.glob(os.path.join(str(workdir), 'tensorboard', 'events.*'))]
  return sorted(out, key=lambda events: events[0].wall_time)


def test_resumed_writer_keeps_each_step_once_and_matches_an_uninterrupted_log(tmp_path):
  run_writer(tmp_path / 'ref', range(1, 11))
  run_writer(tmp_path / 'run', range(1, 11), killed_after=6)   # killed after step 10
  run_writer(tmp_path / 'run', range(7, 11), resume_step=6)
  got = strict_records(tmp_path / 'run' / 'metrics.jsonl')
  assert [r['step'] for r in got] == list(range(1, 11))
  assert got == strict_records(tmp_path / 'ref' / 'metrics.jsonl')
  assert not os.path.exists(tmp_path / 'run' / 'metrics.jsonl.tmp')


def test_without_resume_step_the_log_is_appended_to(tmp_path):
  run_writer(tmp_path, range(1, 4))
  run_writer(tmp_path, range(3, 5))
  assert [r['step'] for r in strict_records(tmp_path / 'metrics.jsonl')] == [1, 2, 3, 3, 4]


def test_resumed_tensorboard_purges_the_steps_after_the_checkpoint(tmp_path):
  run_writer(tmp_path, range(1, 11), killed_after=6)   # killed after step 10, last checkpoint at 6
  run_writer(tmp_path, range(7, 11), resume_step=6)
  first, second = tb_events(tmp_path)
  # The earlier file is cut back to the checkpoint: no reader sees the killed run's steps 7-10 ...
  assert sorted({e.step for e in first if e.summary.value}) == list(range(1, 7))
  assert first[0].file_version == 'brain.Event:2'
  # ... and a TensorBoard that loaded them before the resume drops them at the START event.
  starts = [e for e in second if e.HasField('session_log')]
  assert starts and starts[0].step == 7 and starts[0].session_log.status == event_pb2.SessionLog.START
  assert sorted({e.step for e in second if e.summary.value}) == [7, 8, 9, 10]


@pytest.mark.parametrize('purge', [True, False])
def test_tensorboard_itself_shows_each_step_once_with_the_resumed_values(tmp_path, purge):
  from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
  run_writer(tmp_path / 'ref', range(1, 11))
  run_writer(tmp_path / 'run', range(1, 11), killed_after=6)
  run_writer(tmp_path / 'run', range(7, 9), resume_step=6, killed_after=7)   # killed again at 8
  run_writer(tmp_path / 'run', range(8, 11), resume_step=7)
  def scalars(workdir):
    # purge_orphaned_data=False: a reader without TensorBoard's purge semantics sees the files as they are
    acc = EventAccumulator(str(workdir / 'tensorboard'), purge_orphaned_data=purge)
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()['scalars']}
  got, want = scalars(tmp_path / 'run'), scalars(tmp_path / 'ref')
  assert got == want and [s for s, _ in got['train/loss']] == list(range(1, 11))


def test_event_files_opened_within_one_second_sort_in_creation_order(tmp_path, monkeypatch):
  for segment, pid in enumerate((9, 10, 100)):   # process ids that sort the other way round as text
    monkeypatch.setattr(os, 'getpid', lambda pid=pid: pid)
    run_writer(tmp_path, [segment + 1], resume_step=segment)
  monkeypatch.undo()
  names = sorted(os.listdir(tmp_path / 'tensorboard'))   # TensorBoard reads a run's files in name order
  steps = [[e.step for e in events if e.summary.value] for events in tb_events(tmp_path)]
  by_name = [[e.step for e in tb_file_events(tmp_path / 'tensorboard' / n) if e.summary.value] for n in names]
  assert by_name == steps == [[1], [2], [3]]


def test_resume_cuts_a_torn_event_file_back_to_whole_records(tmp_path):
  run_writer(tmp_path, range(1, 6))
  (path,) = glob.glob(os.path.join(str(tmp_path), 'tensorboard', 'events.*'))
  with open(path, 'ab') as f:
    f.write(struct.pack('<Q', 64) + bytes(4) + b'\x08')   # a kill in the middle of a record
  run_writer(tmp_path, range(4, 6), resume_step=3)
  first, second = tb_events(tmp_path)
  assert [e.step for e in first if e.summary.value] == [1, 2, 3]
  assert [e.step for e in second if e.summary.value] == [4, 5]


def test_a_resume_before_any_logged_step_removes_the_empty_file(tmp_path):
  run_writer(tmp_path, range(5, 7))
  run_writer(tmp_path, range(1, 3), resume_step=0)   # a restart from scratch
  (events,) = tb_events(tmp_path)
  assert [e.step for e in events if e.summary.value] == [1, 2]


def test_nan_and_inf_are_null_and_keep_their_key(tmp_path):
  writer = MetricWriter(str(tmp_path), total_steps=3, enabled=True, progress_bar=False)
  writer.write(1, {'loss': float('nan'), 'grad_norm': float('inf'), 'lr': 0.5})
  writer.write(2, {'loss': -float('inf')}, prefix='eval')
  writer.close()
  assert strict_records(tmp_path / 'metrics.jsonl') == [
      {'step': 1, 'split': 'train', 'loss': None, 'grad_norm': None, 'lr': 0.5},
      {'step': 2, 'split': 'eval', 'loss': None}]


def test_resume_cleans_an_old_log_with_bare_nan_and_a_torn_last_line(tmp_path):
  path = tmp_path / 'metrics.jsonl'
  path.write_text('{"step": 1, "split": "train", "loss": NaN}\n{"step": 2, "split": "train", "loss": 1.5}\n'
                  '{"step": 3, "split": "tr')
  assert keep_steps_up_to(str(path), 2) == 1
  assert strict_records(path) == [{'step': 1, 'split': 'train', 'loss': None},
                                  {'step': 2, 'split': 'train', 'loss': 1.5}]


def test_eval_metrics_reach_the_console_with_the_progress_bar(tmp_path, capsys):
  writer = MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress_bar=True)
  writer.write(5, {'loss': 2.25, 'tokens_per_s': 100.0})
  writer.advance(5)
  writer.write(5, {'loss': 3.125, 'bits_per_byte': 1.5}, prefix='eval')
  writer.close()
  err = capsys.readouterr().err
  assert '[eval] step 5: loss=3.125 bits_per_byte=1.5' in err
  assert '[train] step 5' not in err           # train metrics go to the bar's postfix only


def test_flush_puts_tensorboard_events_on_disk_before_close(tmp_path):
  writer = MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress_bar=False)
  writer.write(3, {'loss': 1.0})
  writer.flush()
  (events,) = tb_events(tmp_path)
  values = [(e.step, v.tag, v.simple_value) for e in events for v in e.summary.value]
  writer.close()
  assert (3, 'train/loss', 1.0) in values


def test_a_disabled_writer_writes_nothing(tmp_path):
  writer = MetricWriter(str(tmp_path), total_steps=10, enabled=False, resume_step=3)
  writer.write(1, {'loss': math.pi})
  writer.flush()
  writer.close()
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize('prefix', ['train', 'eval'])
def test_values_survive_the_round_trip(tmp_path, prefix):
  writer = MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress_bar=False)
  writer.write(4, {'loss': math.pi, 'acc': 1e-30}, prefix=prefix)
  writer.close()
  assert strict_records(tmp_path / 'metrics.jsonl') == [{'step': 4, 'split': prefix, 'loss': math.pi,
                                                         'acc': 1e-30}]


def test_tensorboard_events_reach_the_disk_every_flush_interval(tmp_path, monkeypatch):
  from fmjax.training import writers as metric_writers
  monkeypatch.setattr(metric_writers, 'FLUSH_SECONDS', 0.0)
  writer = MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress_bar=False)
  writer.write(2, {'loss': 0.5})
  (events,) = tb_events(tmp_path)                  # no flush() and no close(): on disk already
  writer.close()
  assert [(e.step, v.tag) for e in events for v in e.summary.value] == [(2, 'train/loss')]


def test_image_reaches_tensorboard_as_a_png(tmp_path):
  pixels = np.zeros((12, 20, 3), np.uint8)
  pixels[:, :10, 0] = 255   # left half red
  writer = MetricWriter(str(tmp_path), 10, progress_bar=False, enabled=True)
  writer.image('eval/confusion', pixels, step=4)
  writer.close()
  images = [(e.step, v) for events in tb_events(tmp_path) for e in events for v in e.summary.value if v.HasField('image')]
  assert len(images) == 1 and images[0][0] == 4 and images[0][1].tag == 'eval/confusion'
  from PIL import Image
  decoded = np.asarray(Image.open(io.BytesIO(images[0][1].image.encoded_image_string)).convert('RGB'))
  np.testing.assert_array_equal(decoded, pixels)


def test_progress_bar_keeps_the_train_loss_and_shows_the_eval_loss_beside_it(tmp_path):
  writer = MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress_bar=True)
  writer.write(5, {'loss': 2.25, 'tokens_per_s': 12345.0, 'grad_norm': 0.5})
  writer.write(5, {'loss': 3.125, 'bits_per_byte': 1.5}, prefix='eval')
  after_eval = dict(writer.postfix), writer._bar.postfix  # pylint: disable=protected-access
  writer.write(6, {'loss': 2.0, 'tokens_per_s': 23456.0})
  after_train = dict(writer.postfix), writer._bar.postfix  # pylint: disable=protected-access
  writer.close()
  assert after_eval[0] == {'loss': '2.25', 'tokens_per_s': '12,345', 'eval_loss': '3.12'}
  assert after_train[0] == {'loss': '2', 'tokens_per_s': '23,456', 'eval_loss': '3.12'}
  assert 'eval_loss=3.12' in after_eval[1] and 'loss=2.25' in after_eval[1].replace('eval_loss', '')
  assert 'loss=2,' in after_train[1].replace('eval_loss', '') and 'eval_loss=3.12' in after_train[1]


@pytest.mark.parametrize('progress_bar', [True, False])
def test_console_false_keeps_a_split_off_the_console_but_in_the_files(tmp_path, capsys, progress_bar):
  writer = MetricWriter(str(tmp_path), total_steps=10, enabled=True, progress_bar=progress_bar)
  writer.write(4, {'eval/accuracy': 0.5}, prefix='baseline', console=False)
  writer.write(4, {'accuracy': 0.75}, prefix='eval')
  writer.close()
  out = capsys.readouterr()
  assert '[eval] step 4: accuracy=0.75' in out.out + out.err and '[baseline]' not in out.out + out.err
  assert [r['split'] for r in strict_records(tmp_path / 'metrics.jsonl')] == ['baseline', 'eval']
  assert [(e.step, v.tag) for events in tb_events(tmp_path) for e in events for v in e.summary.value] == [
      (4, 'baseline/eval/accuracy'), (4, 'eval/accuracy')]


def test_a_resume_on_gs_cuts_the_uploaded_event_files_back_too(tmp_path, gcs):
  from fmjax.runtime import paths
  remote = f'{gcs}/resumed-tensorboard-{os.getpid()}'
  run_writer(remote, range(1, 11), killed_after=6)
  run_writer(remote, range(7, 11), resume_step=6)
  local = tmp_path / 'downloaded' / 'tensorboard'
  local.mkdir(parents=True)
  for name in paths.listdir(f'{remote}/tensorboard'):
    (local / name).write_bytes(paths.read_bytes(f'{remote}/tensorboard/{name}'))
  first, second = tb_events(tmp_path / 'downloaded')
  assert sorted({e.step for e in first if e.summary.value}) == list(range(1, 7))
  assert [(e.step, v.simple_value) for e in second for v in e.summary.value if v.tag == 'train/loss'] == [
      (s, pytest.approx(metrics_for(s)['loss'])) for s in range(7, 11)]

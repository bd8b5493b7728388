"""Weights & Biases beside metrics.jsonl: a real (offline) W&B run receives the same train and eval scalars at the
same steps, a resumed run continues the same W&B run id, and misconfigurations are one-line errors. The offline
run's .wandb file is read back record by record (its LevelDB-log framing and W&B's protobuf records)."""

import glob
import json
import os
import shutil
import struct
import sys

import pytest

wandb = pytest.importorskip('wandb')
from wandb.proto import wandb_internal_pb2  # noqa: E402

from fmjax import train  # noqa: E402
from fmjax.training import wandb_run  # noqa: E402
from fmjax.training.writers import MetricWriter  # noqa: E402
from helpers import text_run_config, tiny_config  # noqa: E402

BLOCK = 32768   # the .wandb file is a LevelDB log: 32 KiB blocks of framed chunks after a 7-byte W&B header


def wandb_records(path):
  """The protobuf Records of one .wandb file."""
  data = open(path, 'rb').read()
  assert data[:4] == b':W&B'
  pos, out, parts = 7, [], b''
  while pos + 7 <= len(data):
    if BLOCK - pos % BLOCK < 7:          # a block's tail too short for a header is padding
      pos += BLOCK - pos % BLOCK
      continue
    _, n, kind = struct.unpack('<IHB', data[pos:pos + 7])
    parts += data[pos + 7:pos + 7 + n]
    pos += 7 + n
    if kind in (1, 4):                   # FULL or LAST chunk: a whole record
      out.append(wandb_internal_pb2.Record.FromString(parts))
      parts = b''
  return out


def offline_runs(wandb_dir):
  """[(run record, {step: {tag: value}}, config {key: value})] of each offline run under wandb_dir, oldest first."""
  out = []
  for path in sorted(glob.glob(os.path.join(str(wandb_dir), 'wandb', 'offline-run-*', 'run-*.wandb'))):
    run, history, cfg = None, {}, {}
    for r in wandb_records(path):
      kind = r.WhichOneof('record_type')
      if kind == 'run':
        run = r.run
      elif kind == 'config':
        cfg.update({i.key: json.loads(i.value_json) for i in r.config.update})
      elif kind == 'history':
        row = {i.key or '/'.join(i.nested_key): json.loads(i.value_json) for i in r.history.item}
        history[r.history.step.num] = {k: v for k, v in row.items() if not k.startswith('_')}
    out.append((run, history, cfg))
  return out


def jsonl_by_step(workdir):
  """{step: {split/name: value}} of metrics.jsonl, the later record of a repeated key winning."""
  out = {}
  with open(os.path.join(workdir, 'metrics.jsonl')) as f:
    for line in f:
      r = json.loads(line)
      out.setdefault(r['step'], {}).update({f'{r["split"]}/{k}': v for k, v in r.items() if k not in ('step', 'split')})
  return out


@pytest.fixture
def offline(tmp_path, monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_DIR', str(tmp_path / 'wandb_dir'))
  monkeypatch.setenv('WANDB_SILENT', 'true')
  os.makedirs(tmp_path / 'wandb_dir')
  return tmp_path / 'wandb_dir'


def test_train_and_its_resume_log_the_jsonl_scalars_to_one_wandb_run(tmp_path, offline):
  cfg = text_run_config(tmp_path, steps=4, eval_every=2, eval_batches=1, checkpoint_every=2,
                        metrics={'wandb_project': 'fmjax-test'})
  train.train(cfg)
  first = jsonl_by_step(cfg.workdir)
  [(run, history, run_cfg)] = offline_runs(offline)
  run_id = open(os.path.join(cfg.workdir, 'wandb_run_id')).read().strip()
  assert run.run_id == run_id and run.display_name == 'workdir' and run.project == 'fmjax-test'
  assert history == first and sorted(history) == [1, 2, 3, 4]
  assert {'train/loss', 'eval/loss'} <= set(history[4]) and 'eval/loss' in history[2]
  assert run_cfg['seq_len'] == cfg.seq_len and run_cfg['metrics']['wandb_project'] == 'fmjax-test'

  # Killed after step 4 with its last checkpoint at 2: the resume logs steps 3-4 again, to the same run id.
  shutil.rmtree(os.path.join(cfg.workdir, 'checkpoints', '4'))
  train.train(cfg)
  (_, before, _), (again, resumed, _) = offline_runs(offline)
  assert again.run_id == run_id
  assert sorted(resumed) == [3, 4]
  merged = {**before, **resumed}          # what `wandb sync` makes of the two segments, step by step
  assert merged == jsonl_by_step(cfg.workdir) and sorted(merged) == [1, 2, 3, 4]


def test_wandb_files_go_to_the_workdir_and_only_process_zero_opens_a_run(tmp_path, monkeypatch):
  monkeypatch.setenv('WANDB_MODE', 'offline')
  monkeypatch.setenv('WANDB_SILENT', 'true')
  monkeypatch.delenv('WANDB_DIR', raising=False)
  cfg = tiny_config()
  cfg.metrics.wandb_project, cfg.metrics.wandb_run_name = 'fmjax-test', 'named run'
  other = MetricWriter(str(tmp_path / 'other'), 10, progress_bar=False, enabled=False, config=cfg)
  other.write(1, {'loss': 2.0})
  other.close()
  assert not os.path.exists(tmp_path / 'other')
  writer = MetricWriter(str(tmp_path / 'run'), 10, progress_bar=False, enabled=True, config=cfg)
  writer.write(1, {'loss': 2.0})
  writer.write(1, {'loss': 3.0}, prefix='eval')
  writer.close()
  [(run, history, _)] = offline_runs(tmp_path / 'run')       # under WORKDIR/wandb
  assert run.display_name == 'named run' and history == {1: {'train/loss': 2.0, 'eval/loss': 3.0}}


def test_no_project_no_wandb(tmp_path, offline):
  writer = MetricWriter(str(tmp_path / 'run'), 10, progress_bar=False, enabled=True, config=tiny_config())
  writer.write(1, {'loss': 2.0})
  writer.close()
  assert sorted(os.listdir(tmp_path / 'run')) == ['metrics.jsonl', 'tensorboard'] and not os.listdir(offline)


def test_misconfigured_wandb_is_one_line_naming_the_fix(tmp_path, monkeypatch):
  cfg = tiny_config()
  cfg.metrics.wandb_project, cfg.metrics.wandb_mode = 'fmjax-test', 'offlin'
  with pytest.raises(wandb_run.TrackerError, match=r"metrics.wandb_mode='offlin': choose online, offline, disabled"):
    MetricWriter(str(tmp_path / 'a'), 10, progress_bar=False, enabled=True, config=cfg)
  cfg.metrics.wandb_mode = 'offline'
  monkeypatch.setitem(sys.modules, 'wandb', None)      # as if wandb were not installed
  with pytest.raises(wandb_run.TrackerError, match=r"pip install 'fmjax\[wandb\]'"):
    MetricWriter(str(tmp_path / 'b'), 10, progress_bar=False, enabled=True, config=cfg)


def test_online_without_a_login_is_one_line_naming_the_ways_out(tmp_path, monkeypatch):
  monkeypatch.setenv('HOME', str(tmp_path / 'home'))     # no ~/.netrc, no W&B settings: no API key anywhere
  monkeypatch.delenv('WANDB_API_KEY', raising=False)
  monkeypatch.setenv('WANDB_MODE', 'online')
  monkeypatch.setenv('WANDB_DIR', str(tmp_path))
  cfg = tiny_config()
  cfg.metrics.wandb_project = 'fmjax-test'
  with pytest.raises(wandb_run.TrackerError) as e:
    MetricWriter(str(tmp_path / 'run'), 10, progress_bar=False, enabled=True, config=cfg)
  assert "of project 'fmjax-test'" in str(e.value) and 'wandb login' in str(e.value)
  assert 'WANDB_MODE=offline' in str(e.value) and '\n' not in str(e.value)
  assert not os.path.exists(tmp_path / 'run' / 'wandb_run_id')

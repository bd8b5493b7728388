"""`python -m fmjax.finetune` with finetune.task=sft and dpo: SIGKILL after a checkpoint, then resume, logs
the uninterrupted run's losses bit for bit; a 2x2x2 mesh over 8 CPU devices logs one device's losses."""

import json
import subprocess
import sys

import pytest

from cli_runs import ROOT, SERIAL, base_env, checkpoints, kill_command_after_checkpoint, logged_losses, train_records
from helpers import pretrain_cfg

pytestmark = pytest.mark.slow

STEPS = 30


@pytest.fixture(scope='module')
def pretrained(tmp_path_factory):
  """A byte-level model pretrained in-process, wide enough that a step outlasts the kill's polling."""
  tmp = tmp_path_factory.mktemp('chatpre')
  (tmp / 'corpus').mkdir()
  for i in range(8):
    (tmp / 'corpus' / f'{i}.txt').write_text(f'inc {i} gives {i + 1}\n' * 16)
  cfg = pretrain_cfg(tmp)
  cfg.model.update(dict(d_model=128, mlp_dim=512, max_seq_len=64))
  from fmjax import train
  train.train(cfg)
  return cfg.workdir


def _files(tmp, task):
  def write(name, rows):
    path = tmp / name
    path.write_text(''.join(json.dumps(r) + '\n' for r in rows))
    return str(path)
  qa = [(f'inc {i}', str(i + 1)) for i in range(240)]
  if task == 'sft':
    rows = [{'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': a}]} for q, a in qa]
  else:
    rows = [{'prompt': q, 'chosen': a, 'rejected': str(int(a) + 3)} for q, a in qa]
  return write(f'{task}_train.jsonl', rows[:200]), write(f'{task}_eval.jsonl', rows[200:])


def _command(pre, run, files, task, *extra):
  return [sys.executable, '-m', 'fmjax.finetune', '--config', 'configs/finetune_chat.py', f'--config.init_from={pre}',
          '--workdir', str(run), f'--config.finetune.task={task}', f'--config.finetune.train_files={files[0]}',
          f'--config.finetune.eval_files={files[1]}', '--config.finetune.validation_fraction=0',
          '--config.finetune.sample_prompts=2', '--config.finetune.sample_tokens=4', f'--config.steps={STEPS}',
          f'--config.optim.decay_steps={STEPS}', '--config.optim.learning_rate=1e-4', '--config.seq_len=40',
          '--config.global_batch_size=16', '--config.checkpoint_every=10', '--config.async_checkpoints=false',
          '--config.log_every=1', f'--config.eval_every={STEPS}', '--config.progress_bar=false', *extra]


def _run(cmd, devices=1, env=SERIAL):
  return subprocess.run(cmd, env=base_env(devices, **env), cwd=ROOT, timeout=300).returncode


@pytest.mark.parametrize('task', ['sft', 'dpo'])
def test_chat_task_resumes_bit_exactly_after_sigkill_and_a_mesh_equals_one_device(pretrained, tmp_path, task):
  files = _files(tmp_path, task)
  ref = tmp_path / 'ref'
  assert _run(_command(pretrained, ref, files, task)) == 0
  want = logged_losses(ref)
  assert sorted(want) == list(range(1, STEPS + 1))

  run = tmp_path / 'run'
  kill_command_after_checkpoint(_command(pretrained, run, files, task), run, timeout=240)
  killed_at = max(logged_losses(run))
  assert checkpoints(run)[-1] < killed_at < STEPS, (checkpoints(run), killed_at)
  assert _run(_command(pretrained, run, files, task)) == 0
  got = logged_losses(run)
  for step in range(1, STEPS + 1):
    assert got[step] == want[step], step                     # bit-identical (fp32, CPU, one thread)
  assert train_records(run) == train_records(ref)            # each step logged once
  if task == 'dpo':
    assert (run / 'dpo_reference.npz').read_bytes() == (ref / 'dpo_reference.npz').read_bytes()

  mesh = tmp_path / 'mesh'
  assert _run(_command(pretrained, mesh, files, task, '--config.mesh.data=2', '--config.mesh.fsdp=2',
                       '--config.mesh.tensor=2', '--config.steps=10'), devices=8, env={}) == 0
  on_mesh = logged_losses(mesh)
  assert sorted(on_mesh) == list(range(1, 11))
  for step in range(1, 11):
    assert on_mesh[step] == pytest.approx(want[step], rel=2e-5, abs=1e-6), step

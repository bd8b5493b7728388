"""`python -m fmjax.finetune --demo chat` as a user runs it (after a short pretraining on the stdlib corpus):
SFT raises held-out exact match by at least 30 points, DPO raises it further or widens the held-out
chosen-vs-rejected margin, and the whole demo takes under 10 minutes on one CPU device."""

import json
import subprocess
import sys
import time

import pytest

from cli_runs import ROOT, base_env

pytestmark = pytest.mark.slow


def test_chat_demo_gains_from_sft_and_dpo(tmp_path):
  pre, demo = tmp_path / 'pre', tmp_path / 'demo'
  subprocess.run([sys.executable, '-m', 'fmjax.train', '--config', 'configs/default.py', '--workdir', str(pre),
                  '--config.steps=100', '--config.checkpoint_every=100', '--config.eval_every=100',
                  '--config.progress_bar=false'], env=base_env(1), cwd=ROOT, check=True, timeout=600)
  start = time.perf_counter()
  subprocess.run([sys.executable, '-m', 'fmjax.finetune', '--demo', 'chat', f'--config.init_from={pre}',
                  '--workdir', str(demo), '--config.progress_bar=false'], env=base_env(1), cwd=ROOT, check=True,
                 timeout=900)
  seconds = time.perf_counter() - start
  rows = json.loads((demo / 'chat_demo.json').read_text())
  before, sft, dpo = rows['pretrained'], rows['after SFT'], rows['after DPO']
  assert sft['exact_match'] - before['exact_match'] >= 0.30, rows
  assert dpo['exact_match'] > sft['exact_match'] or dpo['rewards/margins'] > 0, rows
  assert seconds < 600, seconds

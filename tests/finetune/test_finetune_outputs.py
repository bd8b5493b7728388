"""What a classification fine-tune shows a person: the n-gram baseline's fixed numbers reach the console once,
while every eval's metrics.jsonl record keeps them beside the model's."""

import pytest
import json

from fmjax import finetune
from helpers import ft_config


@pytest.mark.slow   # a whole run: with the slow suite (CI runs both)
def test_the_baseline_line_is_printed_once_and_logged_at_every_eval(pretrained, tmp_path, capsys):
  cfg = ft_config(pretrained, tmp_path)
  cfg.steps, cfg.eval_every, cfg.log_every, cfg.progress_bar = 6, 2, 2, False
  finetune.finetune(cfg)
  out = capsys.readouterr()
  console = (out.out + out.err).splitlines()
  with open(tmp_path / 'ft' / 'metrics.jsonl') as f:
    records = [json.loads(line) for line in f]
  evals = [r['step'] for r in records if r['split'] == 'eval']
  baseline = [r for r in records if r['split'] == 'baseline']
  assert evals == [2, 4, 6] and [r['step'] for r in baseline] == evals
  assert all({k: v for k, v in r.items() if k != 'step'} == {k: v for k, v in baseline[0].items() if k != 'step'}
             for r in baseline)
  shown = [line for line in console if line.startswith('[baseline]')]
  assert len(shown) == 1 and shown[0].startswith('[baseline] step 2: eval/accuracy=')
  assert sum(line.startswith('[eval] step') for line in console) == 3

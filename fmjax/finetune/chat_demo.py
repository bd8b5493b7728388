"""The chat demo: SFT then DPO on a unit-conversion task made in code, no download.

`python -m fmjax.finetune --demo chat --config.init_from=PRETRAIN_WORKDIR --workdir W` writes
W/data/*.jsonl (questions like "Convert 37 km to m." answered "37000 m"; 10 % of the (number, unit)
pairs held out by a stable hash), fine-tunes the pretrained model on the conversations (W/sft,
configs/finetune_chat.py), then tunes that with DPO on (question, right answer, wrong answer) pairs
whose wrong answer has the factor off by ten or the wrong unit (W/dpo), and prints exact-match
accuracy on the held-out questions before SFT, after SFT and after DPO beside the held-out DPO
pair metrics (W/chat_demo.json).
"""

from __future__ import annotations

import json
import zlib

import numpy as np

from fmjax.runtime import distributed, paths

UNITS = (('km', 'm', 1000), ('m', 'cm', 100), ('kg', 'g', 1000), ('cm', 'mm', 10), ('L', 'mL', 1000))
HELD_OUT = 0.1


def _items():
  """Every (number, from, to, factor), with whether it is held out (a stable hash of the question)."""
  for a, b, factor in UNITS:
    for n in range(1, 1000):
      q = f'Convert {n} {a} to {b}.'
      yield q, f'{n * factor} {b}', (n, a, b, factor), zlib.crc32(q.encode()) % 1000 < HELD_OUT * 1000


def _wrong(n: int, a: str, b: str, factor: int, rng) -> str:
  """A plausible wrong answer: the factor off by ten either way, or the source unit."""
  kind = rng.integers(3)
  if kind == 0:
    return f'{n * factor * 10} {b}'
  if kind == 1:
    return f'{n * factor // 10} {b}' if factor > 10 else f'{n} {b}'
  return f'{n * factor} {a}'


def write_data(directory: str, seed: int = 0) -> dict[str, str]:
  """W/data/{sft,dpo}_{train,eval}.jsonl; returns their paths by name."""
  rng = np.random.default_rng(seed)
  rows = {'sft_train': [], 'sft_eval': [], 'dpo_train': [], 'dpo_eval': []}
  for q, answer, (n, a, b, factor), held in _items():
    split = 'eval' if held else 'train'
    rows[f'sft_{split}'].append({'messages': [{'role': 'user', 'content': q}, {'role': 'assistant', 'content': answer}]})
    rows[f'dpo_{split}'].append({'prompt': q, 'chosen': answer, 'rejected': _wrong(n, a, b, factor, rng)})
  out = {}
  for name, records in rows.items():
    order = rng.permutation(len(records))
    out[name] = paths.join(directory, f'{name}.jsonl')
    if distributed.is_leader():
      paths.write_text(out[name], ''.join(json.dumps(records[i]) + '\n' for i in order))
  return out


def accuracy(workdir: str, template_spec: str, questions, max_new_tokens: int) -> float:
  """Held-out exact match of the newest checkpoint of `workdir` (greedy, the chat template)."""
  from fmjax.checkpoints import restore  # pylint: disable=import-outside-toplevel
  from fmjax.data import chat_templates  # pylint: disable=import-outside-toplevel
  from fmjax.finetune import chat_eval  # pylint: disable=import-outside-toplevel
  restored = restore.restore(workdir)
  template = chat_templates.for_tokenizer(restored.tokenizer, template_spec)
  return chat_eval.exact_match(restored, template, questions, restored.params, max_new_tokens)


def demo(cfg, overrides, finetune) -> dict:
  """Run the demo (module docstring) with `finetune` (fmjax/finetune/run.py) and print its table; returns
  the table's rows."""
  from fmjax import config as config_lib  # pylint: disable=import-outside-toplevel
  from fmjax.configs.finetune_chat import DEMO_DPO  # pylint: disable=import-outside-toplevel
  from fmjax.data import conversations  # pylint: disable=import-outside-toplevel
  if not cfg.finetune.init_from:
    raise config_lib.ConfigError('--demo chat needs --config.init_from=PRETRAIN_WORKDIR (pretrain one with: python -m '
                                 'fmjax.train --config configs/default.py --workdir W)')
  files = write_data(paths.join(cfg.workdir, 'data'), cfg.seed)
  questions = conversations.read_conversations(files['sft_eval'], what='the demo eval file')
  tokens = cfg.finetune.sample_tokens
  spec = cfg.finetune.chat_template
  rows = {'pretrained': {'exact_match': accuracy(cfg.finetune.init_from, spec, questions, tokens)}}
  print(f'== held-out exact match of the pretrained model: {rows["pretrained"]["exact_match"]:.3f}', flush=True)

  sft = cfg.copy_and_resolve_references()
  sft.workdir = paths.join(cfg.workdir, 'sft')
  sft.finetune.train_files, sft.finetune.eval_files = files['sft_train'], files['sft_eval']
  print(f'== SFT ({sft.workdir})', flush=True)
  finetune(sft, overrides)
  rows['after SFT'] = {'exact_match': accuracy(sft.workdir, spec, questions, tokens)}

  dpo = cfg.copy_and_resolve_references()
  dpo.workdir = paths.join(cfg.workdir, 'dpo')
  dpo.finetune.init_from = sft.workdir
  dpo.finetune.task = 'dpo'
  dpo.finetune.train_files, dpo.finetune.eval_files = files['dpo_train'], files['dpo_eval']
  dpo.finetune.dpo_beta = DEMO_DPO['beta']
  dpo.steps = DEMO_DPO['steps']
  dpo.eval_every = DEMO_DPO['steps']
  dpo.optim.learning_rate = DEMO_DPO['learning_rate']
  dpo.optim.end_learning_rate = DEMO_DPO['learning_rate'] / 10
  print(f'== DPO ({dpo.workdir})', flush=True)
  out = finetune(dpo, overrides)
  rows['after DPO'] = {'exact_match': accuracy(dpo.workdir, spec, questions, tokens)}
  report = out['report'] or {}
  rows['after DPO'].update({k: report[k] for k in ('rewards/margins', 'rewards/accuracies') if k in report})
  print('\n' + table(rows), flush=True)
  if distributed.is_leader():
    paths.write_text(paths.join(cfg.workdir, 'chat_demo.json'), json.dumps(rows, indent=2))
  return rows


def table(rows: dict) -> str:
  """The demo's table: held-out exact match per stage, DPO's held-out pair margin and accuracy."""
  lines = ['stage         held-out exact match   DPO held-out margin   DPO pair accuracy',
           '-' * 76]
  for name, r in rows.items():
    margin = f'{r["rewards/margins"]:+.3f}' if 'rewards/margins' in r else ('0 (= reference)' if name == 'after SFT'
                                                                            else '-')
    acc = f'{r["rewards/accuracies"]:.3f}' if 'rewards/accuracies' in r else '-'
    lines.append(f'{name:<13} {r["exact_match"]:>20.3f}   {margin:>19}   {acc:>17}')
  return '\n'.join(lines)

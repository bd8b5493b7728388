"""What a resumed run may change: the saved config.json against the new config.

On resume the changes are printed, and run-defining ones (model, steps, schedule, seed, data,
batch, seq_len) are refused unless `--config.allow_config_change=true`; the check comes before
config.json is rewritten, so a refused resume leaves the workdir as it was.
"""

from __future__ import annotations

import json
import os

from fmjax import config as config_lib
from fmjax.runtime import paths

# Options whose change alters what a resumed run means (refused unless allow_config_change); every
# other change (logging, checkpointing, mesh, attention kernel, remat, compute dtype, microbatches,
# ...) is printed and allowed. A trailing dot means the whole section. `steps` is allowed to change
# when optim.decay_steps fixes the schedule (then it only extends or shortens the run).
RUN_DEFINING = ('model.', 'steps', 'seed', 'global_batch_size', 'seq_len', 'optim.learning_rate',
                'optim.end_learning_rate', 'optim.warmup_steps', 'optim.decay_steps', 'data.source', 'data.files',
                'data.tokenizer', 'data.tfds_name', 'data.jsonl_field', 'data.text_feature', 'data.split_by',
                'data.train_split', 'data.validation_fraction', 'data.packing', 'data.add_bos', 'data.add_eos',
                'data.num_streams')
FINETUNE_DEFINING = ('finetune.',)
HARMLESS = ('model.attention', 'model.attention_chunk', 'model.remat', 'model.remat_names', 'model.dtype',
            'model.scan_layers', 'model.loss_vocab_chunk', 'finetune.best_metric', 'finetune.best_mode',
            'finetune.eval_files', 'finetune.eval_split', 'finetune.max_eval_examples', 'finetune.baseline')
NOT_COMPARED = ('workdir', 'allow_config_change', 'force_unlock', 'topology')
_ABSENT = object()


def _flatten(tree: dict, prefix: str = '') -> dict:
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flatten(value, f'{prefix}{key}.'))
    else:
      out[f'{prefix}{key}'] = value
  return out


def config_changes(saved: dict, new: dict) -> list[tuple[str, object, object]]:
  """(key, saved value, new value) for every dotted key that differs (absent keys: `_ABSENT`)."""
  old, cur = _flatten(saved), _flatten(new)
  return [(k, old.get(k, _ABSENT), cur.get(k, _ABSENT)) for k in sorted(set(old) | set(cur))
          if k not in NOT_COMPARED and old.get(k, _ABSENT) != cur.get(k, _ABSENT)]


def is_run_defining(key: str, finetune: bool = False) -> bool:
  """Whether changing `key` on resume alters the run's meaning (see RUN_DEFINING)."""
  if key in HARMLESS:
    return False
  defining = RUN_DEFINING + (FINETUNE_DEFINING if finetune else ())
  return any(key == d or (d.endswith('.') and key.startswith(d)) for d in defining)


def _show(value) -> str:
  return '(absent)' if value is _ABSENT else json.dumps(value)


def resume_changes(workdir: str, cfg, resuming: bool, finetune: bool = False) -> list[str]:
  """Lines listing how `cfg` differs from WORKDIR/config.json when resuming a checkpoint.

  Raises ConfigError (one line) on a run-defining change unless `cfg.allow_config_change`; call
  it before writing config.json, so that a refused resume leaves the workdir as it was.
  """
  path = paths.join(workdir, 'config.json')
  if not resuming or not paths.exists(path):
    return []
  try:
    saved = json.loads(paths.read_text(path))
  except (OSError, ValueError) as e:
    return [f'note: cannot read the saved {path} ({e}); the config is not compared']
  new = json.loads(config_lib.to_json(cfg))
  changes = config_changes(saved, new)
  # `steps` matters through the schedule; with a fixed optim.decay_steps it only lengthens or shortens the run
  fixed_schedule = bool(new['optim']['decay_steps']) and saved.get('optim', {}).get('decay_steps') == \
      new['optim']['decay_steps']
  defining = [c for c in changes if is_run_defining(c[0], finetune) and not (c[0] == 'steps' and fixed_schedule)]
  if defining and not cfg.get('allow_config_change', False):
    shown = ', '.join(f'{k} {_show(o)} -> {_show(n)}' for k, o, n in defining[:4])
    more = f' and {len(defining) - 4} more' if len(defining) > 4 else ''
    raise config_lib.ConfigError(f'resuming {workdir} with changed run-defining options: {shown}{more}; restore them, '
                                 'pass --config.allow_config_change=true to resume anyway, or use another --workdir')
  return [f'config change on resume: {k}: {_show(o)} -> {_show(n)}'
          + (' (run-defining, allowed by allow_config_change)' if (k, o, n) in defining else '')
          for k, o, n in changes]

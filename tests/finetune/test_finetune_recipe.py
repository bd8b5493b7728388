"""The fine-tuning recipe and its wiring: layer-wise LR decay, epochs, warmup ratio, classifier dropout,
the validation split that chooses the best checkpoint, the n-gram baseline beside the model,
per-example predictions and the confusion matrix in TensorBoard."""

import csv
import glob
import io
import json
import os
import struct

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest
from tensorboardX.proto import event_pb2

from fmjax import finetune
from fmjax.training import build
from fmjax.parallel import sharding as shd
from fmjax.data.tokenizers import ByteTokenizer
from fmjax.finetune import adaptation, parts as parts_lib, schedule, splits
from fmjax.objectives.classification import HEAD, loss_fn
from fmjax.model import Transformer
from fmjax.finetune.evaluation import CHOICE_WARNING, confusion_pixels
from helpers import tiny_config

CLASSES = {'red': 'a', 'green': 'm', 'blue': 'x'}


def _leaves(tree):
  return {jax.tree_util.keystr(p): np.asarray(v) for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _classifier_params(cfg, num_classes):
  """Unsharded parameters of the fine-tuning model (LM + head) of `cfg`, and its Classifier."""
  model = Transformer(cfg.model)
  head = parts_lib.make_classifier(cfg, model, num_classes)
  init = jax.jit(lambda rng: nn.meta.unbox(head.init(rng, cfg.seq_len)))
  return init(jax.random.PRNGKey(0)), head


def _first_update(cfg, params, grads):
  tx, _ = adaptation.make_optimizer(cfg)
  updates = jax.jit(lambda p, g: tx.update(g, tx.init(p), p)[0])(params, grads)
  return _leaves(updates)


@pytest.mark.parametrize('scan', [True, False])
def test_layer_decay_scales_each_group_by_the_formula(scan):
  """One AdamW step with layer_decay d against the same step without it: block i of L moves d^(L-i) as far,
  the embeddings d^(L+1), the head and the final norm as far (weight decay included)."""
  cfg = tiny_config(num_layers=3, scan_layers=scan)
  cfg.finetune.task = 'classify'
  cfg.optim.update(dict(weight_decay=0.1, warmup_steps=0))   # the first step moves at the peak rate
  params, _ = _classifier_params(cfg, 3)
  grads = jax.tree.map(lambda p: jnp.cos(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), params)
  plain = _first_update(cfg, params, grads)
  d, n = 0.5, 3
  cfg.finetune.layer_decay = d
  decayed = _first_update(cfg, params, grads)
  assert set(plain) == set(decayed)
  checked = set()
  for key, want in plain.items():
    if key.startswith("['layers']"):
      expected = np.stack([want[i] * d ** (n - i) for i in range(n)])
    elif key.startswith("['layers_"):
      i = int(key.split("['layers_")[1].split("']")[0])
      expected = want * d ** (n - i)
    elif key.startswith("['embedding']"):
      expected = want * d ** (n + 1)
    else:
      assert key.startswith((f"['{HEAD}']", "['final_norm']", "['lm_head']")), key
      expected = want
    np.testing.assert_allclose(decayed[key], expected, rtol=1e-5, atol=1e-12, err_msg=key)
    checked.add(key.split(']')[0])
  assert {"['embedding'", f"['{HEAD}'", "['final_norm'"} <= checked
  assert any(k.startswith("['layers") for k in checked)
  assert np.abs(plain["['embedding']"]).max() > 0
  cfg.finetune.update(dict(freeze_layers=1, freeze_embeddings=True))   # frozen stays frozen
  frozen = _first_update(cfg, params, grads)
  wo = "['layers']['mlp']['wo']['kernel']" if scan else "['layers_0']['mlp']['wo']['kernel']"
  assert not frozen["['embedding']"].any() and not (frozen[wo][0] if scan else frozen[wo]).any()
  assert frozen[f"['{HEAD}']['proj']['kernel']"].all()


def test_epochs_set_the_steps_and_warmup_ratio_the_schedule():
  assert schedule.steps_for_epochs(2.5, 100, 16) == 16        # ceil(250 / 16)
  assert schedule.steps_for_epochs(1, 96, 16) == 6
  assert schedule.steps_for_epochs(0.01, 10, 16) == 1
  cfg = tiny_config()
  cfg.optim.update(dict(learning_rate=1e-3, end_learning_rate=0.0, warmup_steps=7))
  cfg.finetune.update(dict(epochs=3, warmup_ratio=0.2))
  notes = schedule.resolve(cfg, train_examples=50)
  assert cfg.steps == 19 and cfg.optim.warmup_steps == 4       # ceil(150 / 8); round(0.2 * 19)
  assert len(notes) == 2 and 'finetune.epochs=3' in notes[0]
  tx, sched = adaptation.make_optimizer(cfg)
  del tx
  got = np.array([float(sched(s)) for s in range(cfg.steps + 1)])
  warm = np.arange(5) / 4 * 1e-3                               # linear from 0 to the peak in 4 steps
  cos = 0.5 * 1e-3 * (1 + np.cos(np.pi * np.arange(16) / 15))   # cosine over the remaining 15 steps
  np.testing.assert_allclose(got, np.concatenate([warm, cos[1:]]), rtol=1e-5, atol=1e-9)
  cfg.finetune.update(dict(epochs=0, warmup_ratio=0))
  steps, warmup = cfg.steps, cfg.optim.warmup_steps
  assert schedule.resolve(cfg, 50) == [] and (cfg.steps, cfg.optim.warmup_steps) == (steps, warmup)


def _rows(texts, ids, seq_len=16):
  from fmjax.data import labeled
  return {k: jnp.asarray(v) for k, v in labeled.encode_classification(texts, np.asarray(ids), ByteTokenizer(),
                                                                      seq_len).items()}


def test_classifier_dropout_changes_train_logits_only():
  cfg = tiny_config(vocab_size=260)
  cfg.finetune.update(dict(task='classify', classifier_dropout=0.5))
  params, dropped = _classifier_params(cfg, 3)
  cfg.finetune.classifier_dropout = 0.0
  plain = parts_lib.make_classifier(cfg, dropped.model, 3)
  batch = _rows(['aaaa', 'mmmmmm 12', 'xx 9'], [0, 1, 2])

  @jax.jit
  def outputs(params, batch, rng):
    return (dropped.logits(params, batch), plain.logits(params, batch), dropped.logits(params, batch, rng),
            plain.logits(params, batch, rng), loss_fn(dropped)(params, batch, None)[0],
            loss_fn(dropped)(params, batch, None)[0], loss_fn(plain)(params, batch, None)[0])
  eval_drop, eval_plain, train_drop, train_plain, *losses = jax.device_get(outputs(params, batch,
                                                                                   jax.random.PRNGKey(1)))
  loss_drop, loss_plain = losses[:2], losses[2]
  np.testing.assert_array_equal(np.asarray(eval_drop), np.asarray(eval_plain))   # eval: no dropout
  np.testing.assert_array_equal(np.asarray(train_plain), np.asarray(eval_plain))  # model.dropout is 0
  assert not np.allclose(np.asarray(train_drop), np.asarray(eval_drop))
  assert loss_drop[0] == loss_drop[1] != loss_plain       # a step without a key: a mask fixed by the batch


def test_hold_out_is_stratified_stable_and_keeps_copies_together():
  rng = np.random.default_rng(0)
  texts = [f'example {i}' for i in range(200)] + ['copy'] * 5
  labels = ['a' if i % 4 else 'b' for i in range(200)] + ['a'] * 5
  keep, held = splits.hold_out(texts, labels, 0.2)
  assert len(set(keep) | set(held)) == len(texts) and not set(keep) & set(held)
  held_labels = [labels[i] for i in held if texts[i] != 'copy']
  assert held_labels.count('b') == 10                          # 20 % of each label's distinct texts
  assert held_labels.count('a') in (30, 31)
  copies = {i in set(held) for i in range(200, 205)}
  assert len(copies) == 1                                      # all copies on one side
  order = rng.permutation(len(texts))
  keep2, held2 = splits.hold_out([texts[i] for i in order], [labels[i] for i in order], 0.2)
  assert sorted(texts[order[i]] for i in held2) == sorted(texts[i] for i in held)
  only_b = [i for i in range(200) if labels[i] == 'b']         # the other labels' examples do not matter
  _, held_b = splits.hold_out([texts[i] for i in only_b] + ['z1', 'z2'], ['b'] * len(only_b) + ['c', 'c'], 0.2)
  assert {texts[only_b[i]] for i in held_b if i < len(only_b)} == {texts[i] for i in held if labels[i] == 'b'}



def test_validation_files_are_the_validation_split_and_train_stays_whole(tmp_path):
  def write(name, rows):
    with open(tmp_path / name, 'w', newline='', encoding='utf-8') as f:
      w = csv.writer(f)
      w.writerow(('text', 'label'))
      w.writerows(rows)
  write('train.csv', [(f't{i}', 'ab'[i % 2]) for i in range(10)])
  write('val_1.csv', [('v0', 'a'), ('v1', 'b')])
  write('val_2.csv', [('v2', 'b')])
  write('eval.csv', [('e0', 'a')])
  ft = tiny_config().finetune
  ft.source, ft.train_files, ft.eval_files = 'csv', str(tmp_path / 'train.csv'), str(tmp_path / 'eval.csv')
  ft.validation_files, ft.validation_fraction = str(tmp_path / 'val_*.csv'), 0.5   # files win over the fraction
  data = splits.load(ft)
  assert data.validation_from == 'files' and len(data.train) == 10
  assert data.validation.columns['text'] == ['v0', 'v1', 'v2']
  assert data.validation.ids.tolist() == [0, 1, 1] and data.class_names == ('a', 'b')

# ---- the wiring, on one tiny separable task fine-tuned from random initialisation ----------------------

def _write_csv(path, rows):
  with open(path, 'w', newline='') as f:
    w = csv.writer(f)
    w.writerow(('text', 'label'))
    w.writerows(rows)
  return str(path)


def _task_rows(n, seed, shift=0):
  """Texts of repeated class letters plus noise; `shift` relabels every row with the next class (an
  adversarial eval split: the better the model, the worse its eval metrics)."""
  rng = np.random.default_rng(seed)
  names = sorted(CLASSES)
  rows = []
  for i in range(n):
    label = names[i % 3]
    noise = ''.join(rng.choice(list('0123456789 '), size=8))
    rows.append((CLASSES[label] * int(rng.integers(1, 3)) + noise, names[(i + shift) % 3]))
  return rows


def _recipe_config(tmp, eval_shift=0, **finetune_overrides):
  cfg = tiny_config(vocab_size=260)
  cfg.update(dict(workdir=str(tmp / 'ft'), eval_every=2, log_every=4, checkpoint_every=0, async_checkpoints=False,
                  cpu_peak_flops=1e11))
  cfg.optim.update(dict(learning_rate=1e-3, weight_decay=0.0))
  cfg.finetune.update(dict(task='classify', train_files=_write_csv(tmp / 'train.csv', _task_rows(48, 0)),
                           eval_files=_write_csv(tmp / 'eval.csv', _task_rows(24, 1, eval_shift)), epochs=3,
                           warmup_ratio=0.1, head_learning_rate=3e-3))
  cfg.finetune.update(finetune_overrides)
  return cfg


@pytest.fixture(scope='module')
def honest_runs(tmp_path_factory):
  """The same fine-tune (validation held out of train) with a true and with an adversarial eval split."""
  out = {}
  for name, shift in (('true', 0), ('adversarial', 1)):
    tmp = tmp_path_factory.mktemp(name)
    cfg = _recipe_config(tmp, shift, validation_fraction=0.2)
    out[name] = (cfg, finetune.finetune(cfg), tmp / 'ft')
  return out


def _steps_of(work, pattern):
  return sorted(int(p.rsplit('_', 1)[1].split('.')[0]) for p in glob.glob(str(work / 'eval' / pattern)))


def test_validation_chooses_the_checkpoint_and_the_eval_split_cannot(honest_runs):
  (cfg, true, work), (_, adv, adv_work) = honest_runs['true'], honest_runs['adversarial']
  best_true, best_adv = (json.loads((w / 'best.json').read_text()) for w in (work, adv_work))
  assert best_true['chosen_on'] == best_adv['chosen_on'] == 'validation'
  assert best_true['step'] == best_adv['step']
  assert best_true['eval']['macro_f1'] != best_adv['eval']['macro_f1']   # the eval splits do differ
  validation = {s: json.loads((work / 'eval' / f'validation_step_{s}.json').read_text())['macro_f1']
                for s in _steps_of(work, 'validation_step_*.json')}
  assert best_true['step'] == max(validation, key=lambda s: (validation[s], -s))
  adversarial = {s: json.loads((adv_work / 'eval' / f'step_{s}.json').read_text())['macro_f1'] for s in validation}
  assert max(adversarial, key=lambda s: (adversarial[s], -s)) != best_true['step']   # eval would choose otherwise
  for name in ('true', 'adversarial'):                     # the kept parameters are the same
    assert honest_runs[name][1]['best']['step'] == best_true['step']
  summary = json.loads((work / 'summary.json').read_text())
  assert summary['chosen_on'] == 'validation' and summary['best_step'] == best_true['step']
  assert summary['eval']['best'] == best_true['eval']
  assert summary['eval']['last']['step'] == summary['last_step'] == true['last_step']


def test_without_validation_the_eval_split_chooses_with_a_warning(tmp_path, capsys):
  cfg = _recipe_config(tmp_path, 1, validation_fraction=0.0, baseline=False)
  out = finetune.finetune(cfg)
  assert CHOICE_WARNING in capsys.readouterr().out
  work = tmp_path / 'ft'
  best = json.loads((work / 'best.json').read_text())
  evals = {s: json.loads((work / 'eval' / f'step_{s}.json').read_text())['macro_f1']
           for s in _steps_of(work, 'step_*.json')}
  assert best['chosen_on'] == 'eval' and best['step'] == max(evals, key=lambda s: (evals[s], -s))
  assert out['summary']['validation'] is None and 'baseline' not in out['summary']['eval']


def test_epochs_and_warmup_ratio_set_the_saved_config(honest_runs):
  cfg, out, work = honest_runs['true']
  saved = json.loads((work / 'config.json').read_text())
  train = len(splits.hold_out([r[0] for r in _task_rows(48, 0)], [r[1] for r in _task_rows(48, 0)], 0.2)[0])
  assert saved['steps'] == out['last_step'] == int(np.ceil(3 * train / 8))
  assert saved['optim']['warmup_steps'] == round(0.1 * saved['steps'])


def test_predictions_files_reproduce_each_eval_confusion_matrix(honest_runs):
  from fmjax.finetune.predictions import confusion_from_predictions, read_predictions
  _, _, work = honest_runs['true']
  steps = _steps_of(work, 'predictions_step_*.jsonl')
  assert steps == _steps_of(work, 'step_*.json') and len(steps) >= 3
  texts = [r[0] for r in _task_rows(24, 1)]
  for step in steps:
    report = json.loads((work / 'eval' / f'step_{step}.json').read_text())
    records = read_predictions(str(work / 'eval' / f'predictions_step_{step}.jsonl'))
    assert [r['text'] for r in records] == texts
    np.testing.assert_array_equal(confusion_from_predictions(records, report['class_names']), report['confusion'])


def tb_events(workdir):
  """Every event of the run's TensorBoard files (TFRecord framing read by hand)."""
  events = []
  for path in sorted(glob.glob(os.path.join(str(workdir), 'tensorboard', 'events.*'))):
    data, i = open(path, 'rb').read(), 0
    while i < len(data):
      (n,) = struct.unpack('<Q', data[i:i + 8])
      events.append(event_pb2.Event.FromString(data[i + 12:i + 12 + n]))
      i += 12 + n + 4
  return events


def _tb_values(events, tag):
  return {e.step: v for e in events for v in e.summary.value if v.tag == tag}


def test_baseline_is_fitted_on_the_same_train_split_and_logged_beside_the_model(honest_runs):
  from fmjax.finetune.baseline import ngram_baseline
  cfg, out, work = honest_runs['true']
  rows = _task_rows(48, 0)
  keep, held = splits.hold_out([r[0] for r in rows], [r[1] for r in rows], 0.2)
  names = sorted(CLASSES)
  ids = np.array([names.index(r[1]) for r in rows])
  eval_rows = _task_rows(24, 1)
  want = ngram_baseline([rows[i][0] for i in keep], ids[keep], [r[0] for r in eval_rows],
                        [names.index(r[1]) for r in eval_rows], names)
  want_val = ngram_baseline([rows[i][0] for i in keep], ids[keep], [rows[i][0] for i in held], ids[held], names)
  summary = json.loads((work / 'summary.json').read_text())
  for split, ref in (('eval', want), ('validation', want_val)):
    got = summary[split]['baseline']
    assert got['confusion'] == ref['confusion']
    assert got['macro_f1'] == pytest.approx(ref['macro_f1'])
  assert summary['baseline_model'] == want['model']
  events = tb_events(work)
  eval_steps = sorted(_tb_values(events, 'eval/macro_f1'))
  for tag, ref in (('baseline/eval/macro_f1', want), ('baseline/validation/macro_f1', want_val)):
    logged = _tb_values(events, tag)
    assert sorted(logged) == eval_steps
    assert all(v.simple_value == pytest.approx(ref['macro_f1'], abs=1e-6) for v in logged.values())
  validation = _tb_values(events, 'validation/macro_f1')
  assert sorted(validation) == eval_steps


def test_confusion_matrix_image_in_tensorboard_at_each_eval(honest_runs):
  import matplotlib.image
  _, _, work = honest_runs['true']
  images = _tb_values(tb_events(work), 'eval/confusion')
  assert sorted(images) == _steps_of(work, 'step_*.json')
  for step, value in images.items():
    report = json.loads((work / 'eval' / f'step_{step}.json').read_text())
    decoded = matplotlib.image.imread(io.BytesIO(value.image.encoded_image_string), format='png')
    pixels = np.round(decoded[..., :3] * 255).astype(np.uint8)
    title = f'step {step}: accuracy {report["accuracy"]:.3f}, macro-F1 {report["macro_f1"]:.3f}'
    np.testing.assert_array_equal(pixels, confusion_pixels(report, title))
    assert (value.image.height, value.image.width) == pixels.shape[:2]

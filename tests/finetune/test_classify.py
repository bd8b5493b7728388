"""fmjax.classify: a fine-tuned tiny classifier, its training files deleted, reproduces fine-tuning's eval
confusion matrices from its own predictions (best, last and a numbered checkpoint); the command line
writes JSONL that agrees with the Python function, plus metrics when labels are given; bad inputs are
one-line errors."""

import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from fmjax import classify as classify_command
from fmjax.inference import classify as classify_lib
from fmjax import train
from fmjax.checkpoints.store import CheckpointError
from fmjax.data.errors import DataError
from fmjax.finetune import predictions as predictions_lib
from fmjax.finetune.run import finetune
from helpers import text_run_config, tiny_config

# A fine-tune end to end (~40 s): with the slow suite, which CI runs too, so the default one stays ~12 min.
pytestmark = pytest.mark.slow

CLASSES = ('green', 'red', 'blue')        # not sorted: the checkpoint's order (sorted) must win
CUES = {'red': 'ar', 'green': 'gm', 'blue': 'bx'}
STEPS, EVERY = 12, 4


def _rows(n, seed):
  """Texts whose class shows in a noisy mix of cue letters (learnable, not at once): some longer than
  seq_len, so truncation matters; non-ASCII too."""
  rng = np.random.default_rng(seed)
  rows = []
  for i in range(n):
    label = CLASSES[i % 3]
    other = CUES[CLASSES[(i + 1 + int(rng.integers(2))) % 3]]
    letters = rng.choice(list(CUES[label] * 3 + other * 2 + 'é '), size=int(rng.integers(4, 30)))
    rows.append((''.join(letters), label))
  return rows


def _write(path, rows):
  if str(path).endswith('.csv'):
    with open(path, 'w', newline='', encoding='utf-8') as f:
      w = csv.writer(f)
      w.writerow(('body', 'tag'))
      w.writerows(rows)
  else:
    with open(path, 'w', encoding='utf-8') as f:
      for text, label in rows:
        f.write(json.dumps({'body': text, 'tag': label}) + '\n')
  return str(path)


@pytest.fixture(scope='module')
def tuned(tmp_path_factory):
  """(workdir, eval rows): a tiny classifier fine-tuned from random init, its data files deleted."""
  tmp = tmp_path_factory.mktemp('classify')
  cfg = tiny_config(vocab_size=260)
  cfg.workdir = str(tmp / 'ft')
  cfg.seq_len = cfg.model.max_seq_len = 16
  ft = cfg.finetune
  ft.source, ft.text_feature, ft.label_feature, ft.pooling = 'csv', 'body', 'tag', 'last'
  ft.train_files = _write(tmp / 'train.csv', _rows(60, 0))
  ft.eval_files = _write(tmp / 'eval.csv', eval_rows := _rows(21, 1))   # 21: the last batch is padded
  for key, value in (('validation_fraction', 0.0), ('baseline', False), ('epochs', 0.0)):   # steps as set
    if key in ft:
      ft[key] = value
  cfg.steps, cfg.eval_every, cfg.checkpoint_every, cfg.keep_checkpoints = STEPS, EVERY, EVERY, 10
  cfg.async_checkpoints, cfg.log_every = False, STEPS
  cfg.optim.learning_rate, cfg.optim.weight_decay = 3e-3, 0.0
  finetune(cfg)
  os.remove(ft.train_files)
  os.remove(ft.eval_files)
  return cfg.workdir, eval_rows


def _eval_json(workdir, step):
  with open(os.path.join(workdir, 'eval', f'step_{step}.json')) as f:
    return json.load(f)


def _confusion(result, rows):
  records = result.records([t for t, _ in rows], [label for _, label in rows])
  return predictions_lib.confusion_from_predictions(records, result.class_names).tolist()


def test_predictions_reproduce_the_eval_confusion_of_each_checkpoint(tuned):
  workdir, rows = tuned
  texts = [t for t, _ in rows]
  with open(os.path.join(workdir, 'best.json')) as f:
    best_step = json.load(f)['step']
  seen = set()
  for which, step in (('best', best_step), ('last', STEPS), (EVERY, EVERY)):
    result = classify_lib.classify(workdir, texts, checkpoint=which)
    assert result.step == step and result.class_names == tuple(sorted(CLASSES))
    want = _eval_json(workdir, step)
    assert _confusion(result, rows) == want['confusion'], which
    seen.add(json.dumps(want['confusion']))
    np.testing.assert_allclose(result.probabilities.sum(1), 1.0, rtol=1e-5)
    assert result.predictions == [result.class_names[i] for i in np.argmax(result.probabilities, 1)]
    written = os.path.join(workdir, 'eval', f'predictions_step_{step}.jsonl')
    if os.path.exists(written):   # fine-tuning's own per-example predictions, when it writes them
      records = predictions_lib.read_predictions(written)
      assert [r['prediction'] for r in records] == result.predictions
      np.testing.assert_allclose([[r['probabilities'][c] for c in result.class_names] for r in records],
                                 result.probabilities, rtol=1e-5, atol=1e-6)
  assert len(seen) >= 2   # the checkpoints differ: each comparison tells them apart


def test_batch_size_and_pooling_in_config_json_do_not_change_predictions(tuned):
  workdir, rows = tuned
  texts = [t for t, _ in rows]
  want = classify_lib.classify(workdir, texts, checkpoint='last')
  got = classify_lib.classify(workdir, texts, checkpoint='last', batch_size=16)
  assert got.predictions == want.predictions
  np.testing.assert_allclose(got.probabilities, want.probabilities, rtol=1e-5, atol=1e-6)
  path = os.path.join(workdir, 'config.json')   # the checkpoint's pooling ('last') wins over a changed config
  with open(path) as f:
    saved = f.read()
  try:
    cfg = json.loads(saved)
    cfg['finetune']['pooling'] = 'mean'
    with open(path, 'w') as f:
      json.dump(cfg, f)
    again = classify_lib.classify(workdir, texts, checkpoint='last')
  finally:
    with open(path, 'w') as f:
      f.write(saved)
  np.testing.assert_array_equal(again.probabilities, want.probabilities)


def test_command_line_writes_predictions_and_metrics(tuned, tmp_path, capsys):
  workdir, rows = tuned
  data = _write(tmp_path / 'new.jsonl', rows)
  out = str(tmp_path / 'out' / 'preds.jsonl')
  assert classify_command.main(['--workdir', workdir, '--checkpoint', 'last', '--input', data, '--out', out]) == 0
  printed = capsys.readouterr().out
  records = predictions_lib.read_predictions(out)
  want = classify_lib.classify(workdir, [t for t, _ in rows], checkpoint='last')
  assert [r['text'] for r in records] == [t for t, _ in rows] and [r['index'] for r in records] == list(range(21))
  assert [r['prediction'] for r in records] == want.predictions
  assert [r['label'] for r in records] == [label for _, label in rows]
  np.testing.assert_allclose([[r['probabilities'][c] for c in want.class_names] for r in records],
                             want.probabilities, rtol=1e-6)
  with open(tmp_path / 'out' / 'preds.metrics.json') as f:
    metrics = json.load(f)
  assert metrics['confusion'] == _eval_json(workdir, STEPS)['confusion'] and metrics['step'] == STEPS
  assert 'macro_f1' in printed and 'preds.jsonl' in printed


def test_command_line_prints_jsonl_alone_for_texts(tuned, capsys):
  workdir, rows = tuned
  texts = [rows[0][0], 'ééé ' * 20]
  assert classify_command.main(['--workdir', workdir, '--text', texts[0], '--text', texts[1]]) == 0
  lines = capsys.readouterr().out.splitlines()
  records = [json.loads(line) for line in lines]   # nothing but JSON on stdout
  want = classify_lib.classify(workdir, texts)
  assert [r['text'] for r in records] == texts and [r['prediction'] for r in records] == want.predictions
  assert all('label' not in r for r in records)


def test_csv_input_without_labels_and_field_flags(tuned, tmp_path, capsys):
  workdir, rows = tuned
  path = tmp_path / 'plain.csv'
  with open(path, 'w', newline='', encoding='utf-8') as f:
    csv.writer(f).writerows([('sentence',)] + [(t,) for t, _ in rows[:5]])
  out = tmp_path / 'p.jsonl'
  assert classify_command.main(['--workdir', workdir, '--input', str(path), '--text-field', 'sentence',
                            '--out', str(out)]) == 0
  assert len(predictions_lib.read_predictions(str(out))) == 5
  assert not (tmp_path / 'p.metrics.json').exists()
  capsys.readouterr()
  assert classify_command.main(['--workdir', workdir, '--input', str(path)]) == 2
  err = capsys.readouterr().err.strip()
  assert "no column 'body'" in err and '--text-field' in err and '\n' not in err


def test_predictions_file_round_trip(tmp_path):
  confusion_matrix = pytest.importorskip('sklearn.metrics').confusion_matrix
  rng = np.random.default_rng(0)
  probs = rng.dirichlet(np.ones(3), size=40).astype(np.float32)
  names = ('ham', 'spam', 'éggs')
  labels = [names[i] for i in rng.integers(0, 3, size=40)]
  texts = [f'text {i} "quoted" ünïcode\n' for i in range(40)]
  path = str(tmp_path / 'new' / 'dir' / 'p.jsonl')
  predictions_lib.write_predictions(path, texts, probs, names, labels)
  assert os.listdir(tmp_path / 'new' / 'dir') == ['p.jsonl']          # no temporary file left
  with open(path, 'rb') as f:
    raw = f.read()
  assert 'ünïcode'.encode() in raw and raw.count(b'\n') == 40        # UTF-8, one line each
  records = predictions_lib.read_predictions(path)
  assert [r['text'] for r in records] == texts and [r['label'] for r in records] == labels
  got = np.array([[r['probabilities'][n] for n in names] for r in records], np.float32)
  np.testing.assert_array_equal(got, probs)                            # float32 exactly
  assert [r['prediction'] for r in records] == [names[i] for i in probs.argmax(1)]
  want = confusion_matrix([names.index(x) for x in labels], probs.argmax(1), labels=[0, 1, 2])
  np.testing.assert_array_equal(predictions_lib.confusion_from_predictions(records, names), want)
  predictions_lib.write_predictions(path, texts[:2], probs[:2], names, [None, 'spam'])
  assert 'label' not in predictions_lib.read_predictions(path)[0]
  with pytest.raises(ValueError, match='not finite'):
    predictions_lib.write_predictions(path, ['a'], np.array([[np.nan, 1, 0]]), names)
  with pytest.raises(DataError, match='has no label'):
    predictions_lib.confusion_from_predictions(predictions_lib.read_predictions(path), names)


def _one_line_error(capsys, argv, *needles):
  assert classify_command.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith('fmjax.classify: error: ') and '\n' not in err, err
  for needle in needles:
    assert needle in err, (needle, err)


def test_bad_inputs_are_one_line_errors(tuned, tmp_path, capsys):
  workdir, rows = tuned
  _one_line_error(capsys, ['--workdir', workdir, '--checkpoint', '999', '--text', 'a'], 'no step 999',
                  f'[{EVERY}, {2 * EVERY}, {STEPS}]')
  _one_line_error(capsys, ['--workdir', workdir, '--checkpoint', 'newest', '--text', 'a'], 'best, last')
  _one_line_error(capsys, ['--workdir', str(tmp_path / 'nope'), '--text', 'a'], 'does not exist')
  _one_line_error(capsys, ['--workdir', workdir], '--input', '--text')
  bad = _write(tmp_path / 'bad.jsonl', rows[:3] + [('aaa', 'purple')])
  _one_line_error(capsys, ['--workdir', workdir, '--input', bad], "'purple'", 'blue, green, red', 'row 4')
  (tmp_path / 'texts.txt').write_text('a\n')
  _one_line_error(capsys, ['--workdir', workdir, '--input', str(tmp_path / 'texts.txt')], '.csv or .jsonl')
  _one_line_error(capsys, ['--workdir', workdir, '--text', 'a', '--batch-size', '3'], '--batch-size 3',
                  'not divisible')
  with pytest.raises(CheckpointError, match='no step 7'):
    classify_lib.classify(workdir, ['a'], checkpoint=7)
  os.rename(os.path.join(workdir, 'best'), os.path.join(workdir, 'best_away'))
  try:
    with pytest.raises(CheckpointError, match='no best checkpoint.*--checkpoint last'):
      classify_lib.classify(workdir, ['a'])
  finally:
    os.rename(os.path.join(workdir, 'best_away'), os.path.join(workdir, 'best'))


def test_a_language_model_workdir_is_refused(tmp_path, capsys):
  cfg = text_run_config(tmp_path, steps=1, checkpoint_every=1)
  train.train(cfg)
  _one_line_error(capsys, ['--workdir', cfg.workdir, '--text', 'a'], 'not a classification fine-tune')
  _one_line_error(capsys, ['--workdir', cfg.workdir, '--checkpoint', 'last', '--text', 'a'],
                  'not a classification fine-tune')


@pytest.mark.slow
def test_the_installed_command_runs(tuned, tmp_path):
  workdir, rows = tuned
  out = tmp_path / 'cli.jsonl'
  env = dict(os.environ, JAX_PLATFORMS='cpu')
  proc = subprocess.run([sys.executable, '-m', 'fmjax.classify', '--workdir', workdir, '--text', rows[0][0],
                         '--out', str(out)], capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr
  [record] = predictions_lib.read_predictions(str(out))
  assert record['prediction'] in CLASSES and set(record['probabilities']) == set(CLASSES)


def test_a_demo_folder_is_named_with_its_two_fine_tunes(tuned, tmp_path, capsys):
  workdir, rows = tuned
  demo = tmp_path / 'demo'                  # what `python -m fmjax.finetune --demo --workdir demo` leaves
  demo.mkdir()
  for arm in ('pretrained', 'random_init'):
    os.symlink(workdir, demo / arm)
  (demo / 'demo.json').write_text('{}')
  _one_line_error(capsys, ['--workdir', str(demo), '--text', rows[0][0]],
                  f'{demo} is a finetune --demo folder: classify with --workdir {demo}/pretrained '
                  f'(or {demo}/random_init)')
  with pytest.raises(CheckpointError, match='is a finetune --demo folder'):
    classify_lib.classify(str(demo), [rows[0][0]])
  got = classify_lib.classify(str(demo / 'pretrained'), [rows[0][0]])    # the named workdir classifies
  want = classify_lib.classify(workdir, [rows[0][0]])
  assert got.predictions == want.predictions
  np.testing.assert_array_equal(got.probabilities, want.probabilities)

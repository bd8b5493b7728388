"""gs:// workdirs end to end against an offline GCS (tests/fake_gcs.py: a real HTTP server that gcsfs, etils.epath,
TFDS and TensorStore talk to): train, resume bit-exactly, lock, tokenizer files, generate and evaluate."""

import json
import os

import jax
import numpy as np
import pytest

from fmjax import train
from fmjax.runtime import paths
from fmjax.checkpoints import restore
from fmjax.checkpoints import lock as workdir_lock
from fmjax.data import tokenizers
from helpers import assert_same_tree, losses_of, text_run_config


def _cfg(tmp_path, workdir, steps, **top):
  cfg = text_run_config(tmp_path, workdir=workdir, steps=steps, **{'checkpoint_every': 2, 'eval_every': 0,
                                                                   'progress_bar': False, **top})
  cfg.optim.decay_steps = 6      # the schedule does not depend on `steps`: a longer rerun resumes
  cfg.optim.warmup_steps = 2
  return cfg


def _records(path):
  return [json.loads(line) for line in paths.read_text(path).splitlines()]


@pytest.mark.slow   # trimmed from the default suite (CI runs both suites)
def test_gs_workdir_trains_resumes_bit_exactly_and_keeps_each_step_once(tmp_path, gcs):
  ref = train.train(_cfg(tmp_path, str(tmp_path / 'local'), 6))
  remote = f'{gcs}/resume/run'
  first = train.train(_cfg(tmp_path, remote, 4))
  assert sorted(int(n) for n in paths.listdir(f'{remote}/checkpoints') if n.isdigit()) == [2, 4]
  assert not os.path.exists(remote) and not os.path.exists(os.path.join(os.getcwd(), 'gs:'))  # nothing local
  second = train.train(_cfg(tmp_path, remote, 6))
  assert second.last_step == 6
  want = losses_of(ref)
  got = {**losses_of(first), **losses_of(second)}
  assert got == want                      # bit-identical fp32 losses, steps 1-6
  assert_same_tree(jax.device_get(second.state.params), jax.device_get(ref.state.params))
  steps = [r['step'] for r in _records(f'{remote}/metrics.jsonl') if r['split'] == 'train']
  assert steps == [1, 2, 3, 4, 5, 6]
  saved = json.loads(paths.read_text(f'{remote}/config.json'))
  assert saved['workdir'] == remote
  assert [n for n in paths.listdir(f'{remote}/tensorboard') if n.startswith('events.')]
  assert workdir_lock.LOCK_FILE not in paths.listdir(remote)   # released at the end


def test_restore_evaluate_and_generate_from_gs(tmp_path, gcs, capsys):
  remote = f'{gcs}/serve/run'
  result = train.train(_cfg(tmp_path, remote, 2))
  restored = restore.restore(remote)
  assert restored.step == 2
  assert_same_tree(jax.device_get(restored.params), jax.device_get(result.state.params))
  from fmjax import evaluate   # the commands (fmjax/evaluate.py, fmjax/generate.py)
  from fmjax import generate
  assert evaluate.main(['--workdir', remote, '--batches', '1']) == 0
  assert 'loss=' in capsys.readouterr().out
  assert generate.main(['--workdir', remote, '--prompt', 'the quick', '--max-new-tokens', '4']) == 0
  assert 'the quick' in capsys.readouterr().out


def test_second_run_on_a_gs_workdir_is_refused_while_the_first_holds_it(gcs):
  workdir = f'{gcs}/locked/run'
  first = workdir_lock.WorkdirLock(workdir, command='first').acquire()
  try:
    record = json.loads(paths.read_text(f'{workdir}/{workdir_lock.LOCK_FILE}'))
    assert record['command'] == 'first'
    second = workdir_lock.WorkdirLock(workdir, command='second')
    with pytest.raises(workdir_lock.WorkdirLockedError, match='in use by'):
      second.acquire()
  finally:
    first.release()
  assert not paths.exists(f'{workdir}/{workdir_lock.LOCK_FILE}')
  workdir_lock.WorkdirLock(workdir, command='third').acquire().release()


def test_exclusive_create_uses_the_stores_precondition(gcs):
  path = f'{gcs}/exclusive/object'
  assert paths.create_exclusive(path, b'one') is True
  assert paths.create_exclusive(path, b'two') is False
  assert paths.read_bytes(path) == b'one'


def test_tokenizer_file_on_gs_is_loaded_and_copied_into_the_workdir(tmp_path, gcs):
  text = tmp_path / 'text.txt'
  text.write_text('abcdefg hijk\n')
  local = tmp_path / 'chars.json'
  tokenizers.train_char([str(text)], str(local))
  remote_tok = f'{gcs}/tokenizers/chars.json'
  paths.copy(str(local), remote_tok)
  tok = tokenizers.load_tokenizer(remote_tok)
  assert list(tok.encode('abc')) == list(tokenizers.load_tokenizer(str(local)).encode('abc'))
  spec = tokenizers.place_in_workdir(tok, f'{gcs}/tokenizers/run')
  assert paths.read_bytes(f'{gcs}/tokenizers/run/{spec}') == local.read_bytes()


def test_paths_layer_is_plain_os_for_local_paths(tmp_path):
  target = str(tmp_path / 'a' / 'b.txt')
  paths.write_text(target, 'x')
  assert open(target).read() == 'x' and paths.listdir(str(tmp_path / 'a')) == ['b.txt']
  assert paths.resolve('~/w') == os.path.expanduser('~/w') and paths.resolve('gs://b/w/') == 'gs://b/w'
  assert paths.join('gs://b/w', 'checkpoints', '4') == 'gs://b/w/checkpoints/4'
  assert paths.dirname('gs://b/w/checkpoints') == 'gs://b/w' and paths.basename('gs://b/w/') == 'w'


def test_a_scheme_without_its_filesystem_package_is_one_line():
  try:
    import s3fs  # noqa: F401  (not a dependency of fmjax: what a user without it sees)
    pytest.skip('s3fs is installed here')
  except ImportError:
    pass
  with pytest.raises(paths.PathError, match=r's3://b/run: s3:// paths need the s3fs package: pip install s3fs'):
    paths.exists('s3://b/run')


@pytest.mark.slow   # end to end (the default suite keeps the train/resume/serve tests)
def test_corpus_on_gs_trains_exactly_like_the_same_corpus_on_disk(tmp_path, gcs):
  local = text_run_config(tmp_path / 'l', steps=2, progress_bar=False)
  files = sorted((tmp_path / 'l' / 'corpus').glob('*.txt'))
  for f in files:
    paths.copy(str(f), f'{gcs}/corpus/text/{f.name}')
  remote = text_run_config(tmp_path / 'r', steps=2, progress_bar=False)
  remote.data.files = f'{gcs}/corpus/text/*.txt'
  want, got = train.train(local), train.train(remote)
  assert losses_of(got) == losses_of(want)


def _labelled_csv(url, n, seed):
  rng = np.random.default_rng(seed)
  rows = ['text,label']
  for i in range(n):
    label = ('red', 'blue')[i % 2]
    cue = 'ar' if label == 'red' else 'bx'
    rows.append(''.join(rng.choice(list(cue * 3 + 'the '), size=int(rng.integers(6, 24)))) + f',{label}')
  paths.write_text(url, '\n'.join(rows) + '\n')
  return [r.rsplit(',', 1) for r in rows[1:]]


@pytest.mark.slow   # end to end (the default suite keeps the train/resume/serve tests)
def test_finetune_and_classify_with_everything_on_gs(tmp_path, gcs):
  from fmjax.inference import classify
  from fmjax.finetune import predictions
  from fmjax.finetune.run import finetune
  pre = f'{gcs}/ft/pretrained'
  train.train(_cfg(tmp_path, pre, 2))
  cfg = _cfg(tmp_path, f'{gcs}/ft/run', 6, eval_every=3)
  ft = cfg.finetune
  ft.init_from, ft.source, ft.epochs = pre, 'csv', 0.0   # 6 steps, not the epochs default
  ft.train_files, ft.eval_files = f'{gcs}/ft/data/train.csv', f'{gcs}/ft/data/eval.csv'
  _labelled_csv(ft.train_files, 40, 0)
  rows = _labelled_csv(ft.eval_files, 12, 1)
  result = finetune(cfg)
  best = json.loads(paths.read_text(f'{cfg.workdir}/best.json'))
  step = best['step']
  assert step in (3, 6) and result['last_step'] == 6
  written = predictions.read_predictions(f'{cfg.workdir}/eval/predictions_step_{step}.jsonl')
  got = classify.classify(cfg.workdir, [t for t, _ in rows], checkpoint='best')
  assert got.step == step and got.predictions == [r['prediction'] for r in written]
  report = json.loads(paths.read_text(f'{cfg.workdir}/eval/step_{step}.json'))
  records = got.records([t for t, _ in rows], [label for _, label in rows])
  assert predictions.confusion_from_predictions(records, got.class_names).tolist() == report['confusion']
  assert not os.path.exists(os.path.join(os.getcwd(), 'gs:'))


def test_train_command_keeps_a_gs_workdir_as_a_url(tmp_path, gcs, capsys):
  """The CLI path: `--workdir gs://...` is not made into $PWD/gs:/... and the run lands in the bucket."""
  from helpers import write_corpus
  corpus = write_corpus(tmp_path / 'corpus')
  workdir = f'{gcs}/cli/run/'
  argv = ['--config', 'default', '--workdir', workdir, '--config.steps=2', '--config.checkpoint_every=2',
          '--config.model.num_layers=1', '--config.model.d_model=32', '--config.model.num_heads=2',
          '--config.model.num_kv_heads=2', '--config.model.mlp_dim=64', '--config.seq_len=32',
          '--config.global_batch_size=8', '--config.eval_every=0', '--config.progress_bar=false',
          '--config.data.source=text', f'--config.data.files={corpus}', f'--config.data.cache_dir={tmp_path / "c"}']
  assert train.main(argv) == 0, capsys.readouterr().err
  assert json.loads(paths.read_text(f'{gcs}/cli/run/config.json'))['workdir'] == f'{gcs}/cli/run'
  assert '2' in paths.listdir(f'{gcs}/cli/run/checkpoints')
  assert not os.path.exists(tmp_path / 'gs:') and not os.path.exists(os.path.join(os.getcwd(), 'gs:'))


@pytest.mark.slow   # end to end, like the classify one above
def test_dpo_with_everything_on_gs_keeps_its_reference_there_and_resumes(tmp_path, gcs):
  """finetune.task=dpo with the pairs, the pretrained checkpoint and the workdir on gs://: the reference
  log-probabilities and the samples land in the bucket, and a resume reads the reference back from it."""
  from fmjax.finetune.run import finetune
  pre = f'{gcs}/dpo/pretrained'
  train.train(_cfg(tmp_path, pre, 2))
  rows = [{'prompt': f'inc {i}', 'chosen': str(i + 1), 'rejected': str(i + 7)} for i in range(24)]
  for name, part in (('train', rows[:20]), ('eval', rows[20:])):
    paths.write_text(f'{gcs}/dpo/data/{name}.jsonl', ''.join(json.dumps(r) + '\n' for r in part))
  cfg = _cfg(tmp_path, f'{gcs}/dpo/run', 2, eval_every=2, seq_len=32)
  ft = cfg.finetune
  ft.init_from, ft.task, ft.epochs, ft.validation_fraction = pre, 'dpo', 0.0, 0.0
  ft.train_files, ft.eval_files = f'{gcs}/dpo/data/train.jsonl', f'{gcs}/dpo/data/eval.jsonl'
  ft.sample_prompts, ft.sample_tokens = 1, 2
  first = finetune(cfg)
  reference = paths.read_bytes(f'{cfg.workdir}/dpo_reference.npz')
  assert first['last_step'] == 2 and paths.exists(f'{cfg.workdir}/eval/samples_step_2.jsonl')
  cfg.steps, cfg.allow_config_change = 4, True
  resumed = finetune(cfg)
  assert resumed['last_step'] == 4 and [s for s, _ in resumed['history']] == [3, 4]
  assert paths.read_bytes(f'{cfg.workdir}/dpo_reference.npz') == reference
  assert not os.path.exists(os.path.join(os.getcwd(), 'gs:'))

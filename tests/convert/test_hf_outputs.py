"""Conversions never clobber, bad Hugging Face inputs are one line (exit 2, nothing written), the byte
tokenizer exports as a tokenizer.json, and the Python API (fmjax.api) loads an imported model."""

import json
import os

import numpy as np
import pytest

torch = pytest.importorskip('torch')
transformers = pytest.importorskip('transformers')
pytest.importorskip('tokenizers')
from safetensors.numpy import load_file, save_file  # noqa: E402

from fmjax.inference import api  # noqa: E402
from fmjax.convert.cli import main as convert_main  # noqa: E402
from fmjax.data import tokenizers  # noqa: E402


def tiny_llama(path, vocab=300, **config):
  """A tiny transformers Llama (byte-tokenizer sized vocab) saved as safetensors, no tokenizer files."""
  torch.manual_seed(0)
  cfg = transformers.LlamaConfig(vocab_size=vocab, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                 **config)
  model = transformers.LlamaForCausalLM(cfg)
  model.eval()
  model.save_pretrained(path, safe_serialization=True)
  return model


@pytest.fixture(scope='module')
def hf_dir(tmp_path_factory):
  path = tmp_path_factory.mktemp('hf') / 'llama'
  tiny_llama(path)
  return path


def listing(path):
  """Files under `path` (Orbax's content-named data files as 'state/d/*')."""
  names = (os.path.relpath(os.path.join(d, f), path) for d, _, files in os.walk(path) for f in files)
  return sorted({os.path.join(os.path.dirname(n), '*') if os.path.basename(os.path.dirname(n)) == 'd' else n
                 for n in names})


def one_line_error(capsys, *words):
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith('fmjax-convert: error:'), err
  for w in words:
    assert w in err, err
  return err


def test_writers_refuse_non_empty_outputs_unless_overwrite(hf_dir, tmp_path, capsys):
  fm = tmp_path / 'fm'
  assert convert_main(['from-hf', '--hf-dir', str(hf_dir), '--out', str(fm), '--tokenizer', 'byte']) == 0
  first = listing(fm)
  for argv in (['from-hf', '--hf-dir', str(hf_dir), '--tokenizer', 'byte'],
               ['to-hf', '--workdir', str(fm)], ['params-only', '--workdir', str(fm)]):
    out = tmp_path / f'out_{argv[0]}'
    out.mkdir()
    (out / 'model.safetensors').write_text('old weights')   # what transformers would load instead
    (out / 'tokenizer.model').write_text('stale')
    assert convert_main(argv + ['--out', str(out)]) == 2
    one_line_error(capsys, 'is not empty', '--overwrite')
    assert listing(out) == ['model.safetensors', 'tokenizer.model']     # untouched
    assert convert_main(argv + ['--out', str(out), '--overwrite']) == 0
    new = listing(out)
    assert 'tokenizer.model' not in new, new                             # only the new files remain
    if argv[0] == 'to-hf':
      assert load_file(str(out / 'model.safetensors'))                   # the new weights
      assert 'tokenizer.json' in new                                     # the byte tokenizer, for AutoTokenizer
    else:
      assert 'model.safetensors' not in new and new == first
  assert not [p for p in os.listdir(tmp_path) if '.partial-' in p]       # no staging directories left


def _bad_inputs(hf_dir, tmp_path):
  """(name, directory, words of the expected message) for each bad input."""
  def copy(name, edit_config=None, edit_tensors=None):
    d = tmp_path / name
    d.mkdir()
    for f in os.listdir(hf_dir):
      (d / f).write_bytes((hf_dir / f).read_bytes())
    if edit_config:
      cfg = json.loads((d / 'config.json').read_text())
      edit_config(cfg)
      (d / 'config.json').write_text(json.dumps(cfg))
    if edit_tensors:
      tensors = load_file(str(d / 'model.safetensors'))
      edit_tensors(tensors)
      save_file(tensors, str(d / 'model.safetensors'), metadata={'format': 'pt'})
    return d

  truncated = copy('truncated')
  data = (truncated / 'model.safetensors').read_bytes()
  (truncated / 'model.safetensors').write_bytes(data[:len(data) // 2])
  invalid = copy('invalid_json')
  (invalid / 'config.json').write_text('{"model_type": "llama",')
  tied = copy('tied_distinct_head', lambda c: c.update(tie_word_embeddings=True),
              lambda t: t.__setitem__('lm_head.weight', t['model.embed_tokens.weight'] + 1))
  rope = copy('rope_two_forms', lambda c: c.update(rope_parameters=dict(rope_type='default', rope_theta=1e4),
                                                   rope_scaling=dict(rope_type='linear', factor=2.0)))
  return [('truncated', truncated, ('damaged or truncated', 'model.safetensors')),
          ('invalid', invalid, ('config.json is not valid JSON',)),
          ('missing key', copy('missing_key', lambda c: c.pop('hidden_size')), ("no 'hidden_size'",)),
          ('tied', tied, ('tie_word_embeddings=true', 'lm_head.weight')),
          ('rope', rope, ('rope_parameters.rope_type', 'contradicts rope_scaling'))]


def test_bad_inputs_are_one_line_and_write_nothing(hf_dir, tmp_path, capsys):
  for name, directory, words in _bad_inputs(hf_dir, tmp_path):
    out = tmp_path / f'out_{directory.name}'
    assert convert_main(['from-hf', '--hf-dir', str(directory), '--out', str(out)]) == 2, name
    one_line_error(capsys, *words)
    assert not out.exists(), name
  assert not [p for p in os.listdir(tmp_path) if '.partial-' in p]


def test_model_type_missing_uses_architectures_and_bf16_verify_passes(hf_dir, tmp_path, capsys):
  d = tmp_path / 'no_type'
  d.mkdir()
  for f in os.listdir(hf_dir):
    (d / f).write_bytes((hf_dir / f).read_bytes())
  cfg = json.loads((d / 'config.json').read_text())
  cfg.pop('model_type')
  assert cfg['architectures'] == ['LlamaForCausalLM']
  (d / 'config.json').write_text(json.dumps(cfg))
  assert convert_main(['from-hf', '--hf-dir', str(d), '--out', str(tmp_path / 'fm'), '--dtype', 'bfloat16',
                       '--verify', '--tokenizer', 'byte']) == 0
  assert 'verify: max abs logits diff' in capsys.readouterr().out


def test_byte_tokenizer_exports_for_autotokenizer(hf_dir, tmp_path):
  fm, out = tmp_path / 'fm', tmp_path / 'hf_out'
  assert convert_main(['from-hf', '--hf-dir', str(hf_dir), '--out', str(fm), '--tokenizer', 'byte']) == 0
  assert convert_main(['to-hf', '--workdir', str(fm), '--out', str(out)]) == 0
  auto = transformers.AutoTokenizer.from_pretrained(str(out))
  byte = tokenizers.ByteTokenizer()
  for text in ['hello world', '  two  spaces\n\ttab', 'naïve café 日本語 😀', '<s> not special']:
    assert auto(text)['input_ids'] == [byte.bos_id] + byte.encode(text).tolist()
    assert auto.decode(auto(text)['input_ids'], skip_special_tokens=True) == text
  assert (auto.pad_token_id, auto.bos_token_id, auto.eos_token_id) == (0, 1, 2)


def test_python_api_loads_an_imported_model(tmp_path):
  model = tiny_llama(tmp_path / 'hf', rope_theta=5e5, rms_norm_eps=1e-6)
  assert convert_main(['from-hf', '--hf-dir', str(tmp_path / 'hf'), '--out', str(tmp_path / 'fm'),
                       '--tokenizer', 'byte']) == 0
  lm = api.load(str(tmp_path / 'fm'))
  assert lm.context_length == 64 and lm.config.model.rope_theta == 5e5 and lm.config.model.norm_eps == 1e-6
  texts = ['hello', 'a longer text with more bytes']
  logits = lm.logits(texts)
  for text, got in zip(texts, logits):
    ids = lm.encode(text)
    with torch.no_grad():
      want = model(torch.tensor([ids])).logits[0].numpy()
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-4
  scores = lm.score(texts)
  want = [float(-np.mean([np.log(np.exp(l[i] - l[i].max()).sum() ** -1 * np.exp(l[i, t] - l[i].max()))
                           for i, t in enumerate(lm.encode(x)[1:])])) for x, l in zip(texts, logits)]
  assert np.allclose(scores, want, atol=1e-4)
  assert len(lm.generate(['hi'], max_new_tokens=3)) == 1
  # The context may be lowered, not raised; a contradicting model field is refused in one line.
  assert api.load(str(tmp_path / 'fm'), ['model.max_seq_len=32']).context_length == 32
  with pytest.raises(Exception, match=r'model\.norm_eps=1e-05 \(config\) contradicts .* model\.norm_eps=1e-06'):
    api.load(str(tmp_path / 'fm'), ['model.norm_eps=1e-5'])


def test_exported_files_take_the_mode_of_the_umask(hf_dir, tmp_path):
  """model.safetensors (which safetensors creates 0600) is readable like the other files: 0644 under
  umask 022, 0640 under 027."""
  import stat
  from fmjax.convert import hf_io
  fm = tmp_path / 'fm'
  assert convert_main(['from-hf', '--hf-dir', str(hf_dir), '--out', str(fm), '--tokenizer', 'byte']) == 0
  modes = lambda d: {n: stat.S_IMODE(os.stat(d / n).st_mode) for n in os.listdir(d)}
  old = os.umask(0o027)
  try:
    assert convert_main(['to-hf', '--workdir', str(fm), '--out', str(tmp_path / 'hf')]) == 0
    (tmp_path / 'shards').mkdir()
    os.umask(0o022)
    hf_io.write_shards(str(tmp_path / 'shards'), [['a'], ['b']], lambda name: np.zeros(3, np.float32))
  finally:
    os.umask(old)
  exported = modes(tmp_path / 'hf')
  assert 'model.safetensors' in exported and set(exported.values()) == {0o640}, exported
  assert modes(tmp_path / 'shards') == {'model-00001-of-00002.safetensors': 0o644,
                                        'model-00002-of-00002.safetensors': 0o644, hf_io.INDEX: 0o644}

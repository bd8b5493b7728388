"""Generation: KV cache vs full forward, sampling, a trained checkpoint, CLI errors."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.inference import decode
from fmjax import generate as generate_command
from fmjax.inference import generate
from fmjax.checkpoints import restore
from fmjax.checkpoints.store import CheckpointError
from fmjax.model import Transformer
from fmjax.model.transformer import init_cache
from helpers import tiny_config, train_tiny


@pytest.fixture(scope='module')
def restored(tmp_path_factory):
  return restore.restore(train_tiny(tmp_path_factory.getbasetemp()))


def _model(**overrides):
  cfg = tiny_config(**overrides).model
  model = Transformer(cfg)
  return model, jax.jit(model.init)(jax.random.PRNGKey(1), jnp.zeros((1, 16), jnp.int32))['params']


@pytest.mark.parametrize('overrides', [
    dict(scan_layers=True),                                                    # GQA (4 heads, 2 KV heads)
    dict(scan_layers=False, num_kv_heads=1, positions='learned', remat='full'),  # MQA, learned positions
    dict(scan_layers=True, sliding_window=2, window_pattern='LG', rope_local_theta=100.0),  # local + global
    dict(scan_layers=False, sliding_window=3, remat='full'),                 # every layer windowed (Mistral)
])
def test_kv_cache_matches_full_forward_with_padding(overrides):
  model, params = _model(**overrides)
  batch = decode.left_pad([[5, 6, 7, 8, 9, 10, 11], [12, 13, 14], [15]], pad_id=0)
  apply = jax.jit(model.apply, static_argnames=('decode', 'mutable'))
  full = apply({'params': params}, batch['tokens'], batch['positions'], batch['segment_ids'])
  cache = init_cache(model, 3, 12)
  pieces = [(0, 4)] + [(i, i + 1) for i in range(4, 7)]   # prefill 4 slots, then one token at a time
  outs = []
  for a, b in pieces:
    cut = {k: v[:, a:b] for k, v in batch.items()}
    logits, mutated = apply({'params': params, 'cache': cache}, cut['tokens'], cut['positions'],
                            cut['segment_ids'], decode=True, mutable=('cache',))
    cache = mutated['cache']
    outs.append(logits)
  real = batch['segment_ids'] > 0
  np.testing.assert_allclose(np.asarray(jnp.concatenate(outs, 1))[real], np.asarray(full)[real], atol=1e-5)
  # and each padded row agrees with the same prompt run alone, unpadded
  alone = apply({'params': params}, jnp.asarray([[12, 13, 14]]))
  np.testing.assert_allclose(np.asarray(full)[1, -3:], np.asarray(alone)[0], atol=1e-5)


def test_sample_logits_top_k_top_p():
  logits = jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]] * 256))
  rng = jax.random.PRNGKey(0)
  greedy = decode.sample_logits(logits, rng, decode.Sampling(temperature=0.0))
  assert (np.asarray(greedy) == 0).all()
  top1 = decode.sample_logits(logits, rng, decode.Sampling(top_k=1))
  assert (np.asarray(top1) == 0).all()
  top2 = np.asarray(decode.sample_logits(logits, rng, decode.Sampling(top_k=2)))
  assert set(top2.tolist()) == {0, 1}
  nucleus = np.asarray(decode.sample_logits(logits, rng, decode.Sampling(top_p=0.7)))   # 0.5 + 0.3 reach 0.7
  assert set(nucleus.tolist()) == {0, 1}
  free = np.asarray(decode.sample_logits(logits, rng, decode.Sampling()))
  assert set(free.tolist()) == {0, 1, 2, 3}


def _reference_greedy(restored, prompt: str, n: int) -> list:
  """Greedy decoding by full forward passes of the growing sequence (no cache, no left padding)."""
  ids = generate.encode_prompts(restored, [prompt])[0]
  forward = jax.jit(restored.model.apply)
  out = []
  for _ in range(n):
    seq = ids + out
    row = np.zeros((1, 32), np.int32)   # right padding cannot change earlier (causal) positions
    row[0, :len(seq)] = seq
    logits = forward({'params': restored.params}, row)
    out.append(int(jnp.argmax(logits[0, len(seq) - 1])))
  return out


def test_generation_from_checkpoint(restored):
  prompts = ['the cat', 'the dog ate the b']
  greedy = generate.generate(restored, prompts, max_new_tokens=8)
  assert greedy.tokens_per_second > 0
  for prompt, tokens in zip(prompts, greedy.tokens):
    reference = _reference_greedy(restored, prompt, len(tokens))
    assert tokens == reference
  again = generate.generate(restored, prompts, max_new_tokens=8)
  assert again.tokens == greedy.tokens
  top1 = generate.generate(restored, prompts, 8, decode.sampling_options(temperature=0.7, top_k=1), seed=3)
  assert top1.tokens == greedy.tokens
  hot = decode.sampling_options(temperature=2.0)
  a = generate.generate(restored, prompts, 8, hot, seed=0)
  b = generate.generate(restored, prompts, 8, hot, seed=0)
  c = generate.generate(restored, prompts, 8, hot, seed=1)
  assert a.tokens == b.tokens and a.tokens != c.tokens
  stopped = generate.cut_at_stop('the cat sat. the dog', ['.', 'dog'])
  assert stopped == 'the cat sat'


def test_trained_checkpoint_scores_better_than_random(restored):
  from fmjax.inference import evaluate
  held_out = ['the dog sat on the mat. the cat ate the bone.']
  trained = evaluate.score_texts(restored, held_out)
  random = evaluate.score_texts(restored, held_out, params=restore.random_params(restored))
  assert trained < random - 1.0, (trained, random)


def test_errors(restored, tmp_path, capsys):
  with pytest.raises(CheckpointError, match='no checkpoint'):
    restore.restore(str(tmp_path))
  assert generate_command.main(['--workdir', str(tmp_path), '--prompt', 'x']) == 2
  assert capsys.readouterr().err.startswith('fmjax.generate: error: no checkpoint in')
  with pytest.raises(decode.DecodeError, match='model context is 32'):
    generate.generate(restored, ['x' * 40])
  with pytest.raises(decode.DecodeError, match="unknown sampling option 'top_z'"):
    decode.sampling_options(top_z=3)
  workdir = restored.cfg.workdir
  for argv in (['--prompt', 'x' * 40], ['--prompt', 'x', '--top-z', '3'], ['--prompt', 'x', '--top-p', '1.5'],
               ['--prompt-file', str(tmp_path / 'missing.txt')], ['--prompt', 'x', '--mesh', '2,2']):
    assert generate_command.main(['--workdir', workdir] + argv) == 2, argv
    err = capsys.readouterr().err.strip()
    assert err.startswith('fmjax.generate: error: ') and '\n' not in err, err


def test_cli(restored, tmp_path, capsys):
  prompts = tmp_path / 'prompts.txt'
  prompts.write_text('the cat\nthe dog ate\n')
  argv = ['--workdir', restored.cfg.workdir, '--prompt-file', str(prompts), '--prompt', 'the', '--max-new-tokens',
          '6', '--temperature', '0.8', '--top-p', '0.9', '--seed', '1', '--mesh', '2,4,1', '--stop', '\n']
  assert generate_command.main(argv) == 0
  out = capsys.readouterr().out
  assert out.count('--- [') == 3 and 'tokens/s' in out


def test_context_cap_is_reported_in_one_line(restored, capsys):
  prompt = 'the cat sat on the '                     # bos + 19 bytes = 20 tokens of a 32-token context
  notes = []
  capped = generate.generate(restored, [prompt], max_new_tokens=64, warn=notes.append)
  assert notes == ['note: max_new_tokens=64 capped to 12 by the model context 32 and the prompt of 20 tokens']
  assert capped.steps <= 12 and len(capped.tokens[0]) <= 12
  fits = generate.generate(restored, [prompt], max_new_tokens=12, warn=notes.append)
  assert len(notes) == 1 and fits.tokens == capped.tokens     # no note when everything fits
  assert generate_command.main(['--workdir', restored.cfg.workdir, '--prompt', prompt, '--max-new-tokens', '64']) == 0
  err = capsys.readouterr().err.strip().splitlines()
  assert [line for line in err if 'capped' in line] == [notes[0]], err


def test_context_cap_is_said_before_decoding(restored):
  prompt = 'abcdefghijklmnopqrstuvw'                 # bos + 23 bytes = 24 tokens: a shape no other test decodes
  said = []
  generate.generate(restored, [prompt], max_new_tokens=300, warn=lambda m: said.append((m, set(restored.compiled))))
  (note, compiled_then), = said
  assert note == 'note: max_new_tokens=300 capped to 8 by the model context 32 and the prompt of 24 tokens'
  assert [k[2:] for k in set(restored.compiled) - compiled_then] == [(24, 8)]   # compiled and decoded after the note

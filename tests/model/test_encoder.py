"""Encoders (model.kind='encoder'): non-causal attention against NumPy, document isolation of the
MLM logits, post-LN / token types, masking (rates, determinism, whole words), the MLM train step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config as config_lib
from fmjax.objectives import mlm
from fmjax.data import tokenizers
from fmjax.model import Transformer
from fmjax.model import attention as attn
from fmjax.model import splash
from helpers import tiny_config


def encoder_config(**overrides):
  return tiny_config(**{**dict(kind='encoder', activation='gelu_exact', norm='layernorm', use_bias=True,
                                positions='learned', max_seq_len=32), **overrides})


def _qkv(b=3, t=32, h=4, kh=2, d=8, seed=0):
  k1, k2, k3 = jax.random.split(jax.random.PRNGKey(seed), 3)
  return (jax.random.normal(k1, (b, t, h, d)), jax.random.normal(k2, (b, t, kh, d)),
          jax.random.normal(k3, (b, t, kh, d)))


def _packed_segments(b=3, t=32):
  seg = np.ones((b, t), np.int32)
  seg[0, 11:] = 2            # two documents
  seg[1, 5:] = 2
  seg[1, 19:] = 3            # three documents then padding
  seg[1, 27:] = 0
  seg[2, 20:] = 0            # one document then padding
  return seg


def numpy_bidirectional(q, k, v, seg):
  """Independent reference (float64): each real query attends to every key of its document, in
  both directions; padded keys never. Rows of padded queries are left 0 (nothing uses them)."""
  q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
  b, t, h, d = q.shape
  g = h // k.shape[2]
  out = np.zeros_like(q)
  for bi in range(b):
    for hi in range(h):
      for i in range(t):
        if seg[bi, i] == 0:
          continue
        keys = np.flatnonzero(seg[bi] == seg[bi, i])
        s = k[bi, keys, hi // g] @ q[bi, i, hi] / np.sqrt(d)
        p = np.exp(s - s.max())
        out[bi, i, hi] = (p / p.sum()) @ v[bi, keys, hi // g]
  return out


def _real(x, seg):
  return np.asarray(x)[seg != 0]


@pytest.mark.parametrize('impl', ['xla', 'dense', 'chunked'])
def test_noncausal_attention_matches_numpy_with_packing_and_padding(impl):
  q, k, v = _qkv()
  seg = _packed_segments()
  out = attn.attend(impl, q, k, v, jnp.asarray(seg), jnp.asarray(seg), chunk=8, causal=False)
  np.testing.assert_allclose(_real(out, seg), _real(numpy_bidirectional(q, k, v, seg), seg), atol=2e-5)
  assert np.isfinite(np.asarray(out)).all()


def test_noncausal_dense_and_chunked_gradients_match_the_xla_reference():
  q, k, v = _qkv(t=24)
  seg = jnp.asarray(_packed_segments(t=24))
  w = jax.random.normal(jax.random.PRNGKey(3), q.shape) * (seg[..., None, None] != 0)
  def grads(impl):
    return jax.grad(lambda q, k, v: (attn.attend(impl, q, k, v, seg, seg, chunk=8, causal=False) * w).sum(),
                    argnums=(0, 1, 2))(q, k, v)
  want = grads('xla')
  for impl in ('dense', 'chunked'):
    for g, r in zip(grads(impl), want):
      np.testing.assert_allclose(np.asarray(g), np.asarray(r), atol=5e-5)


def test_noncausal_splash_in_interpret_mode_matches_numpy():
  """The TPU splash kernel with a full (not causal) mask, run by the Pallas interpreter."""
  q, k, v = _qkv(b=2, t=128, kh=4, seed=1)
  seg = np.ones((2, 128), np.int32)
  seg[0, 50:] = 2
  seg[1, 90:] = 0
  out = splash.splash_attention(q, k, v, jnp.asarray(seg), jnp.asarray(seg), block=128, interpret=True,
                                causal=False)
  np.testing.assert_allclose(_real(out, seg), _real(numpy_bidirectional(q, k, v, seg), seg), atol=2e-5)


def test_noncausal_gpu_flash_in_interpret_mode_matches_numpy():
  q, k, v = _qkv(b=1, t=128, h=2, kh=2, d=16, seed=2)
  seg = np.ones((1, 128), np.int32)
  seg[0, 70:] = 2
  out = splash.gpu_flash_attention(q, k, v, jnp.asarray(seg), jnp.asarray(seg), interpret=True, causal=False)
  np.testing.assert_allclose(np.asarray(out), numpy_bidirectional(q, k, v, seg), atol=2e-5)


def test_noncausal_cudnn_call_through_the_xla_implementation_matches_numpy():
  """cudnn_attention(..., implementation='xla') is the very call the cuDNN path makes (one
  document per row, padding by length), here with is_causal=False."""
  q, k, v = _qkv()
  seg = np.ones((3, 32), np.int32)
  seg[1, 20:] = 0
  seg[2, 9:] = 0
  out = attn.cudnn_attention(q, k, v, jnp.asarray(seg), jnp.asarray(seg), implementation='xla', causal=False)
  np.testing.assert_allclose(_real(out, seg), _real(numpy_bidirectional(q, k, v, seg), seg), atol=2e-5)


def test_causal_and_noncausal_differ():
  """The flag is not ignored: the first token sees the future only without the causal mask."""
  q, k, v = _qkv()
  seg = jnp.ones((3, 32), jnp.int32)
  a = attn.attend('dense', q, k, v, seg, seg, causal=True)
  b = attn.attend('dense', q, k, v, seg, seg, causal=False)
  assert not np.allclose(np.asarray(a[:, 0]), np.asarray(b[:, 0]))


def _apply(cfg, tokens, positions=None, segments=None, params=None):
  model = Transformer(cfg.model)
  if params is None:
    params = model.init(jax.random.PRNGKey(0), tokens)['params']
  return model.apply({'params': params}, tokens, positions, segments), params


@pytest.mark.parametrize('overrides', [dict(attention='dense'), dict(attention='chunked', attention_chunk=8),
                                       dict(norm_position='post', type_vocab_size=2, positions='rope')])
def test_mlm_logits_of_a_document_do_not_change_when_another_is_packed_beside_it(overrides):
  cfg = encoder_config(**overrides)
  rng = np.random.default_rng(1)
  doc_a, doc_b = rng.integers(3, 64, 9), rng.integers(3, 64, 7)
  alone, params = _apply(cfg, jnp.asarray(doc_a[None], jnp.int32))
  # doc_a first, then doc_b after it (bidirectional: doc_b is in doc_a's "future"), then padding
  packed = np.concatenate([doc_a, doc_b, [0, 0]])[None]
  seg = np.array([[1] * 9 + [2] * 7 + [0, 0]])
  pos = np.array([list(range(9)) + list(range(7)) + [0, 0]])
  got, _ = _apply(cfg, jnp.asarray(packed, jnp.int32), jnp.asarray(pos), jnp.asarray(seg), params)
  np.testing.assert_allclose(np.asarray(got[0, :9]), np.asarray(alone[0]), atol=1e-5)
  # and a decoder would not see doc_a's later tokens: the encoder's first token does
  other = doc_a.copy()
  other[-1] = (other[-1] + 1 - 3) % 61 + 3
  changed, _ = _apply(cfg, jnp.asarray(other[None], jnp.int32), params=params)
  assert not np.allclose(np.asarray(changed[0, 0]), np.asarray(alone[0, 0]))


def test_encoder_parameters_post_norm_and_token_types():
  cfg = encoder_config(norm_position='post', type_vocab_size=2)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, 64, (2, 16)), jnp.int32)
  logits, params = _apply(cfg, tokens)
  assert logits.shape == (2, 16, 64)
  assert {'embed_norm', 'type_embedding', 'mlm_head'} <= set(params) and 'final_norm' not in params
  assert 'lm_head' not in params and set(params['mlm_head']) == {'dense', 'norm', 'bias'}
  model = Transformer(cfg.model)
  typed = model.apply({'params': params}, tokens, token_types=jnp.ones_like(tokens))
  assert not np.allclose(np.asarray(typed), np.asarray(logits))


def test_encoder_config_validation():
  cfg = encoder_config(loss_vocab_chunk=16)
  with pytest.raises(config_lib.ConfigError, match='loss_vocab_chunk'):
    config_lib.validate(cfg)
  cfg = encoder_config()
  cfg.mlm.mask_token_rate, cfg.mlm.random_token_rate = 0.8, 0.3
  with pytest.raises(config_lib.ConfigError, match='mask_token_rate'):
    config_lib.validate(cfg)
  cfg = encoder_config(kind='bidirectional')
  with pytest.raises(config_lib.ConfigError, match='model.kind'):
    config_lib.validate(cfg)


def test_tokenizers_give_encoder_special_tokens(tmp_path):
  byte = tokenizers.ByteTokenizer()
  assert (byte.cls_id, byte.sep_id, byte.mask_id) == (byte.bos_id, byte.eos_id, 258)
  text = 'naïve ÿ \U0001F600 text'
  assert byte.mask_id not in byte.encode(text)   # byte 0xFF never occurs in UTF-8
  path = tokenizers.train_sentencepiece(['a b c dd eee ' * 50 + str(i) for i in range(200)].__iter__(), 300,
                                        output=str(tmp_path / 'sp.model'))
  sp = tokenizers.load_tokenizer(path)
  assert (sp.cls_id, sp.sep_id, sp.mask_id) == (sp.bos_id, sp.eos_id, tokenizers.UNK_ID)
  assert sp.mask_id not in sp.encode('any text \x00 at all ☃')


def _spec(**cfg):
  mlm_cfg = config_lib.mlm_defaults()
  mlm_cfg.update(cfg)
  return mlm.spec_for(tokenizers.ByteTokenizer(), mlm_cfg, 259)


def _byte_batch(texts, t=64):
  tok = tokenizers.ByteTokenizer()
  inputs = np.zeros((len(texts), t), np.int32)
  seg = np.zeros((len(texts), t), np.int32)
  for i, text in enumerate(texts):
    ids = tok.encode(text)[:t]
    inputs[i, :len(ids)], seg[i, :len(ids)] = ids, 1
  return {'inputs': jnp.asarray(inputs), 'segment_ids': jnp.asarray(seg),
          'positions': jnp.asarray(np.tile(np.arange(t), (len(texts), 1)), jnp.int32),
          'targets': jnp.zeros_like(inputs), 'weights': jnp.ones(inputs.shape, jnp.float32)}


def test_masking_rates_targets_and_weights():
  spec = _spec()
  rng = np.random.default_rng(0)
  texts = [''.join(rng.choice(list('abcdefgh ')) for _ in range(200)) for _ in range(64)]
  batch = _byte_batch(texts, t=128)
  batch['inputs'] = batch['inputs'].at[:, 0].set(tokenizers.BOS_ID)   # a special token: never chosen
  out = jax.jit(lambda b, s: mlm.mask_batch(spec, 0, s, b))(batch, jnp.int32(7))
  chosen = np.asarray(out['weights']) > 0
  inputs, masked = np.asarray(batch['inputs']), np.asarray(out['inputs'])
  np.testing.assert_array_equal(np.asarray(out['targets']), inputs)
  assert not chosen[:, 0].any()
  assert abs(chosen[:, 1:].mean() - 0.15) < 0.01
  assert (masked[~chosen] == inputs[~chosen]).all()          # unchosen tokens untouched
  as_mask = (masked == spec.mask_id)[chosen].mean()
  kept = (masked == inputs)[chosen].mean()
  assert abs(as_mask - 0.8) < 0.03 and abs(kept - 0.1 - 0.1 * (1 / 256)) < 0.03
  assert np.isin(masked[chosen & (masked != spec.mask_id)], spec.candidates).all()


def test_masks_are_a_function_of_seed_step_and_row():
  spec = _spec()
  batch = _byte_batch(['same text in every row of the batch'] * 4)
  f = jax.jit(lambda b, s, seed: mlm.mask_batch(spec, seed, s, b), static_argnums=2)
  a, again = f(batch, jnp.int32(3), 0), f(batch, jnp.int32(3), 0)
  np.testing.assert_array_equal(np.asarray(a['inputs']), np.asarray(again['inputs']))
  w = np.asarray(a['weights'])
  assert not (w[0] == w[1]).all()                                                  # rows differ
  assert not (np.asarray(f(batch, jnp.int32(4), 0)['weights']) == w).all()          # steps differ
  assert not (np.asarray(f(batch, jnp.int32(3), 1)['weights']) == w).all()          # seeds differ
  # a row's mask does not depend on the other rows (or on sharding the batch)
  np.testing.assert_array_equal(np.asarray(f({k: v[:2] for k, v in batch.items()}, jnp.int32(3), 0)['weights']),
                                w[:2])
  # eval masks depend on each row's content, not on the step or its slot
  e = mlm.mask_batch(spec, 0, None, batch)
  np.testing.assert_array_equal(np.asarray(e['weights'][0]), np.asarray(e['weights'][3]))


def test_whole_word_masking_chooses_whole_words():
  spec = _spec(whole_word=True, mask_rate=0.3)
  text = 'alpha beta_2 gamma(delta) épée x y zz ' * 3
  batch = _byte_batch([text] * 16, t=120)
  out = mlm.mask_batch(spec, 0, jnp.int32(1), batch)
  tok = np.asarray(batch['inputs'][0])
  raw = bytes((tok - 3).astype(np.uint8)).decode('utf-8', errors='replace')
  word_of = np.asarray(mlm.word_ids(spec, batch['inputs'][0], batch['segment_ids'][0]))
  # the word boundaries are those of the text: runs of word bytes (letters, digits, _ and UTF-8)
  assert len(set(word_of[:5].tolist())) == 1 and word_of[5] != word_of[4] and word_of[6] != word_of[5]
  assert len(set(word_of[6:12].tolist())) == 1                            # 'beta_2'
  assert raw.startswith('alpha beta_2')
  weights = np.asarray(out['weights'])
  for row in weights:
    for w in np.unique(word_of):
      inside = row[word_of == w]
      assert inside.min() == inside.max(), 'a word was partly chosen'
  assert weights.any()


@pytest.mark.slow   # trimmed from the default suite (CI runs both suites)
def test_mlm_train_step_only_scores_masked_tokens_and_learns():
  from fmjax.training import build
  cfg = encoder_config(vocab_size=259)
  cfg.model.update(dict(d_model=32, mlp_dim=64))
  cfg.global_batch_size, cfg.seq_len, cfg.steps = 8, 32, 30
  cfg.optim.learning_rate, cfg.optim.warmup_steps = 3e-3, 2
  run = build.build_run(cfg)
  state = run.init(jax.random.PRNGKey(0))
  text = 'def forward(self, x):\n    return self.layer(x) + x\n' * 4
  batch = _byte_batch([text] * 8, t=33)
  batch = {k: np.asarray(v[:, :32]) for k, v in batch.items()}
  from fmjax.training import loop
  losses = []
  for _ in range(30):
    state, metrics = run.train_step(state, loop.to_global(batch, run.batch_sharding))
    losses.append(float(metrics['loss']))
  assert float(metrics['tokens']) < 0.3 * 8 * 32            # weight = masked tokens only
  assert losses[-1] < 0.7 * losses[0]
  from fmjax.inference import evaluate
  result = evaluate.make_evaluator(run)(state.params, [batch])
  assert 0 < result['tokens'] < 0.3 * 8 * 32 and np.isfinite(result['loss'])


@pytest.mark.parametrize('norm_position', ['pre', 'post'])
def test_inspect_sees_bidirectional_attention_and_lens_reads_the_mlm_head(norm_position):
  from fmjax.inference import inspect as fm_inspect
  cfg = encoder_config(norm_position=norm_position, attention='xla')
  tokens = jnp.asarray(np.random.default_rng(4).integers(3, 64, (1, 12)), jnp.int32)
  model = Transformer(cfg.model)
  params = nn.meta.unbox(model.init(jax.random.PRNGKey(0), tokens)['params'])
  logits, attention, residuals = jax.jit(lambda p, t: fm_inspect.capture(model, p, t))(params, tokens)
  upper = np.triu(np.ones((12, 12), bool), 1)
  assert (np.asarray(attention)[:, 0][..., upper] > 0).all()          # every query sees later keys
  np.testing.assert_allclose(np.asarray(attention).sum(-1), 1.0, atol=1e-5)
  lens = fm_inspect.lens_logits(cfg.model, params, residuals[-1])     # the last layer's lens = the output
  np.testing.assert_allclose(np.asarray(lens), np.asarray(logits), atol=1e-5)


def test_encoder_flops_count_every_key_and_the_mlm_transform():
  from fmjax.perf import flops as metrics
  dec, enc = tiny_config().model, encoder_config(num_kv_heads=0, mlp_dim=64).model
  dec.update(dict(activation='gelu', num_kv_heads=0))
  t, d, layers = 16, 32, 2
  attn_dec = 4 * layers * (t + 1) / 2 * d
  attn_enc = 4 * layers * t * d
  assert metrics.flops_per_token(enc, t) - metrics.flops_per_token(dec, t) == pytest.approx(
      3 * (attn_enc - attn_dec + 2 * d * d))


def test_cls_pooling_takes_the_first_token():
  from fmjax.objectives.classification import pool
  hidden = jnp.arange(2 * 5 * 3, dtype=jnp.float32).reshape(2, 5, 3)
  seg = jnp.ones((2, 5), jnp.int32)
  np.testing.assert_array_equal(np.asarray(pool(hidden, seg, seg, 'cls')), np.asarray(hidden[:, 0]))

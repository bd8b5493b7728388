"""Local and global layers (model.sliding_window, window_pattern, rope_local_theta): each layer attends
as its letter of the pattern says, a scanned stack (one block, `lax.switch` on the layer's kind) equals
the unrolled layers under every CPU implementation, and its program stays the size of one block."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax.config import checks
from fmjax.config.errors import ConfigError
from fmjax.model import Transformer, attention_spec, layout
from fmjax.perf import flops
from helpers import tiny_config

PATTERN = dict(num_layers=4, sliding_window=4, window_pattern='LG', rope_local_theta=100.0)
TOKENS = jnp.asarray(np.random.default_rng(0).integers(0, 64, (2, 16)), jnp.int32)


def _apply(cfg, params=None, **kw):
  model = Transformer(cfg.model)
  if params is None:
    params = model.init(jax.random.PRNGKey(0), TOKENS)['params']
  return model.apply({'params': params}, TOKENS, **kw), params


def test_kinds_follow_the_pattern():
  m = tiny_config(num_layers=6, sliding_window=8, window_pattern='LLG').model
  kinds, index = attention_spec.layer_kinds(m)
  assert [attention_spec.is_local(m, i) for i in range(6)] == [True, True, False] * 2
  assert index == (0, 0, 1, 0, 0, 1) and [k.spec.sliding_window for k in kinds] == [8, None]
  assert attention_spec.score_spec(m).sliding_window == 8            # what an implementation must apply
  assert [k.rope_theta for k in kinds] == [10000.0, 10000.0]
  m.rope_local_theta = 10.0
  assert [k.rope_theta for k in attention_spec.layer_kinds(m)[0]] == [10.0, 10000.0]
  # FLOPs: local layers attend at most W keys
  t = 64
  want = 4 * attention_spec.mean_keys(kinds[0].spec, t) + 2 * (t + 1) / 2
  assert flops.attended_keys(m, t) == pytest.approx(want)


@pytest.mark.parametrize('attention', ['xla', 'dense', 'chunked'])
def test_scanned_stack_equals_unrolled_layers(attention):
  scanned, params = _apply(tiny_config(**PATTERN, attention=attention, attention_chunk=4))
  unrolled, _ = _apply(tiny_config(**PATTERN, attention=attention, attention_chunk=4, scan_layers=False),
                       layout.scanned_to_unrolled(params, 4))
  np.testing.assert_allclose(np.asarray(scanned), np.asarray(unrolled), atol=2e-6)


def test_each_layer_masks_as_its_letter_says():
  (_, inter), params = _apply(tiny_config(**PATTERN), mutable=['intermediates'])
  probs = np.asarray(inter['intermediates']['layers']['attn']['attention'][0])   # (L, B, H, T, S)
  q, k = np.arange(16)[:, None], np.arange(16)[None, :]
  outside = (q - k >= 4) & (k <= q)
  for layer, local in enumerate([True, False, True, False]):
    if local:
      assert (probs[layer][..., outside] == 0).all() and (probs[layer][..., (q - k < 4) & (k <= q)] > 0).all()
    else:
      assert (probs[layer][..., outside] > 0).all()
  np.testing.assert_allclose(probs.sum(-1), 1.0, atol=1e-5)
  # The pattern is what makes the model: other patterns, or no window, give other logits.
  base, _ = _apply(tiny_config(**PATTERN), params)
  for other in (dict(window_pattern='GL'), dict(window_pattern=''), dict(rope_local_theta=0.0)):
    changed, _ = _apply(tiny_config(**{**PATTERN, **other}), params)
    assert np.abs(np.asarray(changed) - np.asarray(base)).max() > 2e-5, other   # float noise: ~1e-7
  wide, _ = _apply(tiny_config(**{**PATTERN, 'sliding_window': 16, 'rope_local_theta': 0.0}), params)
  full, _ = _apply(tiny_config(num_layers=4), params)    # a window as long as the row is no window
  np.testing.assert_allclose(np.asarray(wide), np.asarray(full), atol=1e-6)


def _program_size(**model):
  cfg = tiny_config(**model)
  m = Transformer(cfg.model)
  params = jax.eval_shape(lambda: m.init(jax.random.PRNGKey(0), TOKENS))['params']
  loss = lambda p: m.apply({'params': p}, TOKENS).mean()
  return len(jax.jit(jax.grad(loss)).lower(params).compile().as_text())


def test_a_gemma3_shaped_stack_compiles_to_about_one_block():
  """26 layers in a 5 local : 1 global pattern, scanned: the compiled forward + backward program is about
  the size of a uniform scanned stack's, far below one unrolled pattern period's."""
  gemma3 = dict(num_layers=26, sliding_window=4, window_pattern='LLLLLG', rope_local_theta=100.0)
  patterned = _program_size(**gemma3)
  uniform = _program_size(num_layers=26)
  period = _program_size(**{**gemma3, 'num_layers': 6, 'scan_layers': False})
  print(f'compiled text: patterned scan {patterned}, uniform scan {uniform}, one unrolled period {period}')
  assert patterned < 1.6 * uniform and patterned < 1.2 * period


@pytest.mark.parametrize('model,match', [
    (dict(sliding_window=4, window_pattern='LX'), "window_pattern must be letters L"),
    (dict(window_pattern='LG'), "window_pattern='LG' marks local layers but model.sliding_window=0"),
    (dict(rope_local_theta=10.0), 'rope_local_theta is the RoPE base of local layers'),
])
def test_bad_patterns_are_one_line(model, match):
  cfg = tiny_config(**model)
  with pytest.raises(ConfigError, match=match):
    checks.validate(cfg)

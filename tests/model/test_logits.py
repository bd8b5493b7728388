"""The one logits function: the model's head, the lens's, the prefill's and the fused loss's agree."""

import jax
import jax.numpy as jnp
import flax.linen as nn
import numpy as np
import pytest

from fmjax.model import Transformer
from fmjax.model import logits as logits_lib
from fmjax.model.logits import LogitSpec
from fmjax.objectives import lm
from helpers import tiny_config

CONFIGS = {
    'tied': dict(tie_embeddings=True),
    'untied': dict(tie_embeddings=False),
    'encoder_post_norm': dict(kind='encoder', norm='layernorm', norm_position='post', positions='learned',
                              use_bias=True, activation='gelu_exact', num_kv_heads=0, type_vocab_size=2),
}


def _model(**overrides):
  cfg = tiny_config(num_layers=1, **overrides).model
  model = Transformer(cfg)
  tokens = jnp.asarray(np.random.default_rng(0).integers(3, cfg.vocab_size, (2, 12)), jnp.int32)
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.PRNGKey(0), tokens)['params'])
  return cfg, model, params, tokens


@pytest.mark.parametrize('name', list(CONFIGS))
def test_head_logits_of_the_last_hidden_state_are_the_models_logits(name):
  """`head_logits` (the logit lens) reads the same head the forward pass ends with."""
  cfg, model, params, tokens = _model(**CONFIGS[name])
  logits, state = model.apply({'params': params}, tokens, mutable=['intermediates'])
  residual = state['intermediates']['layers']['residual'][0][-1]          # the last block's output
  np.testing.assert_allclose(np.asarray(logits_lib.head_logits(cfg, params, residual)), np.asarray(logits),
                             atol=1e-5)


@pytest.mark.parametrize('name', ['tied', 'untied'])
def test_last_only_and_the_fused_loss_matrix_agree_with_the_full_head(name):
  cfg, model, params, tokens = _model(**CONFIGS[name])
  full = model.apply({'params': params}, tokens)
  last = model.apply({'params': params}, tokens, last_only=True)
  assert last.shape == (2, 1, cfg.vocab_size)
  np.testing.assert_allclose(np.asarray(last), np.asarray(full[:, -1:]), atol=1e-5)
  hidden, matrix, transposed = model.apply({'params': params}, tokens, head=False)
  assert transposed == (name == 'tied')
  product = hidden @ (matrix.T if transposed else matrix)
  np.testing.assert_allclose(np.asarray(product), np.asarray(full), atol=1e-5)


def test_slope_is_the_derivative_of_the_transform():
  spec = LogitSpec(scale=0.8, softcap=3.0)
  z = jnp.linspace(-20.0, 20.0, 81)
  want = jax.vmap(jax.grad(spec.apply))(z)
  np.testing.assert_allclose(np.asarray(spec.slope(spec.apply(z))), np.asarray(want), rtol=1e-5, atol=1e-6)
  assert LogitSpec().identity and not spec.identity
  with pytest.raises(ValueError, match='soft-cap must be positive'):
    LogitSpec(softcap=-1.0)


@pytest.mark.parametrize('tie', [True, False])
def test_a_final_soft_cap_reaches_the_forward_pass_and_the_fused_loss_alike(tie, monkeypatch):
  """With the model's LogitSpec set to a soft-cap (as a family would), the forward pass caps its logits
  and the vocab-chunked loss equals the loss of those logits, values and gradients."""
  cfg, model, params, tokens = _model(**CONFIGS['tied' if tie else 'untied'])
  base = model.apply({'params': params}, tokens)
  spec = LogitSpec(scale=1.5, softcap=0.05)
  monkeypatch.setattr(logits_lib, 'logit_spec', lambda model_cfg: spec)
  capped = model.apply({'params': params}, tokens)
  np.testing.assert_allclose(np.asarray(capped), 0.05 * np.tanh(1.5 * np.asarray(base) / 0.05), atol=1e-6)
  rng = np.random.default_rng(1)
  batch = {'inputs': tokens, 'targets': jnp.roll(tokens, -1, axis=1),
           'positions': jnp.broadcast_to(jnp.arange(12), (2, 12)), 'segment_ids': jnp.ones((2, 12), jnp.int32),
           'weights': jnp.asarray(rng.uniform(0.5, 1.5, (2, 12)), jnp.float32)}
  grad = lambda chunk: jax.jit(jax.value_and_grad(lm.lm_loss_fn(model, 1e-3, chunk), has_aux=True))(
      params, batch, None)
  (obj, (ce, w)), grads = grad(0)
  (obj_c, (ce_c, w_c)), grads_c = grad(24)
  np.testing.assert_allclose([obj_c, ce_c, w_c], [obj, ce, w], rtol=1e-5)
  for g, r in zip(jax.tree.leaves(grads_c), jax.tree.leaves(grads)):
    np.testing.assert_allclose(np.asarray(g), np.asarray(r), rtol=1e-4, atol=1e-6)
  plain, _, _ = lm.cross_entropy(base, batch['targets'], batch['weights'])
  assert abs(float(plain) - float(ce)) > 1e-3 * float(plain)    # 100x the tolerance: the check can fail

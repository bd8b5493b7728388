"""Optimizers (optim.name): each update against a NumPy implementation for 3 steps, equal on a 2x2x2 mesh and
one device, state sharded like its parameter, state size per parameter, and the one-line errors."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fmjax import config
from fmjax.parallel import sharding as shd
from fmjax.training import build, optim
from helpers import synthetic_batch, tiny_config

# A parameter tree shaped like fmjax's (scanned blocks: axis 0 is the layer), with the 2-D view of each
# matrix written out by hand: (batch axes, row axes, column axes).
SHAPES = {
    ('embedding',): (16, 8),
    ('final_norm', 'scale'): (8,),
    ('layers', 'attn', 'q', 'kernel'): (2, 8, 2, 4),
    ('layers', 'attn', 'o', 'kernel'): (2, 2, 4, 8),
    ('layers', 'attn_norm', 'scale'): (2, 8),
    ('layers', 'mlp', 'wi_0', 'kernel'): (2, 8, 12),
    ('layers', 'mlp', 'wo', 'kernel'): (2, 12, 8),
    ('layers', 'mlp', 'wo', 'bias'): (2, 8),
    ('lm_head', 'kernel'): (8, 16),
}
HIDDEN = {('layers', 'attn', 'q', 'kernel'): ((0,), (1,), (2, 3)), ('layers', 'attn', 'o', 'kernel'): ((0,), (1, 2), (3,)),
          ('layers', 'mlp', 'wi_0', 'kernel'): ((0,), (1,), (2,)), ('layers', 'mlp', 'wo', 'kernel'): ((0,), (1,), (2,))}
OTHER_MATRICES = {('embedding',): ((), (0,), (1,)), ('lm_head', 'kernel'): ((), (0,), (1,))}
DECAYS = {k: k[-1] not in ('scale', 'bias') for k in SHAPES}
B1, B2, LION_B2, EPS, WD, CLIP, PEAK = 0.9, 0.95, 0.99, 1e-8, 0.1, 0.5, 1e-2


def nested(flat: dict) -> dict:
  out = {}
  for names, value in flat.items():
    node = out
    for n in names[:-1]:
      node = node.setdefault(n, {})
    node[names[-1]] = value
  return out


def flat(tree, prefix=()) -> dict:
  out = {}
  for k, v in tree.items():
    out.update(flat(v, prefix + (k,)) if isinstance(v, dict) else {prefix + (k,): v})
  return out


def optim_cfg(name, **extra):
  cfg = config.base_config().optim
  cfg.update({**dict(name=name, learning_rate=PEAK, warmup_steps=0, b1=B1, b2=B2, eps=EPS, weight_decay=WD,
                     grad_clip=CLIP, adafactor_min_dim=4), **extra})
  return cfg


def problem(seed=0):
  rng = np.random.default_rng(seed)
  params = {k: rng.normal(size=s) for k, s in SHAPES.items()}
  grads = [{k: rng.normal(size=s) for k, s in SHAPES.items()} for _ in range(3)]
  return params, grads


def lrs(cfg, total):
  schedule = optim.learning_rate_schedule(cfg, total)
  return [float(schedule(t)) for t in range(3)]


def to_view(x, axes):
  batch, rows, cols = axes
  y = np.transpose(x, batch + rows + cols)
  return y.reshape(math.prod(x.shape[a] for a in batch), math.prod(x.shape[a] for a in rows), -1)


def from_view(y, axes, shape):
  batch, rows, cols = axes
  order = batch + rows + cols
  return np.transpose(y.reshape([shape[a] for a in order]), np.argsort(order))


def clipped(g: dict) -> dict:
  norm = math.sqrt(sum((v ** 2).sum() for v in g.values()))
  return {k: v * min(1.0, CLIP / norm) for k, v in g.items()}


def numpy_adamw(params, grads, lr, keys=None, state=None):
  """Decoupled AdamW (bias-corrected), weight decay scaled by the learning rate, norms/biases exempt."""
  p, m, v = dict(params), {k: 0 * x for k, x in params.items()}, {k: 0 * x for k, x in params.items()}
  for t, (g, a) in enumerate(zip(grads, lr), 1):
    for k in keys or p:
      m[k] = B1 * m[k] + (1 - B1) * g[k]
      v[k] = B2 * v[k] + (1 - B2) * g[k] ** 2
      u = (m[k] / (1 - B1 ** t)) / (np.sqrt(v[k] / (1 - B2 ** t)) + EPS) + WD * DECAYS[k] * p[k]
      p[k] = p[k] - a * u
  return p


def numpy_lion(params, grads, lr):
  p, m = dict(params), {k: 0 * x for k, x in params.items()}
  for g, a in zip(grads, lr):
    for k in p:
      u = np.sign(B1 * m[k] + (1 - B1) * g[k]) + WD * DECAYS[k] * p[k]
      m[k] = LION_B2 * m[k] + (1 - LION_B2) * g[k]
      p[k] = p[k] - a * u
  return p


def numpy_adafactor(params, grads, lr, decay=0.8, eps=1e-30):
  """Factored second moment on each matrix's (batch, rows, cols) view: row and column means of g^2, the
  estimate row x col / mean(row); full for vectors; update RMS clipped to 1."""
  views = {**HIDDEN, **OTHER_MATRICES}
  p = dict(params)
  row = {k: np.zeros(to_view(p[k], views[k]).shape[:2]) for k in views}
  col = {k: np.zeros(to_view(p[k], views[k]).shape[::2]) for k in views}
  full = {k: 0 * x for k, x in p.items() if k not in views}
  for t, (g, a) in enumerate(zip(grads, lr), 1):
    beta = 1 - t ** -decay
    for k in p:
      if k in views:
        g2 = to_view(g[k], views[k]) ** 2 + eps
        row[k] = beta * row[k] + (1 - beta) * g2.mean(axis=2)
        col[k] = beta * col[k] + (1 - beta) * g2.mean(axis=1)
        est = row[k][:, :, None] * col[k][:, None, :] / row[k].mean(axis=1)[:, None, None]
        u = from_view(to_view(g[k], views[k]) / np.sqrt(est), views[k], SHAPES[k])
      else:
        full[k] = beta * full[k] + (1 - beta) * (g[k] ** 2 + eps)
        u = g[k] / np.sqrt(full[k])
      u = u / max(1.0, np.sqrt((u ** 2).mean())) + WD * DECAYS[k] * p[k]
      p[k] = p[k] - a * u
  return p


def newton_schulz(x, steps=5, coeffs=(3.4445, -4.7750, 2.0315)):
  """Jordan's quintic iteration towards the orthogonal factor of x (on the wide orientation)."""
  wide = x.shape[0] <= x.shape[1]
  x = x if wide else x.T
  x = x / (np.linalg.norm(x) + 1e-8)
  for _ in range(steps):
    a = x @ x.T
    x = coeffs[0] * x + (coeffs[1] * a + coeffs[2] * a @ a) @ x
  return x if wide else x.T


def numpy_muon(params, grads, lr, beta=0.95, rms=0.2):
  """Nesterov momentum (bias-corrected as optax does), orthogonalised per layer on each hidden matrix's
  view and scaled to RMS `rms` x sqrt(max(rows, cols)), plus decoupled weight decay; AdamW on the rest."""
  p = dict(params)
  m = {k: 0 * p[k] for k in HIDDEN}
  for t, (g, a) in enumerate(zip(grads, lr), 1):
    for k, axes in HIDDEN.items():
      m[k] = beta * m[k] + (1 - beta) * g[k]
      nesterov = beta * m[k] / (1 - beta ** (t + 1)) + (1 - beta) * g[k] / (1 - beta ** t)
      view = to_view(nesterov, axes)
      ortho = np.stack([newton_schulz(v) for v in view]) * rms * math.sqrt(max(view.shape[1:]))
      p[k] = p[k] - a * (from_view(ortho, axes, SHAPES[k]) + WD * p[k])
  rest = [k for k in p if k not in HIDDEN]
  adamw = numpy_adamw(params, grads, lr, keys=rest)
  return {**p, **{k: adamw[k] for k in rest}}


REFERENCES = {'adamw': numpy_adamw, 'lion': numpy_lion, 'adafactor': numpy_adafactor, 'muon': numpy_muon}


@pytest.mark.parametrize('name', list(REFERENCES))
def test_three_updates_equal_numpy(name):
  cfg = optim_cfg(name, b2=LION_B2 if name == 'lion' else B2)
  params, grads = problem()
  tx = optim.make_optimizer(cfg, 4)
  p = nested({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
  state = tx.init(p)
  update = jax.jit(tx.update)
  for g in grads:
    u, state = update(nested({k: jnp.asarray(v, jnp.float32) for k, v in g.items()}), state, p)
    p = jax.tree.map(jnp.add, p, u)
  want = REFERENCES[name](params, [clipped(g) for g in grads], lrs(cfg, 4))
  got = flat(p)
  for k in SHAPES:
    moved = np.abs(want[k] - params[k]).max()
    assert moved > 1e-3, (k, 'the reference does not move')
    np.testing.assert_allclose(np.asarray(got[k]), want[k], rtol=2e-5, atol=2e-5 * moved, err_msg=f'{name} {k}')


def _mesh_run(name, shape):
  cfg = tiny_config(num_heads=4, num_kv_heads=2, d_model=32)
  cfg.optim.update(dict(name=name, warmup_steps=0, learning_rate=1e-3, adafactor_min_dim=8))
  cfg.mesh.update(dict(zip(('data', 'fsdp', 'tensor'), shape)))
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, jax.devices()[:math.prod(shape)]))
  state = run.init(jax.random.PRNGKey(0))
  start = jax.tree.map(np.asarray, state.params)
  for i in range(3):
    batch = synthetic_batch(cfg.global_batch_size, cfg.seq_len, cfg.model.vocab_size, seed=i, packed=True)
    state, _ = run.train_step(state, {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()})
  return start, state


@pytest.mark.slow   # four meshes trained and compared: with the slow suite (CI runs both)
@pytest.mark.parametrize('name', ['muon', 'adafactor', 'lion', 'adamw'])
def test_2x2x2_mesh_equals_one_device_and_state_is_sharded_like_its_parameter(name):
  start, one = _mesh_run(name, (1, 1, 1))
  _, mesh = _mesh_run(name, (2, 2, 2))
  for (path, a), b, s in zip(jax.tree_util.tree_flatten_with_path(one.params)[0], jax.tree.leaves(mesh.params),
                             jax.tree.leaves(start)):
    assert np.abs(np.asarray(a) - s).max() > 1e-4, path   # it trained
    np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=0, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  q = mesh.params['layers']['attn']['q']['kernel']     # (layers, embed, heads, kv) on fsdp=2, tensor=2
  assert q.addressable_shards[0].data.shape == (2, 16, 2, 8)
  shards = {jax.tree_util.keystr(p): x.addressable_shards[0].data.shape
            for p, x in jax.tree_util.tree_flatten_with_path(mesh.opt_state)[0]}
  q_state = {k: v for k, v in shards.items() if "['attn']['q']['kernel']" in k}
  want = {'muon': {(2, 16, 2, 8)}, 'lion': {(2, 16, 2, 8)}, 'adamw': {(2, 16, 2, 8)},
          'adafactor': {(2, 16, 1, 1), (2, 1, 2, 8), (1, 1, 1, 1)}}[name]   # rows, columns, unused placeholder
  assert set(q_state.values()) == want, q_state


def _state_bytes(name, params):
  return optim.state_bytes(optim.make_optimizer(optim_cfg(name, grad_clip=0.0), 4).init(params))


def test_state_size_per_parameter():
  params, _ = problem()
  tree = nested({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
  n = sum(v.size for v in params.values())
  hidden = sum(params[k].size for k in HIDDEN)
  counts = 2 * 4              # int32 step counters: the moments' and the schedule's
  assert _state_bytes('adamw', tree) == 2 * 4 * n + counts    # two moments
  assert _state_bytes('lion', tree) == 4 * n + counts         # one moment
  ns_coeffs = 3 * 4
  assert _state_bytes('muon', tree) == 4 * hidden + 2 * 4 * (n - hidden) + 2 * counts + ns_coeffs
  views = {**HIDDEN, **OTHER_MATRICES}
  factored = 0
  for k, shape in SHAPES.items():
    if k in views:
      b, r, c = to_view(params[k], views[k]).shape
      factored += b * (r + c) + 1                             # row and column means (+ a size-1 placeholder)
    else:
      factored += math.prod(shape) + 2                        # a full estimate (+ two placeholders)
  assert _state_bytes('adafactor', tree) == 4 * factored + counts


def test_adafactor_keeps_n_plus_m_numbers_for_an_n_by_m_matrix():
  tx = optim.make_optimizer(optim_cfg('adafactor', adafactor_min_dim=64), 4)
  state = tx.init({'lm_head': {'kernel': jnp.zeros((64, 96))}})
  factored = state[1][0]
  assert factored.v_row['lm_head']['kernel'].size + factored.v_col['lm_head']['kernel'].size == 64 + 96
  assert factored.v['lm_head']['kernel'].size == 1
  small = tx.init({'lm_head': {'kernel': jnp.zeros((32, 96))}})[1][0]    # a side under adafactor_min_dim
  assert small.v['lm_head']['kernel'].shape == (32, 96)


def test_adafactor_equals_optax_factored_rms_on_a_2d_matrix():
  """On a plain matrix whose second axis is the larger, optax's factored estimate is the same maths."""
  import optax
  rng = np.random.default_rng(3)
  p = {'lm_head': {'kernel': jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)}}
  cfg = optim_cfg('adafactor', grad_clip=0.0, weight_decay=0.0)
  ours = optim.make_optimizer(cfg, 4)
  theirs = optax.chain(optax.scale_by_factored_rms(min_dim_size_to_factor=4), optax.clip_by_block_rms(1.0),
                       optax.scale_by_learning_rate(optim.learning_rate_schedule(cfg, 4)))
  pa, pb, sa, sb = p, p, ours.init(p), theirs.init(p)
  for _ in range(3):
    g = {'lm_head': {'kernel': jnp.asarray(rng.normal(size=(8, 24)), jnp.float32)}}
    ua, sa = ours.update(g, sa, pa)
    ub, sb = theirs.update(g, sb, pb)
    pa, pb = optax.apply_updates(pa, ua), optax.apply_updates(pb, ub)
  np.testing.assert_allclose(pa['lm_head']['kernel'], pb['lm_head']['kernel'], rtol=1e-6, atol=1e-7)


def test_muon_on_a_model_without_hidden_matrices_is_one_line():
  tx = optim.make_optimizer(optim_cfg('muon'), 4)
  with pytest.raises(config.ConfigError, match='optim.name=muon needs hidden matrices') as e:
    tx.init({'embedding': jnp.zeros((16, 8)), 'final_norm': {'scale': jnp.ones(8)}})
  assert '\n' not in str(e.value) and 'optim.name=adamw' in str(e.value)


def test_unknown_optimizer_is_one_line():
  cfg = tiny_config()
  cfg.optim.name = 'sgd'
  with pytest.raises(config.ConfigError, match="optim.name='sgd' is not one of adamw, muon, adafactor, lion"):
    config.validate(cfg)
  with pytest.raises(config.ConfigError, match='is not one of adamw, muon'):
    optim.make_optimizer(cfg.optim, 10)


def test_finetune_groups_hold_frozen_parameters_under_muon():
  """Fine-tuning's groups wrap the configured optimizer: frozen blocks stay put under Muon too."""
  from fmjax.finetune import adaptation
  cfg = tiny_config()
  cfg.optim.update(dict(name='muon', warmup_steps=0))
  cfg.finetune.freeze_embeddings = True
  params, grads = problem()
  tree = nested({k: jnp.asarray(v, jnp.float32) for k, v in params.items()})
  tx, _ = adaptation.make_optimizer(cfg)
  state = tx.init(tree)
  updates, _ = tx.update(nested({k: jnp.asarray(v, jnp.float32) for k, v in grads[0].items()}), state, tree)
  moved = {k: float(np.abs(v).max()) for k, v in flat(updates).items()}
  assert moved[('embedding',)] == 0.0
  assert moved[('layers', 'attn', 'q', 'kernel')] > 0 and moved[('lm_head', 'kernel')] > 0

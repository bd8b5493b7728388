"""Context parallelism in the model: a sequence-sharded mesh trains as one device does.

Rows pack documents whose boundaries fall inside the shards (and padding at the end), so a wrong
causal mask, position or segment on any shard changes the loss; both kernels (ring, all_gather),
with and without the zigzag layout, against one device.
"""

import jax
import numpy as np
import pytest

from fmjax.model import context_parallel
from fmjax.parallel import sharding as shd
from fmjax.training import build
from fmjax.training import step as step_lib
from helpers import tiny_config, with_fields

SEQ = 32


def _cfg(mesh, **model):
  cfg = with_fields(tiny_config(d_model=32, num_heads=4, num_kv_heads=2, max_seq_len=SEQ, **model), mesh=mesh)
  cfg.seq_len = SEQ
  cfg.global_batch_size = 4
  return cfg


def packed_batch(seed: int, batch: int = 4, seq: int = SEQ, vocab: int = 64) -> dict:
  """Rows of documents of random lengths (3..13 tokens: boundaries inside the shards), padding at the end."""
  rng = np.random.default_rng(seed)
  seg = np.zeros((batch, seq), np.int32)
  pos = np.zeros((batch, seq), np.int32)
  for r in range(batch):
    at, doc = 0, 1
    while at < seq - 3:
      n = min(int(rng.integers(3, 14)), seq - 3 - at)
      seg[r, at:at + n] = doc
      pos[r, at:at + n] = np.arange(n)
      at, doc = at + n, doc + 1
  tokens = rng.integers(1, vocab, size=(batch, seq + 1)).astype(np.int32)
  weights = (seg > 0).astype(np.float32)
  weights[:, :-1] *= (seg[:, 1:] == seg[:, :-1])   # no target across a document boundary
  return {'inputs': tokens[:, :-1], 'targets': tokens[:, 1:], 'segment_ids': seg, 'positions': pos,
          'weights': weights}


def _devices(mesh):
  return jax.devices()[:int(np.prod([v for k, v in mesh.items() if k != 'dcn']))]


def losses_and_grads(cfg, steps: int = 3):
  mesh = shd.make_mesh(cfg.mesh, _devices(cfg.mesh))
  run = build.build_lm_run(cfg, mesh)
  state = run.init(jax.random.PRNGKey(0))
  loss_fn = step_lib.lm_loss_fn(run.model, cfg.z_loss, cfg.model.loss_vocab_chunk)
  grad = jax.jit(jax.grad(lambda p, b: loss_fn(p, b, None)[0]))
  with shd.activate(mesh, run.rules):
    first = jax.device_get(grad(state.params, _put(packed_batch(0), run)))
  losses = []
  for i in range(steps):
    state, metrics = run.train_step(state, _put(packed_batch(i), run))
    losses.append(float(metrics['loss']))
  return losses, first


def _put(batch, run):
  return {k: jax.device_put(v, run.batch_sharding) for k, v in batch.items()}


@pytest.fixture(scope='module')
def reference():
  return losses_and_grads(_cfg(dict(data=1, fsdp=1)))


# sequence=8 with the ring and the zigzag layout (the defaults) is the 2-process run of
# tests/e2e/test_train_e2e.py and the broken-shard checks below.
@pytest.mark.parametrize('mesh,strategy,balance', [
    (dict(data=2, fsdp=1, sequence=4), 'ring', True),
    (dict(data=1, fsdp=1, sequence=8), 'all_gather', False),
    (dict(data=2, fsdp=1, sequence=4), 'all_gather', True),
])
def test_sequence_sharded_training_equals_one_device(reference, mesh, strategy, balance):
  ref_losses, ref_grads = reference
  losses, grads = losses_and_grads(_cfg(mesh, context_attention=strategy, context_load_balance=balance))
  _assert_same(losses, grads, ref_losses, ref_grads)


def test_sliding_window_and_softcap_layers_equal_one_device_on_a_sequence_axis():
  """Gemma 2's layer kinds: local (a window of 6 keys, shorter than a shard pair) and global layers with a
  logit soft-cap, scanned with a switch over the kinds, sequence=4 x data=2, ring."""
  model = dict(sliding_window=6, window_pattern='LG', attn_logit_softcap=20.0)
  ref_losses, ref_grads = losses_and_grads(_cfg(dict(data=1, fsdp=1), **model))
  losses, grads = losses_and_grads(_cfg(dict(data=2, fsdp=1, sequence=4), **model))
  _assert_same(losses, grads, ref_losses, ref_grads)


def _assert_same(losses, grads, ref_losses, ref_grads):
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5, atol=1e-6)
  flat_ref, flat = jax.tree.leaves(ref_grads), jax.tree.leaves(grads)
  for a, b in zip(flat_ref, flat):
    np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-6)


def _one_step_loss(cfg):
  mesh = shd.make_mesh(cfg.mesh, _devices(cfg.mesh))
  run = build.build_lm_run(cfg, mesh)
  state = run.init(jax.random.PRNGKey(0))
  return float(run.train_step(state, _put(packed_batch(0), run))[1]['loss'])


def _on_shard(a, shard: int, n: int, delta):
  """a + delta on the tokens of shard `shard` of n (a (B, T) array in the layout the shards hold)."""
  t = a.shape[1] // n
  return a.at[:, shard * t:(shard + 1) * t].add(delta)


@pytest.mark.parametrize('broken', ['causal_mask', 'segment', 'positions'])
def test_a_wrong_mask_or_position_on_one_shard_is_caught(reference, monkeypatch, broken):
  """The check above is sharp: break one shard of eight, and the loss leaves its tolerance."""
  cfg = _cfg(dict(data=1, fsdp=1, sequence=8), context_attention='ring')
  ring = context_parallel.kernels.ring_attention
  if broken in ('causal_mask', 'segment'):
    def wrong(q, k, v, q_index, kv_index, q_seg, kv_seg, **kw):
      on_3 = jax.lax.axis_index('sequence') == 3
      if broken == 'causal_mask':   # shard 3's queries see the next key
        q_index = q_index + on_3.astype(q_index.dtype)
      else:                          # shard 3's first token leaves its document
        q_seg = q_seg.at[:, 0].add(on_3.astype(q_seg.dtype) * 100)
      return ring(q, k, v, q_index, kv_index, q_seg, kv_seg, **kw)
    monkeypatch.setattr(context_parallel.kernels, 'ring_attention', wrong)
  else:
    to_zigzag, calls = context_parallel.to_zigzag, []
    def wrong(a, n):   # the Transformer lays out tokens, positions, segment ids in that order
      calls.append(1)
      out = to_zigzag(a, n)
      return _on_shard(out, 3, n, 1) if len(calls) % 3 == 2 else out
    monkeypatch.setattr(context_parallel, 'to_zigzag', wrong)
  loss = _one_step_loss(cfg)
  assert abs(loss - reference[0][0]) > 1e-4 * abs(reference[0][0]), (broken, loss, reference[0][0])


@pytest.mark.parametrize('mesh,model,message', [
    (dict(sequence=3), {}, r'^seq_len=32 is not divisible by 2 \* mesh.sequence = 6 \(the zigzag layout'),
    (dict(sequence=3), dict(context_load_balance=False), r'^seq_len=32 is not divisible by mesh.sequence=3: '),
    (dict(sequence=2), dict(context_attention='rings'), r"^model.context_attention='rings' is not one of ring, "
                                                         r'all_gather$'),
    (dict(dcn=dict(data=0)), {}, r'^mesh.dcn.data=0 must be a positive integer'),
])
def test_bad_context_and_dcn_settings_are_one_line_before_compiling(mesh, model, message):
  from fmjax.config import checks
  cfg = _cfg(dict(data=1, fsdp=-1), **model)
  for key, value in mesh.items():
    if key == 'dcn':
      cfg.mesh.dcn.update(value)
    else:
      cfg.mesh[key] = value
  with pytest.raises(checks.ConfigError, match=message) as e:
    checks.validate(cfg)
  assert '\n' not in str(e.value)

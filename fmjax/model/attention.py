"""Self-attention with segment masking, causal (decoders) or not (encoders), and its
interchangeable implementations.

Shapes: q (B, T, H, D); k, v (B, S, K, D) with H a multiple of K (MHA, GQA, MQA).
What a layer computes is its `ScoreSpec` (fmjax/model/attention_spec.py): causal or not, the
score scale, optionally a sliding window and a logit soft-cap; segment ids are passed beside q,
k, v (ids must match; 0 marks padding, always at the row's end in training). Every implementation
takes `spec=` (or, in direct calls, `causal=` as the shorthand of the plain spec of q's head dim).
Implementations (`model.attention`): `xla`, the reference (full scores, autodiff); `dense`, the
same scores with a hand-written backward pass (the flash identity rowsum(P dP) = rowsum(dO O),
batch-major layouts, key blocks in the causal future skipped: the fastest on CPU); `chunked`,
online softmax over key blocks for long sequences on any backend; `splash`, the Pallas splash
kernel on TPU; `pallas_gpu`, the Pallas (Triton) flash kernel on GPU, exact for packed rows;
`cudnn`, cuDNN flash attention through `jax.nn.dot_product_attention` with its causal mode and
per-row lengths, exact only for rows of one document then padding. `auto` is settled once per
run by `select` (fmjax/model/attention_select.py, see `for_run`) from the platform, compute
dtype, head dim, sequence length, packing and the spec, and logged in one line. Softmax
statistics are fp32 in every implementation.

Decoding (`Attention(decode=True)`) keeps keys, values and their segment ids in the 'cache'
collection: each call writes its T new tokens at the cache index and attends over the whole
cache, masked by slot (causal, window) and segment (left padding has segment 0). When
'intermediates' is mutable the attention probabilities are sown (for `fmjax.inspect`); training
never is.
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from fmjax.model import context_parallel
from fmjax.model.attention_select import (  # noqa: F401  (the choice of implementation, re-exported)
    AttentionError, Choice, cudnn_problem, for_run, log_once as _log_once, refuse_features, resolve_call, select)
from fmjax.model.attention_spec import ScoreSpec, cap_scores, head_dim, layer_kinds, resolve, score_spec, visible
from fmjax.model.layers import Projection, apply_rope, dtype_of, lora_spec, make_norm, project, rope_scaling

_NEG = -1e30


def attention_probs(q, k, q_seg, kv_seg, q_index=None, kv_index=None, causal: bool | None = None,
                    spec: ScoreSpec | None = None):
  """Softmax attention weights (B, K, G, T, S) in fp32, heads grouped by KV head."""
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  spec = resolve(spec, d, causal)
  q_index = jnp.arange(t) if q_index is None else q_index
  kv_index = jnp.arange(s) if kv_index is None else kv_index
  qg = q.reshape(b, t, kh, h // kh, d)
  scores = jnp.einsum('btkgd,bskd->bkgts', qg, k, preferred_element_type=jnp.float32) * spec.scale
  scores = cap_scores(spec, scores)
  mask = visible(spec, q_index, kv_index, q_seg, kv_seg)[:, None, None]
  return jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)


def xla_attention(q, k, v, q_seg, kv_seg, q_index=None, kv_index=None, causal: bool | None = None,
                  spec: ScoreSpec | None = None):
  """Reference attention: full score matrix, fp32 softmax."""
  b, t, h, d = q.shape
  probs = attention_probs(q, k, q_seg, kv_seg, q_index, kv_index, causal, spec).astype(v.dtype)
  out = jnp.einsum('bkgts,bskd->btkgd', probs, v)
  return out.reshape(b, t, h, d)


def _dense_forward(q, k, v, mask, scale, softcap):
  """q (B, K, G, T, D), k/v (B, K, S, D), mask (B, 1, 1, T, S) -> (out, fp32 probs, tanh of capped scores)."""
  scores = jnp.einsum('bkgtd,bksd->bkgts', q * jnp.asarray(scale, q.dtype), k,
                      preferred_element_type=jnp.float32)
  capped = None
  if softcap is not None:
    capped = jnp.tanh(scores / softcap)
    scores = capped * softcap
  probs = jax.nn.softmax(jnp.where(mask, scores, _NEG), axis=-1)
  out = jnp.einsum('bkgts,bksd->bkgtd', probs.astype(v.dtype), v)
  return out, probs, capped


@functools.partial(jax.custom_vjp, nondiff_argnums=(4, 5))
def _dense_core(q, k, v, mask, scale, softcap):
  return _dense_forward(q, k, v, mask, scale, softcap)[0]


def _dense_fwd(q, k, v, mask, scale, softcap):
  out, probs, capped = _dense_forward(q, k, v, mask, scale, softcap)
  return out, (q, k, v, mask, probs, out, capped)


def _dense_bwd(scale, softcap, res, g):
  """dS = P * (dP - rowsum(dO * O)): the flash identity avoids a reduction over the (T, S) rows.

  With a soft-cap, d(cap * tanh(s / cap))/ds = 1 - tanh^2 scales dS.
  """
  q, k, v, mask, probs, out, capped = res
  g32 = g.astype(jnp.float32)
  dv = jnp.einsum('bkgts,bkgtd->bksd', probs.astype(g.dtype), g)
  dp = jnp.einsum('bkgtd,bksd->bkgts', g, v, preferred_element_type=jnp.float32)
  delta = jnp.sum(g32 * out.astype(jnp.float32), axis=-1, keepdims=True)
  ds = probs * (dp - delta)
  if softcap is not None:
    ds = ds * (1.0 - jnp.square(capped))
  ds = ds.astype(q.dtype)
  scale = jnp.asarray(scale, q.dtype)
  dq = jnp.einsum('bkgts,bksd->bkgtd', ds, k) * scale
  dk = jnp.einsum('bkgts,bkgtd->bksd', ds, q * scale)
  return dq, dk, dv.astype(v.dtype), None


_dense_core.defvjp(_dense_fwd, _dense_bwd)


def dense_attention(q, k, v, q_seg, kv_seg, q_index=None, kv_index=None, block: int = 64,
                    causal: bool | None = None, spec: ScoreSpec | None = None):
  """Full-score attention with a hand-written backward pass (fewer, larger XLA ops than autodiff).

  Self-attention of at least two `block`s of queries skips the key blocks wholly in the causal
  future: query block i attends keys [0, (i + 1) * block) only (3/4 of the work at 2 blocks), and
  under a sliding window W also those wholly before its first query's window, so a local layer
  costs O(T * (W + block)).
  """
  b, t, h, d = q.shape
  s, kh = k.shape[1], k.shape[2]
  spec = resolve(spec, d, causal)
  causal_blocks = (spec.causal and q_index is None and kv_index is None and t == s and t % block == 0
                   and t >= 2 * block)
  q_index = jnp.arange(t) if q_index is None else q_index
  kv_index = jnp.arange(s) if kv_index is None else kv_index
  mask_of = lambda rows, keys: visible(spec, q_index[rows], kv_index[keys], q_seg[:, rows],
                                      kv_seg[:, keys])[:, None, None]   # (B, 1, 1, rows, keys)
  qg = q.reshape(b, t, kh, h // kh, d).transpose(0, 2, 3, 1, 4)       # (B, K, G, T, D)
  kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)           # (B, K, S, D)
  core = lambda q_, k_, v_, m_: _dense_core(q_, k_, v_, m_, spec.scale, spec.logit_softcap)
  if causal_blocks:   # each block's mask made for its own rows and keys: nothing of size T x S
    outs = []
    for i in range(t // block):
      first = 0 if spec.sliding_window is None else max(0, i * block - spec.sliding_window + 1) // block * block
      rows, keys = slice(i * block, (i + 1) * block), slice(first, (i + 1) * block)
      outs.append(core(qg[:, :, :, rows], kt[:, :, keys], vt[:, :, keys], mask_of(rows, keys)))
    out = jnp.concatenate(outs, axis=3)
  else:
    everything = slice(None)
    out = core(qg, kt, vt, mask_of(everything, everything))
  return out.transpose(0, 3, 1, 2, 4).reshape(b, t, h, d)


def chunked_attention(q, k, v, q_seg, kv_seg, chunk: int = 128, causal: bool | None = None,
                      spec: ScoreSpec | None = None):
  """Memory-efficient attention: online softmax over key blocks, one query block at a time.

  Never materialises the (T, S) score matrix; when causal, blocks wholly above the diagonal are
  skipped, and under a sliding window W each query block visits only the ceil((W - 1) / chunk) + 1 key
  blocks its window can reach, so a local layer costs O(T * W).
  """
  b, t, h, d = q.shape
  kh = k.shape[2]
  g = h // kh
  spec = resolve(spec, d, causal)
  c = min(chunk, t)
  pad = (-t) % c
  if pad:  # pad to a whole number of blocks with a segment id no real token has
    padder = lambda x: jnp.pad(x, [(0, 0), (0, pad)] + [(0, 0)] * (x.ndim - 2))
    q, k, v = padder(q), padder(k), padder(v)
    q_seg = jnp.pad(q_seg, [(0, 0), (0, pad)], constant_values=-1)
    kv_seg = jnp.pad(kv_seg, [(0, 0), (0, pad)], constant_values=-2)
  n = (t + pad) // c
  qb = q.reshape(b, n, c, kh, g, d).transpose(1, 0, 2, 3, 4, 5)   # (n, B, C, K, G, D)
  kb = k.reshape(b, n, c, kh, d).transpose(1, 0, 2, 3, 4)          # (n, B, C, K, D)
  vb = v.reshape(b, n, c, kh, d).transpose(1, 0, 2, 3, 4)
  qs = q_seg.reshape(b, n, c).transpose(1, 0, 2)
  ks = kv_seg.reshape(b, n, c).transpose(1, 0, 2)
  local = jnp.arange(c)

  @jax.checkpoint
  def query_block(args):
    i, qi, qsi = args
    init = (jnp.full((b, kh, g, c), _NEG, jnp.float32), jnp.zeros((b, kh, g, c), jnp.float32),
            jnp.zeros((b, kh, g, c, d), jnp.float32))

    def update(carry, j, kj, vj, ksj):
      m, l, acc = carry
      s = jnp.einsum('bqkgd,bskd->bkgqs', qi, kj, preferred_element_type=jnp.float32) * spec.scale
      s = cap_scores(spec, s)
      mask = visible(spec, i * c + local, j * c + local, qsi, ksj)[:, None, None]
      s = jnp.where(mask, s, _NEG)
      m_new = jnp.maximum(m, s.max(-1))
      p = jnp.where(mask, jnp.exp(s - m_new[..., None]), 0.0)
      corr = jnp.exp(m - m_new)
      l = l * corr + p.sum(-1)
      acc = acc * corr[..., None] + jnp.einsum('bkgqs,bskd->bkgqd', p.astype(vj.dtype), vj,
                                               preferred_element_type=jnp.float32)
      return m_new, l, acc

    def kv_step(carry, kv_args):
      j, kj, vj, ksj = kv_args
      if not spec.causal:
        return update(carry, j, kj, vj, ksj), None
      return jax.lax.cond(j <= i, lambda c_: update(c_, j, kj, vj, ksj), lambda c_: c_, carry), None

    def window_step(carry, back):
      """Key block i - back: the window's blocks only (a static count), those before the row skipped."""
      j = i - back
      jc = jnp.maximum(j, 0)
      return jax.lax.cond(j >= 0, lambda c_: update(c_, jc, kb[jc], vb[jc], ks[jc]), lambda c_: c_, carry), None

    if spec.causal and spec.sliding_window is not None:   # O(T * W): only the blocks a window reaches
      reach = min(n, -(-(spec.sliding_window - 1) // c) + 1)
      (m, l, acc), _ = jax.lax.scan(window_step, init, jnp.arange(reach - 1, -1, -1))
    else:
      (m, l, acc), _ = jax.lax.scan(kv_step, init, (jnp.arange(n), kb, vb, ks))
    out = acc / jnp.maximum(l, 1e-30)[..., None]                    # (B, K, G, C, D)
    return out.transpose(0, 3, 1, 2, 4).reshape(b, c, h, d).astype(q.dtype)

  out = jax.lax.map(query_block, (jnp.arange(n), qb, qs))           # (n, B, C, H, D)
  out = out.transpose(1, 0, 2, 3, 4).reshape(b, n * c, h, d)
  return out[:, :t]


def sequence_lengths(seg):
  """Tokens before the padding of each row (B,) int32, at least 1 (an all-padding row stays finite)."""
  return jnp.maximum(jnp.sum(seg != 0, axis=1), 1).astype(jnp.int32)


def cudnn_attention(q, k, v, q_seg, kv_seg, implementation: str = 'cudnn', causal: bool | None = None,
                    spec: ScoreSpec | None = None):
  """Attention for rows holding one document then padding, as cuDNN flash attention runs it.

  The kernel's own causal mode (when causal) skips the future key tiles; padding is masked by
  per-row lengths (no (B, 1, T, S) mask or bias). Packed rows (several documents) are out of its
  reach: see `select`. Outputs at padded query positions are not attention over anything the model
  uses (the loss weights them 0). `implementation='xla'` runs the very same call on any backend.
  """
  spec = resolve(spec, q.shape[-1], causal)
  refuse_features('cudnn', spec)
  return jax.nn.dot_product_attention(
      q, k, v, scale=spec.scale, is_causal=spec.causal, query_seq_lengths=sequence_lengths(q_seg),
      key_value_seq_lengths=sequence_lengths(kv_seg), implementation=implementation)


def attend(impl: str, q, k, v, q_seg, kv_seg, chunk: int = 128, platform: str | None = None,
           causal: bool | None = None, spec: ScoreSpec | None = None):
  """Run implementation `impl` under `spec` (default: the plain spec of q's head dim, causal unless
  `causal=False`); 'auto' not resolved by `for_run` assumes packed rows (exact).

  `platform` is the target the program is compiled for (default: the JAX backend; compile-only
  TPU plans run on a CPU backend and pass 'tpu').
  """
  spec = resolve(spec, q.shape[-1], causal)
  impl = resolve_call(impl, spec, dtype=jnp.dtype(q.dtype).name, head_dim=q.shape[-1], seq_len=q.shape[1],
                      platform=platform)
  if impl == 'xla':
    return xla_attention(q, k, v, q_seg, kv_seg, spec=spec)
  if impl == 'dense':
    return dense_attention(q, k, v, q_seg, kv_seg, spec=spec)
  if impl == 'cudnn':
    return cudnn_attention(q, k, v, q_seg, kv_seg, spec=spec)
  if impl == 'chunked':
    return chunked_attention(q, k, v, q_seg, kv_seg, chunk, spec=spec)
  if impl in ('splash', 'pallas_gpu'):
    from fmjax.model import splash  # pylint: disable=import-outside-toplevel
    if impl == 'pallas_gpu':
      return splash.sharded_gpu_flash_attention(q, k, v, q_seg, kv_seg, spec=spec)
    return splash.sharded_splash_attention(q, k, v, q_seg, kv_seg, block=_splash_block(q.shape[1]) or 512,
                                           spec=spec)
  raise ValueError(f'unknown attention implementation {impl!r}')


def _kind_switch(cfg, layer: int | None, kind):
  """`by_kind(fn, *args, vary='spec')`: fn(this layer's LayerKind, *args). Directly when the kind is known
  while tracing (one kind, or an unrolled `layer`) or when the kinds agree on `vary`; otherwise
  `lax.switch` on the traced `kind` over the kinds (each branch static: its own mask, kernel, RoPE base)."""
  kinds, per_layer = layer_kinds(cfg)
  static = 0 if len(kinds) == 1 else (per_layer[layer] if layer is not None else None)
  if static is None and kind is None:
    raise ValueError('this model has layers of different kinds (local and global): a scanned layer needs its '
                     "kind (Transformer passes it) and an unrolled one its `layer`")

  def by_kind(fn, *args, vary: str = 'spec'):
    if static is not None:
      return fn(kinds[static], *args)
    if len({getattr(k, vary) for k in kinds}) == 1:
      return fn(kinds[0], *args)   # fn reads only `vary` of the kind
    return jax.lax.switch(kind, [functools.partial(fn, k) for k in kinds], *args)
  return by_kind


def _splash_block(t: int) -> int:
  """The largest of 512, 256, 128 dividing t (the splash kernel's tile), or 0 if none does."""
  return next((blk for blk in (512, 256, 128) if t % blk == 0), 0)


class Attention(nn.Module):
  """Multi-head self-attention with grouped KV heads and optional RoPE (and a KV cache to decode).

  A model whose layers differ (local and global layers: attention_spec.layer_kinds) runs each layer's
  kind: `layer` names it when the layers are unrolled; a scanned stack passes `kind`, the layer's index
  into the kinds, and the layer picks its RoPE base and score spec with `lax.switch`.
  """
  cfg: Any
  decode: bool = False
  layer: int | None = None

  @nn.compact
  def __call__(self, x, positions, segment_ids, kind=None):
    cfg = self.cfg
    by_kind = _kind_switch(cfg, self.layer, kind)
    h, kh = cfg.num_heads, cfg.num_kv_heads or cfg.num_heads
    d = head_dim(cfg)
    kw = dict(use_bias=cfg.use_bias, init_std=cfg.init_std, dtype=dtype_of(cfg.dtype),
              param_dtype=dtype_of(cfg.param_dtype))
    qkv_bias = bool(cfg.use_bias or cfg.get('attention_bias', False))   # attention_bias: q, k, v only (Qwen2)
    def proj(name, heads, axis, **extra):
      return Projection((cfg.d_model,), (heads, d), ('embed',), (axis, 'kv'), name=name,
                        lora=lora_spec(cfg, name), **{**kw, 'use_bias': qkv_bias}, **extra)

    if kh == h:  # one matmul for q, k and v
      q, k, v = project(x, lambda n, **extra: proj(n, h, 'heads', **extra), 'qkv', cfg, kw['dtype'])
    else:
      q = proj('q', h, 'heads')(x)
      k, v = project(x, lambda n, **extra: proj(n, kh, 'kv_heads', **extra), 'kv', cfg, kw['dtype'])
    if cfg.get('qk_norm', False) and cfg.get('qk_norm_scope', 'head') == 'all':
      # OLMo 2: one RMSNorm over all heads of q (scale H * D) and one over all of k (K * D), before RoPE
      joint = lambda name, a: make_norm(cfg, name, force='rmsnorm')(a.reshape(a.shape[:2] + (-1,))).reshape(a.shape)
      q, k = joint('q_norm', q), joint('k_norm', k)
    elif cfg.get('qk_norm', False):   # Qwen3: RMSNorm of each head's q and k over head_dim, before RoPE
      q = make_norm(cfg, 'q_norm', force='rmsnorm')(q)
      k = make_norm(cfg, 'k_norm', force='rmsnorm')(k)
    if cfg.positions == 'rope':
      rotate = lambda kd, a: apply_rope(a, positions, kd.rope_theta, rope_scaling(cfg))
      q, k = by_kind(lambda kd, q_, k_: (rotate(kd, q_), rotate(kd, k_)), q, k, vary='rope_theta')
    q = nn.with_logical_constraint(q, ('batch', 'activation_length', 'activation_heads', 'activation_kv'))
    q, k, v = (checkpoint_name(a, 'qkv') for a in (q, k, v))
    spec = score_spec(cfg)
    if self.decode and not spec.causal:
      raise ValueError("model.kind='encoder' has no KV cache: it is not a decoder (decode=False)")
    if self.decode and self.has_variable('cache', 'index'):
      k, v, kv_seg, q_index = self._update_cache(k, v, segment_ids)
      out = by_kind(lambda kd, q_, k_, v_: xla_attention(q_, k_, v_, segment_ids, kv_seg, q_index, spec=kd.spec),
                    q, k, v)
    else:
      if self.decode:  # first call creates the cache, sized by this input (see transformer.init_cache)
        self._update_cache(k, v, segment_ids)
      q_index = kv_seg = None
      impl = cfg.attention
      if self.decode and impl == 'cudnn':  # prompts are left-padded: cudnn's row lengths do not apply
        impl = 'dense'
      if not self.decode and context_parallel.context_size() > 1:   # the sequence is sharded (mesh.sequence)
        out = by_kind(lambda kd, q_, k_, v_: context_parallel.attend(
            q_, k_, v_, positions, segment_ids, spec=kd.spec, strategy=cfg.get('context_attention', 'ring'),
            platform=cfg.get('attention_platform'), load_balanced=context_parallel.balanced(cfg),
            splash_block=_splash_block(q.shape[1] // context_parallel.context_size() // 2) or 128), q, k, v)
      else:
        out = by_kind(lambda kd, q_, k_, v_: attend(impl, q_, k_, v_, segment_ids, segment_ids, cfg.attention_chunk,
                                                    platform=cfg.get('attention_platform'), spec=kd.spec), q, k, v)
    if self.is_mutable_collection('intermediates'):
      seg = segment_ids if kv_seg is None else kv_seg
      probs = by_kind(lambda kd, q_, k_: attention_probs(q_, k_, segment_ids, seg, q_index, spec=kd.spec), q, k)
      self.sow('intermediates', 'attention', probs.reshape(probs.shape[0], h, *probs.shape[3:]))  # (B, H, T, S)
    out = nn.with_logical_constraint(out, ('batch', 'activation_length', 'activation_heads', 'activation_kv'))
    out = checkpoint_name(out, 'attn_out')
    out_std = cfg.init_std / (2 * cfg.num_layers) ** 0.5
    return Projection((h, d), (cfg.d_model,), ('heads', 'kv'), ('embed',), name='o',
                      lora=lora_spec(cfg, 'o'), **{**kw, 'init_std': out_std})(out)

  def _update_cache(self, k, v, segment_ids):
    """Write k, v (B, T, K, D) at the cache index; return the full cache and the query slots."""
    b, t, kh, d = k.shape
    axes = ('batch', 'activation_length', 'activation_heads', 'activation_kv')
    ck = self.variable('cache', 'key', jnp.zeros, k.shape, k.dtype)
    cv = self.variable('cache', 'value', jnp.zeros, v.shape, v.dtype)
    cs = self.variable('cache', 'segment_ids', jnp.zeros, segment_ids.shape, jnp.int32)
    index = self.variable('cache', 'index', lambda: jnp.zeros((), jnp.int32))
    i = index.value
    ck.value = nn.with_logical_constraint(jax.lax.dynamic_update_slice(ck.value, k, (0, i, 0, 0)), axes)
    cv.value = nn.with_logical_constraint(jax.lax.dynamic_update_slice(cv.value, v, (0, i, 0, 0)), axes)
    cs.value = jax.lax.dynamic_update_slice(cs.value, segment_ids.astype(jnp.int32), (0, i))
    index.value = i + t
    return ck.value, cv.value, cs.value, i + jnp.arange(t)

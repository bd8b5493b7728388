"""The Transformer: a LLaMA-style or GPT-2-style decoder, or a BERT-style encoder, chosen by config.

    tokens (B, T) -> embed (+ learned positions, + token types) -> N x Block -> final norm -> logits (B, T, V)
    Block (pre-norm):  x + Attn(Norm(x)) -> h + MLP(Norm(h))
    Block (post-norm, model.norm_position='post', BERT): Norm(x + Attn(x)) -> Norm(h + MLP(h)); the
    embeddings are normed and there is no final norm.
    Block (sandwich, Gemma 2/3): x + PostNorm(Attn(Norm(x))) -> h + PostNorm(MLP(Norm(h))).
    Block (after, OLMo 2): x + PostNorm(Attn(x)) -> h + PostNorm(MLP(h)) (no pre-norms; a final norm).

With model.num_experts > 0 the MLP of the MoE layers (model.moe_every, moe_first_dense) is the
mixture-of-experts block of fmjax/model/moe.py; its routing statistics go to the 'moe' collection.

model.kind='encoder' attends bidirectionally (still never across packed documents or to
padding) and predicts with an MLM head tied to the embeddings: dense -> GELU -> norm ->
embedding^T + bias (BERT's and RoBERTa's head); it has no KV cache.

With `scan_layers` the N blocks are one `nn.scan` over stacked parameters (leading axis
'layers'), so compile time does not grow with depth; `remat` wraps each block in
`jax.checkpoint` with the configured policy.

Decoding: `apply(..., decode=True, mutable=['cache'])` runs the blocks unrematerialised with a
KV cache per attention layer (stacked on the layer axis when scanned); `init_cache` makes an
empty one. With 'intermediates' mutable, each block sows its output (the residual stream) and
each attention layer its probabilities; the training path never makes it mutable.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import flax.linen as nn
from jax.ad_checkpoint import checkpoint_name

from fmjax.model import context_parallel
from fmjax.model.attention import Attention
from fmjax.model.attention_spec import layer_kinds
from fmjax.model.layers import MLP, dtype_of, make_norm, param_with_axes
from fmjax.model.moe import MoE, is_moe, is_moe_layer
from fmjax.model.logits import final_hidden, is_encoder, output_logits, output_matrix

REMAT_POLICIES = {
    'full': None,  # save nothing: recompute the whole block
    'dots': jax.checkpoint_policies.checkpoint_dots_with_no_batch_dims,
}
# Activations tagged with `checkpoint_name`, for remat='names' (save these, recompute the rest):
# qkv: projected (and rotated) queries, keys, values; attn_out: attention output before the
# out-projection; block_mid: the residual stream between attention and MLP; mlp_hidden: the
# activated MLP hidden layer (the largest).
REMAT_NAMES = ('qkv', 'attn_out', 'block_mid', 'mlp_hidden')


def remat_policy(cfg):
  """The jax.checkpoint policy for cfg.remat (None = save nothing)."""
  if cfg.remat == 'names':
    names = [n.strip() for n in cfg.remat_names.split(',') if n.strip()]
    return jax.checkpoint_policies.save_only_these_names(*names)
  return REMAT_POLICIES[cfg.remat]

_RESIDUAL_AXES = ('batch', 'activation_length', 'activation_embed')


class Block(nn.Module):
  """One Transformer block (pre-, post-, sandwich or after-norm: model.norm_position). Returns (x, None) so it
  can be scanned.

  `layer` (unrolled) or `kind` (scanned: the layer's index into attention_spec.layer_kinds) tells the
  attention which kind of layer this is when the model's layers differ (local and global)."""
  cfg: Any
  deterministic: bool = True
  decode: bool = False
  layer: int | None = None

  @nn.compact
  def __call__(self, x, positions, segment_ids, kind=None):
    cfg = self.cfg
    x = nn.with_logical_constraint(x, _RESIDUAL_AXES)
    drop = lambda y: nn.Dropout(cfg.dropout)(y, deterministic=self.deterministic)
    attention = Attention(cfg, self.decode, self.layer, name='attn')
    attn = lambda y: attention(y, positions, segment_ids, kind)
    if is_moe_layer(cfg, self.layer) if self.layer is not None else is_moe(cfg):   # a scanned stack: all or none
      moe = MoE(cfg, name='moe')
      mlp = lambda y: moe(y, segment_ids > 0)
    else:
      mlp = MLP(cfg, name='mlp')
    position = cfg.get('norm_position', 'pre')
    if position == 'post':
      h = checkpoint_name(make_norm(cfg, 'attn_norm')(x + drop(attn(x))), 'block_mid')
      h = make_norm(cfg, 'mlp_norm')(h + drop(mlp(h)))
    elif position == 'sandwich':
      h = x + drop(make_norm(cfg, 'attn_post_norm')(attn(make_norm(cfg, 'attn_norm')(x))))
      h = checkpoint_name(h, 'block_mid')
      h = h + drop(make_norm(cfg, 'mlp_post_norm')(mlp(make_norm(cfg, 'mlp_norm')(h))))
    elif position == 'after':   # OLMo 2: each sublayer's output normed before its residual add
      h = checkpoint_name(x + drop(make_norm(cfg, 'attn_post_norm')(attn(x))), 'block_mid')
      h = h + drop(make_norm(cfg, 'mlp_post_norm')(mlp(h)))
    else:
      h = checkpoint_name(x + drop(attn(make_norm(cfg, 'attn_norm')(x))), 'block_mid')
      h = h + drop(mlp(make_norm(cfg, 'mlp_norm')(h)))
    self.sow('intermediates', 'residual', h)
    return nn.with_logical_constraint(h, _RESIDUAL_AXES), None


def block_class(cfg, decode: bool = False):
  """Block, wrapped in remat when configured (never when decoding)."""
  if cfg.remat == 'none' or decode:
    return Block
  return nn.remat(Block, policy=remat_policy(cfg), prevent_cse=not cfg.scan_layers)


class Transformer(nn.Module):
  """Language model: a decoder or an encoder (model.kind). `cfg` is the `model` section of the run config.

  `token_types` (B, T) selects token-type embeddings when model.type_vocab_size > 0 (default: type 0).
  The head is fmjax/model/logits.py: logits (B, T, V), or with `last_only` those of the last position
  (B, 1, V) (a prefill); `head=False` returns (hidden, output matrix, transposed) for a fused loss.
  """
  cfg: Any

  @nn.compact
  def __call__(self, tokens, positions=None, segment_ids=None, deterministic: bool = True,
               return_hidden: bool = False, decode: bool = False, head: bool = True, token_types=None,
               last_only: bool = False):
    cfg = self.cfg
    post_norm = cfg.get('norm_position', 'pre') == 'post'
    if decode and is_encoder(cfg):
      raise ValueError("model.kind='encoder' cannot decode: it has no causal mask or KV cache")
    dtype, pdtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
    b, t = tokens.shape
    if positions is None:
      positions = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    if segment_ids is None:
      segment_ids = jnp.ones((b, t), jnp.int32)
    zigzag = context_parallel.context_size() if context_parallel.balanced(cfg, decode) else 0
    if zigzag:   # context parallelism: every shard an early and a late chunk of the row (causal balance)
      tokens, positions, segment_ids = (context_parallel.to_zigzag(a, zigzag)
                                        for a in (tokens, positions, segment_ids))
      token_types = None if token_types is None else context_parallel.to_zigzag(token_types, zigzag)

    embedding = param_with_axes(self, 'embedding', nn.initializers.normal(cfg.init_std),
                                (cfg.vocab_size, cfg.d_model), ('vocab', 'embed'), pdtype)
    # FSDP: gather the table's embed shards before the lookup (as for any weight before use).
    table = nn.with_logical_constraint(embedding, ('vocab', 'activation_embed'))
    x = jnp.take(table, tokens, axis=0).astype(dtype)                         # (B, T, D)
    if cfg.get('embed_scale', False):   # Gemma: sqrt(d_model), rounded to the compute dtype as transformers does
      x = x * jnp.asarray(cfg.d_model ** 0.5, dtype)
    if cfg.positions == 'learned':
      pos_table = param_with_axes(self, 'pos_embedding', nn.initializers.normal(cfg.init_std),
                                  (cfg.max_seq_len + cfg.get('position_offset', 0), cfg.d_model), (None, 'embed'),
                                  pdtype)
      x = x + jnp.take(pos_table, positions + cfg.get('position_offset', 0), axis=0).astype(dtype)
    if cfg.get('type_vocab_size', 0):
      type_table = param_with_axes(self, 'type_embedding', nn.initializers.normal(cfg.init_std),
                                   (cfg.type_vocab_size, cfg.d_model), (None, 'embed'), pdtype)
      types = jnp.zeros((b, t), jnp.int32) if token_types is None else token_types
      x = x + jnp.take(type_table, types, axis=0).astype(dtype)
    if post_norm:
      x = make_norm(cfg, 'embed_norm')(x)
    x = nn.Dropout(cfg.dropout)(x, deterministic=deterministic)
    x = nn.with_logical_constraint(x, _RESIDUAL_AXES)

    block = block_class(cfg, decode)
    kinds, per_layer = layer_kinds(cfg)
    if cfg.scan_layers:   # layers of several kinds: each scanned step gets its layer's kind
      mixed = len(kinds) > 1
      stack = nn.scan(block, variable_axes={'params': 0, 'cache': 0, 'intermediates': 0, 'moe': 0},
                      split_rngs={'params': True, 'dropout': True},
                      in_axes=(nn.broadcast, nn.broadcast) + ((0,) if mixed else ()), length=cfg.num_layers,
                      metadata_params={nn.PARTITION_NAME: 'layers'})
      x, _ = stack(cfg, deterministic, decode, name='layers')(
          x, positions, segment_ids, *((jnp.asarray(per_layer, jnp.int32),) if mixed else ()))
    else:
      for i in range(cfg.num_layers):
        x, _ = block(cfg, deterministic, decode, i, name=f'layers_{i}')(x, positions, segment_ids)

    if zigzag:
      x = nn.with_logical_constraint(context_parallel.from_zigzag(x, zigzag), _RESIDUAL_AXES)
    if last_only:
      x = x[:, -1:]
    hidden = final_hidden(cfg, x)
    if not head:  # for a fused loss: (hidden, output matrix, whether it is (vocab, embed))
      return (hidden, *output_matrix(cfg, embedding))
    logits = output_logits(cfg, hidden, embedding)
    logits = nn.with_logical_constraint(logits, ('batch', 'activation_length', 'activation_vocab'))
    if return_hidden:
      return logits, hidden
    return logits


def init_cache(model: Transformer, batch: int, length: int):
  """An empty KV cache (zeros, index 0) for `batch` rows of at most `length` tokens."""
  tokens = jnp.zeros((batch, length), jnp.int32)
  shapes = jax.eval_shape(lambda: model.init(jax.random.PRNGKey(0), tokens, decode=True))['cache']
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)

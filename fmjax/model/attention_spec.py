"""What one attention layer computes, described once: the score spec every implementation reads.

`ScoreSpec(causal, scale, sliding_window=None, logit_softcap=None)`. Query i sees key j when both
carry the same segment id (documents packed into one row never see each other; 0 marks padding,
which real tokens never see), j <= i when `causal`, and i - j < W when `sliding_window` = W (the
query and the W - 1 keys before it, as Mistral and Gemma count it; causal layers only). Its score
is `scale * q.k`, then `cap * tanh(score / cap)` when `logit_softcap` = cap (Gemma 2), before the
fp32 softmax. Segment ids stay arrays passed beside q, k, v; the spec is static (hashable).

`score_spec(model_cfg, layer)` builds a layer's spec from the model config: the score scale is
computed here (`score_scale`) and nowhere else. Local layers (model.sliding_window, on the layers
model.window_pattern marks) may have a RoPE base of their own; `layer_kinds` lists the distinct
(spec, RoPE base) pairs and each layer's among them. `mean_keys(spec, seq_len)` is what FLOP counting
reads: the keys a query attends on average in a row of `seq_len` tokens of one document.
"""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

# Score features beyond causal/segment masking and the scale; implementations list those they apply.
FEATURES = ('sliding_window', 'logit_softcap')


@dataclasses.dataclass(frozen=True)
class ScoreSpec:
  """Masking and scoring of one attention layer (see the module docstring)."""
  causal: bool
  scale: float
  sliding_window: int | None = None
  logit_softcap: float | None = None

  def __post_init__(self):
    if not self.scale > 0:
      raise ValueError(f'attention score scale must be positive, got {self.scale}')
    if self.sliding_window is not None:
      if int(self.sliding_window) != self.sliding_window or self.sliding_window < 1:
        raise ValueError(f'sliding_window must be a positive integer, got {self.sliding_window}')
      if not self.causal:
        raise ValueError('sliding_window is defined for causal attention only (a query sees the W - 1 keys '
                         'before it)')
    if self.logit_softcap is not None and not self.logit_softcap > 0:
      raise ValueError(f'logit_softcap must be positive, got {self.logit_softcap}')

  def features(self) -> tuple[str, ...]:
    """The FEATURES this spec uses (set fields), in FEATURES order."""
    return tuple(f for f in FEATURES if getattr(self, f) is not None)

  def describe(self) -> str:
    """'causal, sliding_window=4096, logit_softcap=50.0' (for logs and errors)."""
    return ', '.join(['causal' if self.causal else 'bidirectional'] +
                     [f'{f}={getattr(self, f)}' for f in self.features()])


def score_scale(head_dim: int) -> float:
  """The score scale 1/sqrt(head_dim) (or of model.query_scale_dim): the one place it is computed."""
  return head_dim ** -0.5


def head_dim(model_cfg) -> int:
  """Per-head width: model.head_dim, or d_model / num_heads when 0."""
  return model_cfg.head_dim or model_cfg.d_model // model_cfg.num_heads


def is_causal(model_cfg) -> bool:
  """Whether the model attends causally: every kind but 'encoder' (configs without `kind` are decoders)."""
  return model_cfg.get('kind', 'decoder') != 'encoder'


def is_local(model_cfg, layer: int) -> bool:
  """Whether layer `layer` attends within model.sliding_window: every layer when model.window_pattern is
  '' (Mistral), else the layers whose letter of the pattern, repeated over the depth, is 'L' (Gemma 2:
  'LG', Gemma 3: 'LLLLLG'); never without a window."""
  if not model_cfg.get('sliding_window', 0):
    return False
  pattern = model_cfg.get('window_pattern', '') or 'L'
  return pattern[layer % len(pattern)] == 'L'


def score_spec(model_cfg, layer: int | None = None) -> ScoreSpec:
  """The spec of attention layer `layer` of `model_cfg`. None: the spec with every feature some layer
  uses (a local layer's when there is one), which an implementation must apply to run the model."""
  if layer is None:
    layer = next((i for i in range(model_cfg.num_layers) if is_local(model_cfg, i)), 0)
  window = int(model_cfg.sliding_window) if is_local(model_cfg, layer) else None
  scale = score_scale(int(model_cfg.get('query_scale_dim', 0) or 0) or head_dim(model_cfg))
  return ScoreSpec(causal=is_causal(model_cfg), scale=scale, sliding_window=window,
                   logit_softcap=float(model_cfg.get('attn_logit_softcap', 0.0) or 0.0) or None)


def layer_specs(model_cfg) -> tuple[ScoreSpec, ...]:
  """The spec of each of the model's layers, in order."""
  return tuple(score_spec(model_cfg, i) for i in range(model_cfg.num_layers))


def rope_theta(model_cfg, layer: int) -> float:
  """The RoPE base of layer `layer`: model.rope_local_theta on local layers when set (Gemma 3), else
  model.rope_theta."""
  local = model_cfg.get('rope_local_theta', 0.0)
  return float(local) if local and is_local(model_cfg, layer) else float(model_cfg.rope_theta)


@dataclasses.dataclass(frozen=True)
class LayerKind:
  """What distinguishes one layer's attention from another's: its score spec and RoPE base."""
  spec: ScoreSpec
  rope_theta: float


def layer_kinds(model_cfg) -> tuple[tuple[LayerKind, ...], tuple[int, ...]]:
  """(the distinct kinds in order of first use, each layer's index into them): a scanned stack picks its
  layer's kind from the second with `lax.switch`, so one compiled block serves every layer."""
  kinds, index = [], []
  for i in range(model_cfg.num_layers):
    kind = LayerKind(score_spec(model_cfg, i), rope_theta(model_cfg, i))
    if kind not in kinds:
      kinds.append(kind)
    index.append(kinds.index(kind))
  return tuple(kinds), tuple(index)


def resolve(spec: ScoreSpec | None, head_dim_: int, causal: bool | None) -> ScoreSpec:
  """`spec`, or the plain spec of `head_dim_` when None: `causal` is the shorthand of direct calls
  (default True); given with a spec, it must agree with it."""
  if spec is None:
    return ScoreSpec(causal=True if causal is None else bool(causal), scale=score_scale(head_dim_))
  if causal is not None and bool(causal) != spec.causal:
    raise ValueError(f'causal={causal} contradicts the score spec ({spec.describe()})')
  return spec


def visible(spec: ScoreSpec, q_index, kv_index, q_seg, kv_seg):
  """Boolean (B, T, S): key visible to query under `spec`.

  q_index (T,), kv_index (S,): positions in the row; q_seg (B, T), kv_seg (B, S): segment ids. A
  real token (segment > 0) never sees padding (segment 0); padded queries see padding only
  (finite rows that nothing uses).
  """
  same = q_seg[:, :, None] == kv_seg[:, None, :]
  if not spec.causal:
    return same
  before = kv_index[None, None, :] <= q_index[None, :, None]
  if spec.sliding_window is not None:
    before = before & (q_index[None, :, None] - kv_index[None, None, :] < spec.sliding_window)
  return same & before


def cap_scores(spec: ScoreSpec, scores):
  """Scaled scores after the soft-cap `cap * tanh(s / cap)` (unchanged without one)."""
  if spec.logit_softcap is None:
    return scores
  return jnp.tanh(scores / spec.logit_softcap) * spec.logit_softcap


def mean_keys(spec: ScoreSpec, seq_len: int) -> float:
  """Keys one query attends on average in a row of `seq_len` tokens of one document.

  Bidirectional: all T. Causal: query i sees min(i + 1, W) keys (W = T without a window), so the
  mean is (T + 1) / 2 for full causal attention.
  """
  t = seq_len
  if not spec.causal:
    return float(t)
  w = min(spec.sliding_window or t, t)
  return (w * (w + 1) / 2 + (t - w) * w) / t

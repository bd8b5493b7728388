"""Which attention implementation runs, and why: `select` (a pure function), `for_run`, one log line.

`select` reads the platform, compute dtype, head dim, sequence length, packing and the layer's
`ScoreSpec` (fmjax/model/attention_spec.py). Every implementation masks causally or not and by
segment; `HONOURS` lists the further spec features (sliding window, logit soft-cap) each one
applies. 'auto' never picks one that cannot apply the spec: it says so in the logged reason and
takes the next; an explicit model.attention that cannot is a one-line AttentionError.
"""

from __future__ import annotations

import dataclasses
import functools
import logging

import jax

from fmjax.errors import UserError
from fmjax.model.attention_spec import FEATURES, ScoreSpec, head_dim as head_dim_of, score_spec

# The spec features each implementation applies beyond causal/segment masking and the scale.
HONOURS = {
    'xla': FEATURES, 'dense': FEATURES, 'chunked': FEATURES, 'splash': FEATURES,
    'pallas_gpu': (), 'cudnn': (),
}
IMPLEMENTATIONS = tuple(HONOURS)
_HALF = ('bfloat16', 'float16')
_FLASH_TILE = 128  # the Pallas kernels (splash on TPU, flash on GPU) tile the sequence by this
_LOG = logging.getLogger('fmjax.model.attention')


@dataclasses.dataclass(frozen=True)
class Choice:
  """The attention implementation a run uses, and why."""
  impl: str
  reason: str

  def line(self) -> str:
    return f'attention: {self.impl} ({self.reason})'


class AttentionError(UserError):
  """model.attention names an implementation that cannot run this configuration (one line)."""


def unhonoured(impl: str, spec: ScoreSpec | None) -> tuple[str, ...]:
  """The features of `spec` that implementation `impl` does not apply."""
  if spec is None:
    return ()
  return tuple(f for f in spec.features() if f not in HONOURS.get(impl, FEATURES))


def refuse_features(impl: str, spec: ScoreSpec) -> None:
  """A ValueError when implementation `impl` is called directly under a spec feature it does not apply."""
  missing = unhonoured(impl, spec)
  if missing:
    raise ValueError(f"attention='{impl}' cannot apply {', '.join(missing)} ({spec.describe()})")


def cudnn_problem(platform: str, dtype: str, head_dim_: int, packed: bool, hopper: bool = False) -> str:
  """Why cuDNN flash attention cannot run this configuration exactly ('' if it can)."""
  max_dim = 256 if hopper else 128
  if platform != 'gpu':
    return f'it needs an NVIDIA GPU and the backend is {platform}'
  if dtype not in _HALF:
    return f'it needs bfloat16/float16 compute and model.dtype={dtype}'
  if head_dim_ % 8 or head_dim_ > max_dim:
    return f'it needs a head dim that is a multiple of 8 and <= {max_dim}, got {head_dim_}'
  if packed:
    return ('rows pack several documents (data.packing=true) and JAX\'s cuDNN call masks padding '
            'by one length per row, not documents')
  return ''


def select(requested: str, *, platform: str, dtype: str, head_dim: int, seq_len: int, packed: bool,
           hopper: bool = False, spec: ScoreSpec | None = None) -> Choice:
  """The implementation for model.attention=`requested` and score spec `spec` (a pure function of its arguments).

  Explicit names are kept; one that cannot run (cudnn off its reach, a kernel on the wrong platform)
  or cannot apply a feature of `spec` is an AttentionError. 'auto': TPU -> splash (dense if seq_len
  is not a multiple of 128); NVIDIA GPU -> cudnn for one document per row in bf16/fp16, the Pallas
  flash kernel for packed rows (exact per-document masking), dense otherwise; CPU -> dense; a pick
  that cannot apply `spec` gives way to the next (dense applies every feature), saying so.
  """
  if requested != 'auto':
    _check_explicit(requested, platform, dtype, head_dim, packed, hopper, spec)
    return Choice(requested, 'set by model.attention')
  choice = _auto(platform, dtype, head_dim, seq_len, packed, hopper)
  missing = unhonoured(choice.impl, spec)
  if missing:
    return Choice('dense', f'not {choice.impl}: it cannot apply {", ".join(missing)} ({spec.describe()})')
  return choice


def _check_explicit(requested, platform, dtype, head_dim_, packed, hopper, spec) -> None:
  if requested == 'cudnn':
    problem = cudnn_problem(platform, dtype, head_dim_, packed, hopper)
    if problem:
      raise AttentionError(f'model.attention=cudnn cannot run: {problem}; use model.attention=auto')
  kernel_platform = {'splash': 'tpu', 'pallas_gpu': 'gpu'}.get(requested)
  if kernel_platform and platform != kernel_platform:
    raise AttentionError(f'model.attention={requested} needs a {kernel_platform.upper()} and the backend is '
                         f'{platform}; use model.attention=auto')
  missing = unhonoured(requested, spec)
  if missing:
    able = ', '.join(i for i in IMPLEMENTATIONS if not unhonoured(i, spec))
    raise AttentionError(f'model.attention={requested} cannot apply {", ".join(missing)} ({spec.describe()}); '
                         f'use model.attention=auto or one of {able}')


def _auto(platform, dtype, head_dim_, seq_len, packed, hopper) -> Choice:
  tiles = seq_len % _FLASH_TILE == 0
  if platform == 'tpu':
    if tiles:
      return Choice('splash', 'Pallas splash kernel on TPU')
    return Choice('dense', f'seq_len={seq_len} is not a multiple of {_FLASH_TILE}, the splash kernel tile')
  if platform != 'gpu':
    return Choice('dense', f'fastest exact implementation on {platform}')
  problem = cudnn_problem(platform, dtype, head_dim_, packed, hopper)
  if not problem:
    return Choice('cudnn', 'cuDNN flash attention: causal, one document per row, padding by length')
  if dtype in _HALF and tiles:
    return Choice('pallas_gpu', f'not cudnn: {problem}; the Pallas flash kernel masks documents exactly')
  return Choice('dense', f'not cudnn: {problem}')


def is_hopper() -> bool:
  """Whether the first device is an NVIDIA GPU of compute capability >= 9.0 (wider cuDNN head dims)."""
  capability = getattr(jax.devices()[0], 'compute_capability', '') or ''
  return capability.split('.')[0].isdigit() and int(capability.split('.')[0]) >= 9


@functools.lru_cache(maxsize=None)
def log_once(line: str, logger: str = _LOG.name) -> None:
  """Log `line` at INFO once per process (on process 0 only), to `logger` (default: the attention choice's)."""
  if jax.process_index() == 0:
    logging.getLogger(logger).info(line)


def for_run(model_cfg, *, seq_len: int, packed: bool, platform: str | None = None):
  """A copy of `model_cfg` with model.attention resolved for this run; logs the choice once.

  Entry points call it with what the data pipeline feeds (`packed`: rows may hold several
  documents, i.e. data.packing for pretraining, False for one padded example per row). The choice
  is made for the spec every layer shares (see attention_spec.score_spec).
  """
  platform = platform or jax.default_backend()
  choice = select(model_cfg.attention, platform=platform, dtype=model_cfg.dtype, head_dim=head_dim_of(model_cfg),
                  seq_len=seq_len, packed=packed, hopper=platform == 'gpu' and is_hopper(), spec=score_spec(model_cfg))
  log_once(choice.line())
  resolved = model_cfg.copy_and_resolve_references()
  with resolved.unlocked():
    resolved.attention = choice.impl
    resolved.attention_platform = platform  # the target the choice was checked for (not saved)
  return resolved


def resolve_call(impl: str, spec: ScoreSpec, *, dtype: str, head_dim: int, seq_len: int,
                 platform: str | None) -> str:
  """The implementation `attend` runs for model.attention=`impl` on one call's shapes.

  Explicit kernels (and everything under a spec with features) are checked here; 'auto' not
  resolved by `for_run` assumes packed rows (exact) and logs its choice once.
  """
  if impl not in ('auto', 'cudnn', 'splash', 'pallas_gpu') and not spec.features():
    return impl
  platform = platform or jax.default_backend()
  choice = select(impl, platform=platform, dtype=dtype, head_dim=head_dim, seq_len=seq_len, packed=impl == 'auto',
                  hopper=platform == 'gpu' and is_hopper(), spec=spec)
  if impl == 'auto':
    log_once(choice.line())
  return choice.impl

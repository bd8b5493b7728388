"""Quantized training (model.quantization): int8 or fp8 matmuls in the attention and MLP projections.

The matmuls of the projections (q, k, v, o and the MLP's wi_0 / wi_1 / wi / wo) run quantized in
the forward and backward passes through qwix's quantized-training provider, as MaxText does:

  int8  weights and activations int8 (absmax, per channel), gradients int8
  fp8   weights and activations float8_e4m3fn, gradients float8_e5m2

The parameters and the optimizer state stay in param_dtype (fp32 master weights): quantization
happens inside each matmul, so checkpoints, resumes and HF exports hold unquantized weights. The
embedding lookup, the attention scores and the output head are not quantized. On CPU XLA runs
these dtypes emulated, so the numerics are the same as on the native paths (TPU int8, Hopper fp8).
"""

from __future__ import annotations

import re

import jax.numpy as jnp

from fmjax.config.errors import ConfigError
from fmjax.model.attention_select import log_once

QUANTIZATIONS = ('none', 'int8', 'fp8')
# The Projection modules whose matmuls are quantized (fmjax/model/attention.py and layers.py).
PROJECTIONS = ('q', 'k', 'v', 'o', 'wi_0', 'wi_1', 'wi', 'wo')
DESCRIPTIONS = {'int8': 'int8 weights, activations and gradients',
                'fp8': 'float8_e4m3fn weights and activations, float8_e5m2 gradients'}
# fp8 matmuls on GPUs need compute capability 8.9 (Ada) or newer (Hopper, Blackwell).
FP8_MIN_COMPUTE_CAPABILITY = (8, 9)


def kind(cfg) -> str:
  """The model config's quantization ('none' when the field is absent, as in old checkpoints)."""
  value = cfg.get('quantization', 'none') if hasattr(cfg, 'get') else 'none'
  value = 'none' if value in (None, '') else str(value)
  if value not in QUANTIZATIONS:
    raise ConfigError(f'model.quantization={value!r} is not known; choose one of {", ".join(QUANTIZATIONS)}')
  return value


def is_quantized(cfg) -> bool:
  return kind(cfg) != 'none'


def rules(quantization: str) -> list:
  """The qwix quantized-training rules for `quantization` (one rule over every projection)."""
  import qwix
  path = r'(.*/)?(' + '|'.join(re.escape(p) for p in PROJECTIONS) + r')'
  if quantization == 'int8':
    return [qwix.QtRule(module_path=path, op_names=('dot_general',), weight_qtype=jnp.int8, act_qtype=jnp.int8,
                        bwd_qtype=jnp.int8)]
  if quantization == 'fp8':
    return [qwix.QtRule(module_path=path, op_names=('dot_general',), weight_qtype=jnp.float8_e4m3fn,
                        act_qtype=jnp.float8_e4m3fn, bwd_qtype=jnp.float8_e5m2)]
  raise ValueError(f'no quantization rules for {quantization!r}')


def quantize(model, platform: str | None = None, device=None):
  """`model` (a Transformer) with its projection matmuls quantized as its cfg.quantization says;
  unchanged for 'none'. `platform` / `device` (of the mesh) are checked for fp8 support."""
  quantization = kind(model.cfg)
  if quantization == 'none':
    return model
  check_backend(quantization, platform, device)
  import qwix
  log_once(f'quantization: {quantization} ({DESCRIPTIONS[quantization]}; {", ".join(PROJECTIONS)}; qwix '
           f'{qwix.__version__}{", emulated on cpu" if platform == "cpu" else ""})', __name__)
  return qwix.quantize_model(model, qwix.QtProvider(rules(quantization)))


def check_backend(quantization: str, platform: str | None, device=None) -> None:
  """Refuse fp8 where the hardware has no fp8 matmul: GPUs before compute capability 8.9.
  CPU runs fp8 emulated (for tests and small runs); TPU compiles it."""
  if quantization != 'fp8' or platform != 'gpu' or device is None:
    return
  capability = compute_capability(device)
  if capability is not None and capability < FP8_MIN_COMPUTE_CAPABILITY:
    raise ConfigError(f'model.quantization=fp8 needs a GPU of compute capability 8.9 or newer (Ada, Hopper); '
                     f'{getattr(device, "device_kind", "this GPU")} is {capability[0]}.{capability[1]}: '
                     f'use model.quantization=int8 or none')


def compute_capability(device) -> tuple[int, int] | None:
  """A CUDA device's compute capability as (major, minor), or None when it does not say."""
  value = getattr(device, 'compute_capability', None)
  if not value:
    return None
  major, _, minor = str(value).partition('.')
  try:
    return int(major), int(minor or 0)
  except ValueError:
    return None

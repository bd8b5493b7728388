"""FLOP accounting (written once), device peaks, and MFU.

Training FLOPs per token = 3 x forward, forward = 2 x (matmul parameters) + attention scores
and values, 4 x heads x head_dim x (attended keys summed over layers). The keys a query attends
in a layer come from that layer's score spec (fmjax/model/attention_spec.py, `mean_keys`): all T
bidirectionally (model.kind='encoder'), (T + 1) / 2 on average for a causal row, and at most W
each under a sliding window W. The embedding lookup is not a matmul; the output projection is,
and so is an encoder's MLM-head transform (D x D).
"""

from __future__ import annotations

import dataclasses
import functools
import time
from typing import NamedTuple

import jax
import jax.numpy as jnp

from fmjax.model import attention_spec


class Accelerator(NamedTuple):
  """One chip: memory, dense bf16 peak, and the `device_kind` strings JAX reports for it."""
  hbm_gib: float
  peak_flops: float
  device_kinds: tuple


# The one table of accelerator specs (vendor data sheets), keyed by the names topologies use.
ACCELERATORS = {
    'v4': Accelerator(32, 275e12, ('tpu v4',)),
    'v5e': Accelerator(16, 197e12, ('tpu v5 lite', 'tpu v5e')),
    'v5p': Accelerator(95, 459e12, ('tpu v5p', 'tpu v5')),
    'v6e': Accelerator(32, 918e12, ('tpu v6 lite', 'tpu v6e')),
    'a100': Accelerator(80, 312e12, ('a100',)),
    'h100': Accelerator(80, 989e12, ('h100',)),
    'h200': Accelerator(141, 989e12, ('h200',)),
}


def accelerator_of(device_kind: str) -> Accelerator | None:
  """The table entry whose device-kind string occurs in `device_kind` (longest match), or None."""
  kind = device_kind.lower()
  matches = [(len(k), acc) for acc in ACCELERATORS.values() for k in acc.device_kinds if k in kind]
  return max(matches, key=lambda m: m[0])[1] if matches else None


def _moe_mlp_params(m) -> tuple[int, int]:
  """(all, active per token) matmul parameters of one MoE layer's MLP: router, experts, shared expert."""
  from fmjax.model import moe  # pylint: disable=import-outside-toplevel
  expert = 3 * m.d_model * moe.expert_dim(m)
  shared = 3 * m.d_model * int(m.get('moe_shared_mlp_dim', 0) or 0)
  router = m.d_model * m.num_experts
  return router + m.num_experts * expert + shared, router + m.num_experts_per_tok * expert + shared


def inactive_params(model_cfg) -> int:
  """Parameters a token does not use: the experts it is not routed to, over the MoE layers (0 if dense)."""
  from fmjax.model import moe  # pylint: disable=import-outside-toplevel
  if not moe.is_moe(model_cfg):
    return 0
  every, active = _moe_mlp_params(model_cfg)
  return len(moe.moe_layers(model_cfg)) * (every - active)


def matmul_params(model_cfg) -> int:
  """Parameters that take part in a matmul per token (all but embedding lookup and norms/biases); an MoE
  layer counts its router, the num_experts_per_tok experts a token uses and the shared expert."""
  from fmjax.model import moe  # pylint: disable=import-outside-toplevel
  m = model_cfg
  hd = attention_spec.head_dim(m)
  kv = m.num_kv_heads or m.num_heads
  attn = m.d_model * hd * (2 * m.num_heads + 2 * kv)
  mlp = m.d_model * m.mlp_dim * (3 if m.activation in ('swiglu', 'geglu') else 2)
  head = m.d_model * m.vocab_size
  if m.get('kind', 'decoder') == 'encoder':
    head += m.d_model * m.d_model  # the MLM head's dense transform
  sparse = len(moe.moe_layers(m))
  return m.num_layers * attn + (m.num_layers - sparse) * mlp + (sparse * _moe_mlp_params(m)[1] if sparse else 0) + head


def attended_keys(model_cfg, seq_len: int, causal: bool | None = None) -> float:
  """Keys a query attends, summed over the layers, in rows of `seq_len` tokens (each layer's score
  spec; `causal`, when given, overrides the model's kind)."""
  specs = attention_spec.layer_specs(model_cfg)
  if causal is not None:
    specs = [dataclasses.replace(s, causal=bool(causal), sliding_window=s.sliding_window if causal else None)
             for s in specs]
  return sum(attention_spec.mean_keys(s, seq_len) for s in specs)


def flops_per_token(model_cfg, seq_len: int, causal: bool | None = None) -> float:
  """Training FLOPs (forward + backward) per token at sequence length `seq_len` (`causal`
  defaults to the model's kind: decoders are, encoders are not)."""
  m = model_cfg
  hd = attention_spec.head_dim(m)
  forward = 2 * matmul_params(m) + 4 * attended_keys(m, seq_len, causal) * m.num_heads * hd
  return 3 * forward


@functools.lru_cache(maxsize=None)
def measure_cpu_peak_flops(n: int = 1024, seconds: float = 0.5, dtype: str = 'float32') -> float:
  """Sustained matmul FLOP/s of the CPU (all its cores) in `dtype` (fp32 accumulation), a practical peak.

  Timed over `seconds` of back-to-back matmuls rather than the best single one: in a container
  with a CPU quota a few-millisecond burst can run on more cores than the quota sustains. The
  dtype is the model's compute dtype: bf16 matmuls run about twice as fast on CPUs with bf16
  dot instructions (measured here: 838 against 420 GFLOP/s), so MFU of a bf16 run uses that.
  """
  cpu = jax.devices('cpu')[0]
  a = jax.device_put(jnp.ones((n, n), jnp.dtype(dtype)), cpu)
  mm = jax.jit(lambda x, y: jnp.dot(x, y, preferred_element_type=jnp.float32))
  mm(a, a).block_until_ready()
  count, start = 0, time.perf_counter()
  while time.perf_counter() - start < seconds:
    mm(a, a).block_until_ready()
    count += 1
  return 2 * n ** 3 * count / (time.perf_counter() - start)


def device_peak_flops(device: jax.Device | None = None, cpu_peak: float = 0.0, dtype: str = 'float32') -> float:
  """Peak FLOP/s of one device: the table (bf16) for TPUs/GPUs, a measured matmul peak in the
  compute `dtype` for CPUs."""
  device = device or jax.devices()[0]
  if device.platform == 'cpu':
    return cpu_peak or measure_cpu_peak_flops(dtype=dtype)
  acc = accelerator_of(device.device_kind)
  return acc.peak_flops if acc else 0.0


def throughput(model_cfg, seq_len: int, tokens: float, seconds: float, num_devices: int, peak: float) -> dict:
  """tokens/s, TFLOP/s per device and MFU for `tokens` processed in `seconds`."""
  if seconds <= 0:
    return {}
  tokens_per_s = tokens / seconds
  flops_dev = tokens_per_s * flops_per_token(model_cfg, seq_len) / num_devices
  out = {'tokens_per_s': tokens_per_s, 'tflops_per_device': flops_dev / 1e12}
  if peak > 0:
    out['mfu'] = flops_dev / peak
  return out

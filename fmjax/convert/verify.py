"""`--verify`: run the fmjax model and the transformers model on the same tokens and compare logits.

The reference is transformers in float64 (CPU, eager attention) from the same weights: when the
converted parameters are bf16, the weights are rounded to bf16 first, then widened to float64, so
both sides hold the same values. transformers keeps a few steps in float32 even in a float64 model
(RMSNorm, the attention softmax, RoPE angles); `float64_everywhere` widens those too, so the reference
is float64 through and through.

fmjax computes in float32, so its logits differ from the float64 reference by float32 rounding, and
how much depends on the model: peaked weights (logits of magnitude ~40) turn the same relative
rounding into a larger absolute error. The limit is therefore relative to the reference's own float32
noise: transformers run in float32 on the same tokens deviates from its float64 run by `noise`, and
fmjax may deviate by at most max(MAX_ABS_DIFF, NOISE_FACTOR * noise) (mean KL: max(MAX_KL,
NOISE_FACTOR * transformers-float32 KL)). Measured on the tests' models, fmjax's float32 error is 0.4-1.5x
transformers' (see NOISE_FACTOR); a wrong mapping, a missed transpose or one weight off by 1e-3 is off
by orders of magnitude more. `--max-diff` / `--max-kl` replace the limits by absolute ones.

Models with `model.sliding_window` W > 0 are verified on min(max_seq_len, max(32, 4 W)) tokens, so
that the window is exercised (queries past W drop keys).
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from fmjax.convert.mapping import ConversionError
from fmjax.model import Transformer

# Floors of the limits (they hold on well-conditioned models, where float32 noise is ~1e-6).
MAX_ABS_DIFF = {'float32': 1e-4, 'bfloat16': 1e-4}
MAX_KL = {'float32': 1e-6, 'bfloat16': 1e-6}
# limit = max(floor, NOISE_FACTOR * transformers-float32 error vs float64). fmjax's float32 error vs
# float64 measured on the tests' models (Llama, Llama 3, Mistral with a window, Qwen2/3, GPT-2, peaked
# Llama; fp32 and bf16 weights): 0.4-1.5x transformers' own (tests/convert/test_convert.py
# test_verify_limit_follows_the_reference_noise), so 8 leaves >5x headroom for other summation orders,
# while one norm scale off by 1e-3 on the peaked test model is 150x the noise (19x the limit).
NOISE_FACTOR = 8.0
VERIFY_BATCH, VERIFY_LENGTH = 2, 32


def verify_length(model_cfg, length: int = VERIFY_LENGTH) -> int:
  """Tokens per sequence: `length`, or max(length, 4 W) for a sliding window W; at most max_seq_len."""
  window = int(model_cfg.get('sliding_window', 0) or 0)
  return min(int(model_cfg.max_seq_len), max(length, 4 * window) if window > 0 else length)


def sample_tokens(vocab_size: int, max_len: int, batch: int = VERIFY_BATCH, length: int = VERIFY_LENGTH,
                  seed: int = 0) -> np.ndarray:
  """Deterministic random token ids (B, T)."""
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, min(length, max_len))).astype(np.int32)


def params_dtype(params) -> str:
  """'bfloat16' if any parameter is stored in bf16, else 'float32'."""
  return 'bfloat16' if any(jnp.dtype(x.dtype) == jnp.bfloat16 for x in jax.tree.leaves(params)) else 'float32'


def fmjax_logits(params, model_cfg, tokens, attention: str = 'xla') -> np.ndarray:
  """fp32 logits of an fmjax params tree (cast to fp32 for the comparison), with `attention` (an
  implementation that runs on this backend: xla, dense, chunked)."""
  cfg = model_cfg.copy_and_resolve_references()
  cfg.dtype, cfg.param_dtype, cfg.attention, cfg.remat = 'float32', 'float32', attention, 'none'
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  apply = jax.jit(lambda p, t: Transformer(cfg).apply({'params': p}, t))
  return np.asarray(apply(params, jnp.asarray(tokens)), np.float32)


def float64_everywhere():
  """A torch function mode in which float32 means float64: `x.to(torch.float32)`, `x.float()`,
  `softmax(..., dtype=torch.float32)`, `torch.arange(..., dtype=torch.float)` compute in float64.
  transformers upcasts to float32 in norms, softmax and RoPE (to protect bf16 runs), which in a float64
  model would round the reference to float32 there."""
  import torch  # pylint: disable=import-outside-toplevel
  from torch.overrides import TorchFunctionMode  # pylint: disable=import-outside-toplevel

  def widen(a):
    return torch.float64 if a is torch.float32 else a

  class Float64Everywhere(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
      kwargs = kwargs or {}
      if func is torch.Tensor.float:
        func = torch.Tensor.double
      args = tuple(widen(a) for a in args)
      kwargs = {k: widen(v) for k, v in kwargs.items()}
      return func(*args, **kwargs)

  return Float64Everywhere()


def _load_hf(hf_dir: str, float64: bool):
  try:
    import torch
    from transformers import AutoModelForCausalLM
  except ImportError:
    raise ConversionError('--verify needs torch and transformers: pip install "fmjax[hf]"') from None
  import transformers  # pylint: disable=import-outside-toplevel
  from fmjax.convert import hf_io  # pylint: disable=import-outside-toplevel
  config = hf_io.read_config(hf_dir)
  cls = AutoModelForCausalLM   # without model_type, the class `architectures` names (as fmjax read it)
  if 'model_type' not in config and config.get('architectures'):
    cls = getattr(transformers, config['architectures'][0], AutoModelForCausalLM)
  dtype = torch.float64 if float64 else torch.float32
  # MoE models: transformers' default grouped_mm experts take no float64; its eager per-expert loop does
  moe = dict(experts_implementation='eager') if config.get('num_experts') or config.get('num_local_experts') else {}
  return cls.from_pretrained(hf_dir, dtype=dtype, use_safetensors=True, attn_implementation='eager', **moe).eval()


def hf_logits(hf_dir: str, tokens, weights_dtype: str = 'float32', compute_dtype: str = 'float32') -> np.ndarray:
  """Logits of a HF model directory (safetensors only), its weights rounded to `weights_dtype`, computed
  in `compute_dtype` ('float32', or 'float64': every step, see float64_everywhere)."""
  import contextlib  # pylint: disable=import-outside-toplevel
  float64 = compute_dtype == 'float64'
  try:
    import torch
  except ImportError:
    raise ConversionError('--verify needs torch and transformers: pip install "fmjax[hf]"') from None
  # In float64, the model is built inside the mode too: RoPE's inverse frequencies (buffers computed at
  # construction) are then float64 as well.
  with float64_everywhere() if float64 else contextlib.nullcontext():
    model = _load_hf(hf_dir, float64)
    with torch.no_grad():
      if weights_dtype == 'bfloat16':   # the reference gets the same bf16 weights (buffers such as RoPE stay wide)
        for p in model.parameters():
          p.copy_(p.to(torch.bfloat16).to(p.dtype))
      logits = model(torch.as_tensor(np.asarray(tokens, np.int64))).logits
  return logits.numpy().astype(np.float64 if float64 else np.float32)


def compare(fm: np.ndarray, ref: np.ndarray) -> dict:
  """max |diff| of logits and mean KL(ref || fmjax) of the next-token distributions (in float64)."""
  fm, ref = np.asarray(fm, np.float64), np.asarray(ref, np.float64)
  log_p = ref - np.logaddexp.reduce(ref, axis=-1, keepdims=True)
  log_q = fm - np.logaddexp.reduce(fm, axis=-1, keepdims=True)
  kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
  return dict(max_abs_diff=float(np.max(np.abs(fm - ref))), kl=max(kl, 0.0))


def limits(noise: dict, dtype: str, max_abs: float | None = None, max_kl: float | None = None) -> tuple:
  """(max abs, max KL): the overrides when given, else max(floor, NOISE_FACTOR * the reference's noise)."""
  abs_limit = max(MAX_ABS_DIFF[dtype], NOISE_FACTOR * noise['max_abs_diff']) if max_abs is None else max_abs
  kl_limit = max(MAX_KL[dtype], NOISE_FACTOR * noise['kl']) if max_kl is None else max_kl
  return abs_limit, kl_limit


def failures(result: dict, max_abs: float, max_kl: float, dtype: str) -> list[str]:
  """'<what> X exceeds the <dtype> limit L (Nx)' for each limit the result breaks."""
  out = []
  for name, value, limit in (('max abs logits diff', result['max_abs_diff'], max_abs),
                             ('mean KL', result['kl'], max_kl)):
    if not value <= limit:   # NaN fails too
      ratio = value / limit if limit > 0 else float('inf')
      out.append(f'{name} {value:.3g} exceeds the {dtype} limit {limit:.3g} ({ratio:.3g}x)')
  return out


def _limit_text(limit: float, override: float | None, floor: float, noise: float, flag: str) -> str:
  if override is not None:
    return f'limit {limit:.3g} from {flag}'
  return f'limit {limit:.3g} = max({floor:.3g}, {NOISE_FACTOR:g} x {noise:.3g})'


def verify(params, model_cfg, hf_dir: str, max_abs: float | None = None, max_kl: float | None = None,
           log=print) -> dict:
  """Compare fmjax's float32 logits with transformers' float64 ones; raise ConversionError naming each
  limit broken. Returns max_abs_diff, kl (fmjax vs float64), reference_noise, reference_noise_kl
  (transformers float32 vs float64), limit, kl_limit, tokens (B, T) and dtype."""
  dtype = params_dtype(params)
  tokens = sample_tokens(model_cfg.vocab_size, model_cfg.max_seq_len, length=verify_length(model_cfg))
  reference = hf_logits(hf_dir, tokens, dtype, 'float64')
  noise = compare(hf_logits(hf_dir, tokens, dtype, 'float32'), reference)
  result = compare(fmjax_logits(params, model_cfg, tokens), reference)
  abs_limit, kl_limit = limits(noise, dtype, max_abs, max_kl)
  result.update(reference_noise=noise['max_abs_diff'], reference_noise_kl=noise['kl'], limit=abs_limit,
                kl_limit=kl_limit, tokens=tuple(tokens.shape), dtype=dtype)
  abs_text = _limit_text(abs_limit, max_abs, MAX_ABS_DIFF[dtype], noise['max_abs_diff'], '--max-diff')
  kl_text = _limit_text(kl_limit, max_kl, MAX_KL[dtype], noise['kl'], '--max-kl')
  log(f'verify: max abs logits diff {result["max_abs_diff"]:.3g} vs transformers float64, transformers float32 '
      f'{noise["max_abs_diff"]:.3g} ({abs_text}); KL {result["kl"]:.3g}, transformers float32 {noise["kl"]:.3g} '
      f'({kl_text}); '
      f'on {tokens.shape[0]}x{tokens.shape[1]} tokens, {dtype} weights on both sides')
  broken = failures(result, abs_limit, kl_limit, dtype)
  if broken:
    raise ConversionError(f'verify failed: {"; ".join(broken)} (vs transformers float64, whose own float32 '
                          f'run is off by {noise["max_abs_diff"]:.3g}): the conversion does not reproduce the '
                          'model (--max-diff / --max-kl set absolute limits)')
  return result

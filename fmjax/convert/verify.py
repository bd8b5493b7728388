"""`--verify`: run the fmjax model and the transformers model on the same tokens and compare logits.

Both sides compute in fp32 from the same weights: when the converted parameters are bf16, the
transformers reference is rounded to bf16 too (a bf16 reference), so the only difference left is
fp32 arithmetic order, a few 1e-6 on the test models. The default limits are therefore tight
(max abs logits diff 1e-4, mean KL 1e-6, for either dtype); a wrong mapping or a missed
transpose is off by orders of magnitude more. `--max-diff` / `--max-kl` override them.
"""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from fmjax.convert.mapping import ConversionError
from fmjax.model import Transformer

MAX_ABS_DIFF = {'float32': 1e-4, 'bfloat16': 1e-4}   # fp32 compute of identical weights on both sides
MAX_KL = {'float32': 1e-6, 'bfloat16': 1e-6}


def sample_tokens(vocab_size: int, max_len: int, batch: int = 2, length: int = 32, seed: int = 0) -> np.ndarray:
  """Deterministic random token ids (B, T)."""
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, min(length, max_len))).astype(np.int32)


def params_dtype(params) -> str:
  """'bfloat16' if any parameter is stored in bf16, else 'float32'."""
  return 'bfloat16' if any(jnp.dtype(x.dtype) == jnp.bfloat16 for x in jax.tree.leaves(params)) else 'float32'


def fmjax_logits(params, model_cfg, tokens) -> np.ndarray:
  """fp32 logits of an fmjax params tree (cast to fp32 for the comparison)."""
  cfg = model_cfg.copy_and_resolve_references()
  cfg.dtype, cfg.param_dtype, cfg.attention, cfg.remat = 'float32', 'float32', 'xla', 'none'
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  apply = jax.jit(lambda p, t: Transformer(cfg).apply({'params': p}, t))
  return np.asarray(apply(params, jnp.asarray(tokens)), np.float32)


def hf_logits(hf_dir: str, tokens, weights_dtype: str = 'float32') -> np.ndarray:
  """fp32 logits of a HF model directory (safetensors only), its weights rounded to `weights_dtype`."""
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
  model = cls.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True, attn_implementation='eager')
  model.eval()
  with torch.no_grad():
    if weights_dtype == 'bfloat16':   # the reference gets the same bf16 weights (buffers such as RoPE stay fp32)
      for p in model.parameters():
        p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model(torch.as_tensor(np.asarray(tokens, np.int64))).logits.float().numpy()


def compare(fm: np.ndarray, hf: np.ndarray) -> dict:
  """max |diff| of logits and mean KL(hf || fmjax) of the next-token distributions."""
  log_p = hf - np.logaddexp.reduce(hf, axis=-1, keepdims=True)
  log_q = fm - np.logaddexp.reduce(fm, axis=-1, keepdims=True)
  kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
  return dict(max_abs_diff=float(np.max(np.abs(fm - hf))), kl=max(kl, 0.0))


def failures(result: dict, max_abs: float, max_kl: float, dtype: str) -> list[str]:
  """'<what> X exceeds the <dtype> limit L (Nx)' for each limit the result breaks."""
  out = []
  for name, value, limit in (('max abs logits diff', result['max_abs_diff'], max_abs),
                             ('mean KL', result['kl'], max_kl)):
    if not value <= limit:   # NaN fails too
      ratio = value / limit if limit > 0 else float('inf')
      out.append(f'{name} {value:.3g} exceeds the {dtype} limit {limit:.3g} ({ratio:.3g}x)')
  return out


def verify(params, model_cfg, hf_dir: str, max_abs: float | None = None, max_kl: float | None = None,
           log=print) -> dict:
  """Compare logits; raise ConversionError naming each limit broken (defaults: by the params' dtype)."""
  dtype = params_dtype(params)
  max_abs = MAX_ABS_DIFF[dtype] if max_abs is None else max_abs
  max_kl = MAX_KL[dtype] if max_kl is None else max_kl
  tokens = sample_tokens(model_cfg.vocab_size, model_cfg.max_seq_len)
  result = compare(fmjax_logits(params, model_cfg, tokens), hf_logits(hf_dir, tokens, dtype))
  log(f'verify: max abs logits diff {result["max_abs_diff"]:.3g} (limit {max_abs:.3g}), KL {result["kl"]:.3g} '
      f'(limit {max_kl:.3g}) on {tokens.shape[0]}x{tokens.shape[1]} tokens, {dtype} weights on both sides')
  broken = failures(result, max_abs, max_kl, dtype)
  if broken:
    raise ConversionError(f'verify failed: {"; ".join(broken)}: the conversion does not reproduce the model '
                          '(--max-diff / --max-kl set the limits)')
  return result

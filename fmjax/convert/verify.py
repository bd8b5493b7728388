"""`--verify`: run the fmjax model and the transformers model on the same tokens and compare logits."""

from __future__ import annotations

import numpy as np
import jax
import jax.numpy as jnp

from fmjax.convert.mapping import ConversionError
from fmjax.model import Transformer


def sample_tokens(vocab_size: int, max_len: int, batch: int = 2, length: int = 32, seed: int = 0) -> np.ndarray:
  """Deterministic random token ids (B, T)."""
  return np.random.default_rng(seed).integers(0, vocab_size, (batch, min(length, max_len))).astype(np.int32)


def fmjax_logits(params, model_cfg, tokens) -> np.ndarray:
  """fp32 logits of an fmjax params tree (cast to fp32 for the comparison)."""
  cfg = model_cfg.copy_and_resolve_references()
  cfg.dtype, cfg.param_dtype, cfg.attention, cfg.remat = 'float32', 'float32', 'xla', 'none'
  params = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), params)
  apply = jax.jit(lambda p, t: Transformer(cfg).apply({'params': p}, t))
  return np.asarray(apply(params, jnp.asarray(tokens)), np.float32)


def hf_logits(hf_dir: str, tokens) -> np.ndarray:
  """fp32 logits of a HF model directory (safetensors only; weights upcast to fp32)."""
  try:
    import torch
    from transformers import AutoModelForCausalLM
  except ImportError:
    raise ConversionError('--verify needs torch and transformers: pip install "fmjax[hf]"') from None
  model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=torch.float32, use_safetensors=True,
                                               attn_implementation='eager')
  model.eval()
  with torch.no_grad():
    return model(torch.as_tensor(np.asarray(tokens, np.int64))).logits.float().numpy()


def compare(fm: np.ndarray, hf: np.ndarray) -> dict:
  """max |diff| of logits and mean KL(hf || fmjax) of the next-token distributions."""
  log_p = hf - np.logaddexp.reduce(hf, axis=-1, keepdims=True)
  log_q = fm - np.logaddexp.reduce(fm, axis=-1, keepdims=True)
  kl = float(np.mean(np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)))
  return dict(max_abs_diff=float(np.max(np.abs(fm - hf))), kl=max(kl, 0.0))


def verify(params, model_cfg, hf_dir: str, max_abs: float, max_kl: float, log=print) -> dict:
  """Compare logits; raise ConversionError above either threshold."""
  tokens = sample_tokens(model_cfg.vocab_size, model_cfg.max_seq_len)
  result = compare(fmjax_logits(params, model_cfg, tokens), hf_logits(hf_dir, tokens))
  log(f'verify: max abs logits diff {result["max_abs_diff"]:.3g}, KL {result["kl"]:.3g} '
      f'on {tokens.shape[0]}x{tokens.shape[1]} tokens')
  if result['max_abs_diff'] > max_abs or result['kl'] > max_kl:
    raise ConversionError(f'verify failed: max abs diff {result["max_abs_diff"]:.3g} (limit {max_abs}) or '
                          f'KL {result["kl"]:.3g} (limit {max_kl}); the conversion does not reproduce the model')
  return result

"""Qwen2.5-1.5B's shape (28 layers, width 1536, 12 query / 2 KV heads of 128, q/k/v biases, SwiGLU 8960,
tied embeddings), as `fmjax-convert from-hf` of Qwen/Qwen2.5-1.5B gives it.

bf16 compute over fp32 parameters and AdamW state at sequence 4096 on a TPU v5p-8 slice (4 chips,
FSDP); `python -m fmjax.plan --config configs/qwen2_5_1_5b.py [--topology v6e-8]` checks the fit.
The vocabulary is Qwen's (151,936 ids): set data.tokenizer to the Qwen tokenizer.json.
"""

from fmjax.config import base_config
from fmjax.configs._tpu_pretraining import tpu_pretraining


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=151936, d_model=1536, num_layers=28, num_heads=12, num_kv_heads=2, head_dim=0, mlp_dim=8960,
      max_seq_len=32768, rope_theta=1_000_000.0, norm_eps=1e-6, attention_bias=True, tie_embeddings=True,
      loss_vocab_chunk=16384))   # the fused loss: no (tokens, vocab) fp32 logits in memory
  return tpu_pretraining(cfg, seq_len=4096, global_batch_size=64, microbatches=4, learning_rate=2e-4)

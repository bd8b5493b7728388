"""Qwen3-0.6B's shape (28 layers, width 1024, 16 query / 8 KV heads of 128, q/k RMSNorm, tied embeddings)
for pretraining from scratch or for continuing an imported checkpoint (`fmjax-convert from-hf` of
Qwen/Qwen3-0.6B gives the same model section; `--init-from` reads it from the checkpoint).

bf16 compute over fp32 parameters and AdamW state at sequence 4096 on a TPU v5p-8 slice (4 chips,
FSDP); `python -m fmjax.plan --config configs/qwen3_0_6b.py [--topology v6e-8]` checks the fit.
The vocabulary is Qwen's (151,936 ids): set data.tokenizer to the Qwen tokenizer.json.
"""

from fmjax.config import base_config
from fmjax.configs._tpu_pretraining import tpu_pretraining


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=151936, d_model=1024, num_layers=28, num_heads=16, num_kv_heads=8, head_dim=128, mlp_dim=3072,
      max_seq_len=40960, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True, tie_embeddings=True,
      loss_vocab_chunk=16384))   # the fused loss: no (tokens, vocab) fp32 logits in memory
  return tpu_pretraining(cfg, seq_len=4096, global_batch_size=64, microbatches=2, learning_rate=3e-4)

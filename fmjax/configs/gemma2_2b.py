"""Gemma 2 2B's shape (26 layers alternating local (window 4096) and global, width 2304, 8 query / 4 KV
heads of 256, attention scores soft-capped at 50 and final logits at 30, sandwich (1 + w) norms, GeGLU
9216, embeddings scaled by sqrt(2304), tied), as `fmjax-convert from-hf` of google/gemma-2-2b gives it.

bf16 compute over fp32 parameters and AdamW state at sequence 8192 (the model's context: the local
layers' window covers half of it) on a TPU v5p-8 slice; `python -m fmjax.plan --config
configs/gemma2_2b.py [--topology v6e-8]` checks the fit. The vocabulary is Gemma's (256,000 ids): set
data.tokenizer to its tokenizer.json.
"""

from fmjax.config import base_config
from fmjax.configs._tpu_pretraining import tpu_pretraining


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=256000, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216,
      max_seq_len=8192, rope_theta=10_000.0, norm_eps=1e-6, activation='geglu', norm_position='sandwich',
      norm_unit_offset=True, embed_scale=True, tie_embeddings=True, query_scale_dim=256, sliding_window=4096,
      window_pattern='LG', attn_logit_softcap=50.0, final_logit_softcap=30.0,
      loss_vocab_chunk=16384))   # the fused loss: no (tokens, vocab) fp32 logits in memory
  return tpu_pretraining(cfg, seq_len=8192, global_batch_size=32, microbatches=4, learning_rate=2e-4)

"""Gemma 2 2B's shape (26 layers alternating local (window 4096) and global, width 2304, 8 query / 4 KV
heads of 256, attention scores soft-capped at 50 and final logits at 30, sandwich (1 + w) norms, GeGLU
9216, embeddings scaled by sqrt(2304), tied), as `fmjax-convert from-hf` of google/gemma-2-2b gives it.

bf16 compute over fp32 parameters and AdamW state at sequence 8192 (the model's context: the local
layers' window covers half of it) on a TPU v5p-8 slice; `python -m fmjax.plan --config
configs/gemma2_2b.py [--topology v6e-8]` checks the fit. The vocabulary is Gemma's (256,000 ids): set
data.tokenizer to its tokenizer.json.
"""

from fmjax.config import base_config


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=256000, d_model=2304, num_layers=26, num_heads=8, num_kv_heads=4, head_dim=256, mlp_dim=9216,
      max_seq_len=8192, rope_theta=10_000.0, norm_eps=1e-6, activation='geglu', norm_position='sandwich',
      norm_unit_offset=True, embed_scale=True, tie_embeddings=True, query_scale_dim=256, sliding_window=4096,
      window_pattern='LG', attn_logit_softcap=50.0, final_logit_softcap=30.0,
      loss_vocab_chunk=16384,   # the fused loss: no (tokens, vocab) fp32 logits in memory
      dtype='bfloat16', param_dtype='float32', remat='dots', attention='auto'))
  cfg.data.source = 'tfds'
  cfg.data.tfds_name = 'c4/en:3.1.0'
  cfg.seq_len = 8192
  cfg.topology = 'v5p-8'
  cfg.global_batch_size = 32   # 256K tokens a step
  cfg.microbatches = 4
  cfg.steps = 100_000
  cfg.optim.update(dict(learning_rate=2e-4, end_learning_rate=2e-5, warmup_steps=2000))
  cfg.log_every = 20
  cfg.eval_every = 1000
  cfg.checkpoint_every = 1000
  return cfg

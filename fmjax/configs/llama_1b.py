"""A ~1.1B-parameter LLaMA-style model (RMSNorm, RoPE, SwiGLU, GQA) in bf16 at sequence 2048.

bf16 compute over fp32 parameters and AdamW state (logits, loss and softmax statistics in fp32).
Sized for one 80-141 GB GPU or a small TPU slice; FSDP over all devices by default.
Set the data and tokenizer as in gpt2_124m.py.
"""

from fmjax.config import base_config


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=32000, d_model=2048, num_layers=16, num_heads=32, num_kv_heads=8, head_dim=64,
      mlp_dim=8192, max_seq_len=2048, rope_theta=500000.0, dtype='bfloat16', param_dtype='float32',
      remat='dots', attention='auto'))
  cfg.data.source = 'tfds'
  cfg.data.tfds_name = 'c4/en:3.1.0'
  cfg.seq_len = 2048
  cfg.global_batch_size = 256
  cfg.steps = 100_000
  cfg.optim.update(dict(learning_rate=3e-4, end_learning_rate=3e-5, warmup_steps=2000))
  cfg.log_every = 20
  cfg.eval_every = 1000
  cfg.checkpoint_every = 1000
  return cfg

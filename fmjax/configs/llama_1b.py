"""A ~1.1B-parameter LLaMA-style model (RMSNorm, RoPE, SwiGLU, GQA) in bf16 at sequence 2048.

bf16 compute over fp32 parameters and AdamW state (logits, loss and softmax statistics in fp32).
Sized for a TPU v5p-8 slice (4 chips, one host; `config.topology`): FSDP over the 4 chips, the
global batch of 256 x 2048 tokens in 2 microbatches so the step fits a chip's 95 GiB
(`python -m fmjax.plan --config configs/llama_1b.py` checks it). Elsewhere (e.g. 8 x 80 GB GPUs)
plan with --topology/--devices first. Set the data and tokenizer as in gpt2_124m.py.
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
  cfg.topology = 'v5p-8'       # the slice it is sized for (fmjax.plan's default target)
  cfg.global_batch_size = 256
  cfg.microbatches = 2         # 2 x 128 sequences per step: the activations fit a v5p chip
  cfg.steps = 100_000
  cfg.optim.update(dict(learning_rate=3e-4, end_learning_rate=3e-5, warmup_steps=2000))
  cfg.log_every = 20
  cfg.eval_every = 1000
  cfg.checkpoint_every = 1000
  return cfg

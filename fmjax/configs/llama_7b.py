"""LLaMA-7B shape (32 layers, width 4096, MHA) in bf16 at sequence 2048 with full remat.

bf16 compute over fp32 parameters and AdamW state (logits, loss and softmax statistics in fp32).
Sized for a TPU v5p-32 slice (16 chips, 4 hosts; `config.topology`): FSDP over the 16 chips, the
global batch of 1024 x 2048 tokens in 2 microbatches so the step fits a chip's 95 GiB
(`python -m fmjax.plan --config configs/llama_7b.py` checks it). Elsewhere plan with
--topology/--devices first; add tensor parallelism with --config.mesh.tensor=N.
Set the data and tokenizer as in gpt2_124m.py.
"""

from fmjax.config import base_config


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, mlp_dim=11008, max_seq_len=2048,
      rope_theta=10000.0, dtype='bfloat16', param_dtype='float32', remat='full', attention='auto'))
  cfg.data.source = 'tfds'
  cfg.data.tfds_name = 'c4/en:3.1.0'
  cfg.seq_len = 2048
  cfg.topology = 'v5p-32'      # the slice it is sized for (fmjax.plan's default target)
  cfg.global_batch_size = 1024
  cfg.microbatches = 2         # 2 x 512 sequences per step: the activations fit a v5p chip
  cfg.steps = 250_000
  cfg.optim.update(dict(learning_rate=3e-4, end_learning_rate=3e-5, warmup_steps=2000))
  cfg.log_every = 10
  cfg.eval_every = 1000
  cfg.checkpoint_every = 500
  return cfg

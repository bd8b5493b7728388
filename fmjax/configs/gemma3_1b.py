"""Gemma 3 1B's shape (26 layers in a 5 local : 1 global pattern, window 512, width 1152, 4 query heads
and 1 KV head of 256, q/k RMSNorms, local RoPE base 10k and global 1M, sandwich (1 + w) norms, GeGLU
6912, embeddings scaled by sqrt(1152), tied), as `fmjax-convert from-hf` of google/gemma-3-1b-pt gives it.

The 26 layers stay one scanned block: each step of the scan switches to its layer's kind (local or
global). bf16 compute over fp32 parameters and AdamW state at sequence 4096 on a TPU v5p-8 slice;
`python -m fmjax.plan --config configs/gemma3_1b.py [--topology v6e-8]` checks the fit. The vocabulary
is Gemma's (262,144 ids): set data.tokenizer to its tokenizer.json.
"""

from fmjax.config import base_config
from fmjax.configs._tpu_pretraining import tpu_pretraining


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=262144, d_model=1152, num_layers=26, num_heads=4, num_kv_heads=1, head_dim=256, mlp_dim=6912,
      max_seq_len=32768, rope_theta=1_000_000.0, rope_local_theta=10_000.0, norm_eps=1e-6, qk_norm=True,
      activation='geglu', norm_position='sandwich', norm_unit_offset=True, embed_scale=True, tie_embeddings=True,
      query_scale_dim=256, sliding_window=512, window_pattern='LLLLLG',
      loss_vocab_chunk=16384))   # the fused loss: no (tokens, vocab) fp32 logits in memory
  return tpu_pretraining(cfg, seq_len=4096, global_batch_size=64, microbatches=4, learning_rate=3e-4)

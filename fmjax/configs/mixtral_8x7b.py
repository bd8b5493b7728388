"""Mixtral-8x7B's shape (32 layers, width 4096, 32 query / 8 KV heads, 8 experts of width 14336, 2 per
token, renormalised): 46.7B parameters, 12.9B active per token.

For continuing `fmjax-convert from-hf` of mistralai/Mixtral-8x7B-v0.1 (same model section) or pretraining
that shape: bf16 compute over fp32 parameters and AdamW state at sequence 4096 on a TPU v5p-64 slice
(32 chips), experts split 8 ways over mesh.expert and 4 ways over fsdp, the rest FSDP (on v5p-32 the
fp32 state, gradients and accumulator alone take about 58 GiB of each chip's 95, and the step does not fit);
`python -m fmjax.plan --config configs/mixtral_8x7b.py` checks the fit. Mixtral's vocabulary: 32,000.
"""

from fmjax.config import base_config
from fmjax.configs._tpu_pretraining import tpu_pretraining


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=32000, d_model=4096, num_layers=32, num_heads=32, num_kv_heads=8, mlp_dim=14336,
      max_seq_len=32768, rope_theta=1_000_000.0, norm_eps=1e-5, num_experts=8, num_experts_per_tok=2,
      moe_renormalize=True, moe_aux_loss=0.02, moe_router_z_loss=0.0, loss_vocab_chunk=16000))
  cfg.mesh.update(dict(data=1, fsdp=4, expert=8, tensor=1))
  return tpu_pretraining(cfg, seq_len=4096, global_batch_size=128, microbatches=2, learning_rate=2e-4,
                         topology='v5p-64')

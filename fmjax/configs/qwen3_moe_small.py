"""Qwen3-30B-A3B's shape, the smallest Qwen3-MoE (48 layers, width 2048, 32 query / 4 KV heads of 128, q/k
RMSNorm; 128 experts of width 768, 8 per token, renormalised): 30.5B parameters, 3.3B active per token.

For pretraining from scratch or continuing an import (`fmjax-convert from-hf` of Qwen/Qwen3-30B-A3B gives
the same model section). bf16 compute over fp32 parameters and AdamW state at sequence 4096 on a TPU
v5p-32 slice (16 chips): experts split 8 ways over mesh.expert and 2 ways over fsdp, the rest FSDP;
`python -m fmjax.plan --config configs/qwen3_moe_small.py` checks the fit. The vocabulary is Qwen's.
"""

from fmjax.config import base_config
from fmjax.configs._tpu_pretraining import tpu_pretraining


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=151936, d_model=2048, num_layers=48, num_heads=32, num_kv_heads=4, head_dim=128, mlp_dim=6144,
      max_seq_len=40960, rope_theta=1_000_000.0, norm_eps=1e-6, qk_norm=True, tie_embeddings=False,
      num_experts=128, num_experts_per_tok=8, moe_mlp_dim=768, moe_renormalize=True, moe_aux_loss=0.001,
      moe_router_z_loss=0.0, loss_vocab_chunk=16384))
  cfg.mesh.update(dict(data=1, fsdp=2, expert=8, tensor=1))
  return tpu_pretraining(cfg, seq_len=4096, global_batch_size=64, microbatches=2, learning_rate=3e-4,
                         topology='v5p-32')

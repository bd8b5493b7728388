"""CPU-sized mixture-of-experts: configs/default.py with 8 experts, top-2, in every layer.

Each expert is half the dense default's MLP width (192 of 384), so a token's two experts cost what the
default's MLP does: the same active parameters and FLOPs per token, four times the MLP parameters.
`python -m fmjax.train --config configs/moe_default.py --workdir DIR` trains it on the same embedded corpus.
"""

from fmjax.configs import default


def get_config():
  cfg = default.get_config()
  cfg.model.update(dict(num_experts=8, num_experts_per_tok=2, moe_mlp_dim=192))
  return cfg

"""configs/llama_1b.py's model at 32,768 tokens per sequence: context parallelism over a TPU v5p-8 slice.

The sequence of every row is split over the 4 chips (mesh.sequence=4, which also shards the parameters and
AdamW state as FSDP does): each chip holds 8,192 tokens of each row's activations. Attention gathers the
keys and values of the row on every chip and runs the splash kernel on its query chunks
(model.context_attention=all_gather); the zigzag layout gives every chip an early and a late chunk, so the
causal work is even. RoPE base 500k as Llama 3. 8 rows x 32k = 262k tokens per step, one row per microbatch.
`python -m fmjax.plan --config configs/llama_1b_32k.py --context-baseline` compiles it for v5p-8 and sets
its activation memory beside the same step without the context axis.
"""

from fmjax.configs import llama_1b


def get_config():
  cfg = llama_1b.get_config()
  cfg.model.update(dict(max_seq_len=32768, context_attention='all_gather', context_load_balance=True,
                        loss_vocab_chunk=8000))
  cfg.mesh.update(dict(data=1, fsdp=1, sequence=4, tensor=1))
  cfg.seq_len = 32768
  cfg.global_batch_size = 8
  cfg.microbatches = 8         # one row (8,192 tokens a chip) per microbatch
  return cfg

"""GPT-2 small (124M): LayerNorm, GELU, learned positions, biases, tied embeddings.

bf16 compute over fp32 parameters and AdamW state (logits, loss and softmax statistics in fp32).
Point it at your data, e.g. a prepared TFDS dataset:
  --config.data.source=tfds --config.data.tfds_name=NAME --config.data.tfds_data_dir=DIR
and a SentencePiece tokenizer (tools/train_tokenizer.py) with --config.data.tokenizer=PATH.
"""

from fmjax.config import base_config


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=50304, d_model=768, num_layers=12, num_heads=12, mlp_dim=3072, max_seq_len=1024,
      activation='gelu', norm='layernorm', positions='learned', use_bias=True, tie_embeddings=True,
      dropout=0.0, dtype='bfloat16', param_dtype='float32', attention='auto'))
  cfg.data.source = 'tfds'
  cfg.data.tfds_name = 'openwebtext'
  cfg.seq_len = 1024
  cfg.global_batch_size = 512
  cfg.steps = 600_000
  cfg.optim.update(dict(learning_rate=6e-4, end_learning_rate=6e-5, warmup_steps=2000, weight_decay=0.1,
                        b2=0.95))
  cfg.log_every = 50
  cfg.eval_every = 2000
  cfg.checkpoint_every = 2000
  cfg.progress_bar = True
  return cfg

"""BERT-base shape (110M parameters) for accelerators: 12 layers, 768 wide, 12 heads, post-LN,
learned positions, token types, GELU (erf), an MLM head tied to the embeddings.

Give it a WordPiece/SentencePiece tokenizer with data.tokenizer and a corpus with data.*; the
byte tokenizer default keeps it runnable anywhere. Sequence 512 as BERT's second phase.
"""

from fmjax.config import base_config


def get_config():
  cfg = base_config()
  cfg.model.update(dict(kind='encoder', vocab_size=30522, d_model=768, num_layers=12, num_heads=12,
                        mlp_dim=3072, max_seq_len=512, activation='gelu_exact', norm='layernorm', norm_eps=1e-12,
                        norm_position='post', positions='learned', type_vocab_size=2, use_bias=True,
                        tie_embeddings=True, dropout=0.1, dtype='bfloat16'))
  cfg.mlm.update(dict(mask_rate=0.15, mask_token_rate=0.8, random_token_rate=0.1, whole_word=True))
  cfg.data.tokenizer = 'byte'
  cfg.seq_len = 512
  cfg.global_batch_size = 256
  cfg.steps = 1_000_000
  cfg.optim.update(dict(learning_rate=1e-4, end_learning_rate=0.0, warmup_steps=10_000, b1=0.9, b2=0.999,
                        eps=1e-6, weight_decay=0.01))
  cfg.log_every = 100
  cfg.eval_every = 10_000
  cfg.checkpoint_every = 10_000
  return cfg

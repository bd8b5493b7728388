"""CPU-sized BERT-style encoder: masked-LM pretraining on the Python standard library's own source.

Runs anywhere with no download: `python -m fmjax.train --config configs/encoder_default.py --workdir DIR`.
Byte tokenizer ([MASK] is byte 0xFF), 30 % of tokens chosen with BERT's 80/10/10 replacement,
bidirectional attention within each packed document, RoPE (it leaves the unigram plateau sooner
than learned positions here). See configs/bert_base.py for BERT's own shape. Fine-tune it with
`python -m fmjax.finetune --demo --config.init_from=DIR` plus this model's fields as overrides
(--config.model.kind=encoder --config.model.activation=gelu_exact --config.model.norm=layernorm
--config.model.use_bias=true --config.model.tie_embeddings=true), so that the random-init arm of
the demo is the same encoder.
"""

from fmjax.config import base_config


def get_config():
  cfg = base_config()
  cfg.model.update(dict(kind='encoder', vocab_size=259, d_model=128, num_layers=4, num_heads=4, mlp_dim=384,
                        max_seq_len=128, activation='gelu_exact', norm='layernorm', positions='rope',
                        use_bias=True, tie_embeddings=True))
  # 30 % of bytes chosen (twice BERT's 15 %: more signal per step for a 5-minute CPU run), token-level:
  # whole-word masking of bytes (mlm.whole_word=true) is a much harder task
  cfg.mlm.update(dict(mask_rate=0.3, mask_token_rate=0.8, random_token_rate=0.1, whole_word=False))
  cfg.data.source = 'stdlib'
  cfg.data.tokenizer = 'byte'
  cfg.seq_len = 128
  cfg.global_batch_size = 16
  cfg.steps = 900
  cfg.optim.learning_rate = 2e-3
  cfg.optim.end_learning_rate = 2e-4
  cfg.optim.warmup_steps = 50
  cfg.log_every = 20
  cfg.eval_every = 300
  cfg.checkpoint_every = 300
  return cfg

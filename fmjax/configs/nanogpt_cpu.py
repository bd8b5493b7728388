"""nanoGPT's CPU shape, GPT-2 style: 4 layers, 4 heads, width 128, block 64, batch 12, characters.

nanoGPT's tiny-Shakespeare recipe (shakespeare_char on CPU: lr 1e-3 cosine to 1e-4, warmup 100,
2000 steps, no dropout, eval every 250 steps), with a character tokenizer: the sorted characters
of input.txt (65 for tiny Shakespeare) plus pad/bos/eos = 68 tokens. Paragraphs are the
documents; 10 % of them (by a stable hash) are the validation split. Two commands:

  python tools/train_tokenizer.py --model-type char --input data/tinyshakespeare/input.txt \
      --out workdirs/shakespeare_chars.json
  python -m fmjax.train --config configs/nanogpt_cpu.py --workdir workdirs/nanogpt \
      --config.data.files=data/tinyshakespeare/input.txt \
      --config.data.tokenizer=workdirs/shakespeare_chars.json

(input.txt: https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt.)
Another text with N distinct characters needs --config.model.vocab_size=N+3 (train_tokenizer prints it).
`python -m fmjax.bench --config configs/nanogpt_cpu.py` times the same model on synthetic tokens.
"""

from fmjax.config import base_config


def get_config():
  cfg = base_config()
  cfg.model.update(dict(
      vocab_size=68, d_model=128, num_layers=4, num_heads=4, mlp_dim=512, max_seq_len=64,
      activation='gelu', norm='layernorm', positions='learned', use_bias=True, tie_embeddings=True,
      scan_layers=False))  # 4 layers compile fast unrolled, and run ~15 % faster on CPU than scanned
  cfg.data.update(dict(source='text', split_by='paragraph', validation_fraction=0.1))
  cfg.seq_len = 64
  cfg.global_batch_size = 12
  cfg.steps = 2000
  cfg.eval_every = 250
  cfg.eval_batches = 20
  cfg.optim.update(dict(learning_rate=1e-3, end_learning_rate=1e-4, warmup_steps=100, b2=0.99,
                        weight_decay=0.1))
  cfg.mesh.update(dict(data=1, fsdp=1, tensor=1))
  return cfg

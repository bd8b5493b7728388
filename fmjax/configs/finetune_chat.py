"""Chat fine-tuning (finetune.task=sft) of the configs/default.py model, and the chat demo's recipe.

  python -m fmjax.finetune --config configs/finetune_chat.py --config.init_from=PRETRAIN_WORKDIR \
      --config.finetune.train_files='chats/train*.jsonl' --config.finetune.eval_files='chats/eval.jsonl' --workdir W

Rows of `messages` ([{role, content}]) or ShareGPT `conversations`; loss on the assistant turns, rendered
with the tokenizer's chat template or the built-in one (byte tokenizer: `User: ...` / `Assistant: ...`
lines, EOS ends a turn). The demo (`python -m fmjax.finetune --demo chat --config.init_from=W0 --workdir
W`) writes a unit-conversion task, runs this SFT, then DPO (finetune.task=dpo, `demo_dpo` below) and prints
held-out exact-match accuracy before SFT, after SFT and after DPO.
"""

import os

from fmjax.config import load_config_file

DEMO_DPO = dict(steps=150, learning_rate=1e-5, beta=0.1)   # the demo's DPO stage (see fmjax/finetune/chat_demo.py)


def get_config():
  cfg = load_config_file(os.path.join(os.path.dirname(os.path.abspath(__file__)), 'default.py'))
  ft = cfg.finetune
  ft.task = 'sft'
  ft.source = 'jsonl'
  ft.epochs = 0                      # a fixed number of steps: packed rows hold 2-3 short conversations each
  ft.validation_fraction = 0.05
  ft.sample_prompts = 4
  ft.sample_tokens = 24
  cfg.steps = 500
  cfg.seq_len = 128
  cfg.global_batch_size = 16
  cfg.optim.learning_rate = 1e-3
  cfg.optim.end_learning_rate = 1e-4
  cfg.optim.weight_decay = 0.01
  cfg.log_every = 50
  cfg.eval_every = 250
  cfg.checkpoint_every = 0
  cfg.keep_checkpoints = 1
  return cfg

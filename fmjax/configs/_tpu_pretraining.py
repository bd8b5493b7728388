"""What the TPU pretraining presets of the model families share (not a config itself): bf16 compute over
fp32 parameters and AdamW state, `remat=dots`, attention chosen per platform, C4 from TFDS, 100k steps of
warmup + cosine to a tenth of the peak rate, logs every 20 steps, eval and checkpoints every 1000."""


def tpu_pretraining(cfg, *, seq_len: int, global_batch_size: int, microbatches: int, learning_rate: float,
                    topology: str = 'v5p-8'):
  """`cfg` (its model section set) as a pretraining run sized for `topology`; returns it."""
  cfg.model.update(dict(dtype='bfloat16', param_dtype='float32', remat='dots', attention='auto'))
  cfg.data.source = 'tfds'
  cfg.data.tfds_name = 'c4/en:3.1.0'
  cfg.seq_len = seq_len
  cfg.topology = topology            # the slice it is sized for (fmjax.plan's default target)
  cfg.global_batch_size = global_batch_size
  cfg.microbatches = microbatches
  cfg.steps = 100_000
  cfg.optim.update(dict(learning_rate=learning_rate, end_learning_rate=learning_rate / 10, warmup_steps=2000))
  cfg.log_every = 20
  cfg.eval_every = 1000
  cfg.checkpoint_every = 1000
  return cfg

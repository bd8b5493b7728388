"""Values that types alone cannot check: choices, divisibility, ranges, the data and encoder options."""

from __future__ import annotations

import logging
import math

import ml_collections

from fmjax.config.errors import ConfigError

_WARNED: set[str] = set()

_CHOICES = {
    'model.kind': ('decoder', 'encoder'),
    'model.activation': ('swiglu', 'geglu', 'gelu', 'gelu_exact'),
    'model.norm_position': ('pre', 'post', 'sandwich', 'after'),
    'model.qk_norm_scope': ('head', 'all'),
    'model.norm': ('rmsnorm', 'layernorm'),
    'model.positions': ('rope', 'learned'),
    'model.rope_scaling': ('none', 'linear', 'llama3'),
    'model.remat': ('none', 'full', 'dots', 'names'),
    'model.attention': ('auto', 'xla', 'dense', 'cudnn', 'pallas_gpu', 'splash', 'chunked'),
    'model.context_attention': ('ring', 'all_gather'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.dtype': ('float32', 'bfloat16'),
    'model.quantization': ('none', 'int8', 'fp8'),
    'model.moe_kernel': ('auto', 'ragged_dot', 'megablox', 'blocked'),
    'data.source': ('stdlib', 'text', 'jsonl', 'parquet', 'tfds'),
    'data.split_by': ('file', 'paragraph'),
    'optim.name': ('adamw', 'muon', 'adafactor', 'lion'),
    'optim.schedule': ('cosine', 'linear', 'constant', 'inverse_sqrt', 'wsd'),
    'optim.decay_shape': ('linear', 'cosine', 'sqrt'),
}


def validate(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """Check values that types alone cannot (choices, divisibility, positivity)."""
  for key, choices in _CHOICES.items():
    section, leaf = key.split('.')
    if section in cfg and leaf in cfg[section] and cfg[section][leaf] not in choices:
      raise ConfigError(f'{key}={cfg[section][leaf]!r} is not one of {", ".join(choices)}')
  m = cfg.model
  for key in ('vocab_size', 'd_model', 'num_layers', 'num_heads', 'mlp_dim'):
    if m[key] <= 0:
      raise ConfigError(f'model.{key} must be positive, got {m[key]}')
  kv = m.num_kv_heads or m.num_heads
  if m.num_heads % kv:
    raise ConfigError(f'model.num_heads={m.num_heads} must be a multiple of model.num_kv_heads={kv}')
  if not m.head_dim and m.d_model % m.num_heads:
    raise ConfigError(f'model.d_model={m.d_model} is not divisible by model.num_heads={m.num_heads}; '
                      'set model.head_dim')
  if m.loss_vocab_chunk < 0:
    raise ConfigError(f'model.loss_vocab_chunk must be >= 0 (0 = off), got {m.loss_vocab_chunk}')
  _check_encoder(cfg)
  _check_moe(cfg)
  _check_data(cfg)
  if m.remat == 'names':
    from fmjax.model.transformer import REMAT_NAMES  # pylint: disable=import-outside-toplevel
    unknown = [n for n in m.remat_names.split(',') if n.strip() not in REMAT_NAMES]
    if unknown:
      raise ConfigError(f'model.remat_names: unknown {", ".join(unknown)}; choose from {", ".join(REMAT_NAMES)}')
  _check_context(cfg)
  _check_sequence_axis(cfg)
  if cfg.microbatches <= 0 or cfg.global_batch_size % cfg.microbatches:
    raise ConfigError(f'global_batch_size={cfg.global_batch_size} must divide into '
                      f'microbatches={cfg.microbatches}')
  for key in ('steps', 'seq_len', 'global_batch_size', 'log_every'):
    if cfg[key] <= 0:
      raise ConfigError(f'{key} must be positive, got {cfg[key]}')
  for key, low, low_ok, high in _RANGES:
    _check_range(cfg, key, low, low_ok, high)
  _check_schedule(cfg)
  _check_eval_tasks(cfg)
  for key in ('divergence_factor', 'grad_spike_factor'):
    if 0 < cfg.get(key, 0) <= 1:
      raise ConfigError(f'{key} must be 0 (off) or > 1, got {cfg[key]}')
  return cfg


def _check_schedule(cfg: ml_collections.ConfigDict) -> None:
  """WSD's decay: a fraction in (0, 1], a start after warmup and before the schedule's end."""
  o = cfg.get('optim')
  if o is None or o.get('schedule') != 'wsd':
    return
  fraction = o.get('decay_fraction', 0.2)
  if isinstance(fraction, bool) or not isinstance(fraction, (int, float)) or not 0 < fraction <= 1:
    raise ConfigError(f'optim.decay_fraction={fraction!r} must be in (0, 1]: the share of the schedule spent '
                      'decaying')
  end = o.decay_steps or cfg.steps
  start = o.decay_start or end - round(fraction * end)
  if not o.warmup_steps <= start < end:
    where = f'optim.decay_start={o.decay_start}' if o.decay_start else (f'the decay start {start} (from '
                                                                        f'optim.decay_fraction={fraction:g})')
    raise ConfigError(f'{where} must be at or after optim.warmup_steps={o.warmup_steps} and before the end of '
                      f'the schedule, step {end} (optim.decay_steps, or steps when 0)')


def _check_eval_tasks(cfg: ml_collections.ConfigDict) -> None:
  """The downstream benchmarks' options (their names are looked up when the run starts)."""
  if 'eval_tasks' not in cfg:
    return
  if not isinstance(cfg.eval_tasks, str):
    raise ConfigError(f"eval_tasks={cfg.eval_tasks!r} must be a string of comma-separated lm-eval task names "
                      "(e.g. 'fmjax_sanity'; '' = off)")
  for key, low in (('eval_tasks_every', 0), ('eval_tasks_limit', 0), ('eval_tasks_batch_size', 1)):
    value = cfg.get(key, low)
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
      raise ConfigError(f'{key} must be an integer >= {low}, got {value!r}')
  if cfg.eval_tasks.strip() and cfg.model.get('kind', 'decoder') == 'encoder':
    raise ConfigError("eval_tasks scores a causal decoder; this run is an encoder (model.kind=encoder): set "
                      "eval_tasks=''")


def _check_context(cfg: ml_collections.ConfigDict) -> None:
  """seq_len beyond model.max_seq_len: an error for learned positions (no table rows), a warning for RoPE."""
  m = cfg.model
  if cfg.seq_len <= m.max_seq_len:
    return
  if m.positions == 'learned':
    raise ConfigError(f'seq_len={cfg.seq_len} exceeds model.max_seq_len={m.max_seq_len}, the rows of the learned '
                      f'positions table: set seq_len <= {m.max_seq_len} or model.max_seq_len >= {cfg.seq_len}')
  message = (f'warning: seq_len={cfg.seq_len} exceeds model.max_seq_len={m.max_seq_len}: RoPE takes any length, but '
             f'the model is configured for {m.max_seq_len} tokens (set model.max_seq_len={cfg.seq_len} if intended)')
  if message not in _WARNED:   # validate() runs more than once per command: say it once
    _WARNED.add(message)
    logging.getLogger('fmjax.config').warning(message)


def _check_sequence_axis(cfg: ml_collections.ConfigDict) -> None:
  """mesh.sequence splits every row: seq_len must divide by it (by twice it in the zigzag layout), and the
  mesh.dcn sizes must be positive."""
  mesh = cfg.get('mesh')
  if mesh is None:
    return
  for axis, size in (mesh.get('dcn') or {}).items():
    if isinstance(size, bool) or not isinstance(size, int) or size < 1:
      raise ConfigError(f'mesh.dcn.{axis}={size!r} must be a positive integer (1 = within a slice)')
  n = int(mesh.get('sequence', 1))
  if n == 1:
    return
  if n < 1:
    raise ConfigError(f'mesh.sequence={n} must be positive (1 = no context parallelism)')
  zigzag = bool(cfg.model.get('context_load_balance', True)) and cfg.model.get('kind', 'decoder') != 'encoder'
  parts = 2 * n if zigzag else n
  if cfg.seq_len % parts:
    how = (f'2 * mesh.sequence = {parts} (the zigzag layout of model.context_load_balance)' if zigzag
           else f'mesh.sequence={n}')
    raise ConfigError(f'seq_len={cfg.seq_len} is not divisible by {how}: each of the {n} context shards holds an '
                      f'equal part of every row; choose seq_len or mesh.sequence so it divides')


def _check_moe(cfg: ml_collections.ConfigDict) -> None:
  """The mixture-of-experts options against each other, the depth, the layer scan and the expert mesh axis."""
  m = cfg.model
  experts, k = int(m.get('num_experts', 0)), int(m.get('num_experts_per_tok', 2))
  expert_axis = int(cfg.mesh.get('expert', 1)) if 'mesh' in cfg else 1
  if experts < 0:
    raise ConfigError(f'model.num_experts must be >= 0 (0 = dense), got {experts}')
  if not experts:
    if expert_axis != 1:
      raise ConfigError(f'mesh.expert={expert_axis} splits the experts of an MoE model, but model.num_experts=0 '
                        '(dense): set mesh.expert=1 (use mesh.data or mesh.fsdp for more data parallelism)')
    return
  if not 1 <= k <= experts:
    raise ConfigError(f'model.num_experts_per_tok={k} must be between 1 and model.num_experts={experts}')
  if m.moe_every < 1 or m.moe_first_dense < 0:
    raise ConfigError(f'model.moe_every must be >= 1 and model.moe_first_dense >= 0, got {m.moe_every} and '
                      f'{m.moe_first_dense}')
  from fmjax.model.moe import moe_layers  # pylint: disable=import-outside-toplevel
  layers = moe_layers(m)
  if not layers:
    raise ConfigError(f'model.num_experts={experts} but no layer is an MoE layer (model.num_layers={m.num_layers}, '
                      f'moe_every={m.moe_every}, moe_first_dense={m.moe_first_dense})')
  if m.scan_layers and len(layers) != m.num_layers:
    raise ConfigError(f'{len(layers)} of the {m.num_layers} layers are MoE layers (model.moe_every, '
                      'moe_first_dense): a scanned stack needs every layer alike; set model.scan_layers=false')
  if expert_axis > 0 and experts % expert_axis:
    raise ConfigError(f'mesh.expert={expert_axis} does not divide model.num_experts={experts}: choose an expert '
                      'axis size that divides the number of experts')
  if m.moe_capacity_factor < 0 or m.moe_aux_loss < 0 or m.moe_router_z_loss < 0:
    raise ConfigError('model.moe_capacity_factor, moe_aux_loss and moe_router_z_loss must be >= 0')


def _check_data(cfg: ml_collections.ConfigDict) -> None:
  """Data options that can be checked without reading files (the mixture syntax, the fraction)."""
  data = cfg.get('data')
  if data is None:
    return
  if data.get('mixture'):
    from fmjax.data import mixture  # pylint: disable=import-outside-toplevel
    from fmjax.data.errors import DataError  # pylint: disable=import-outside-toplevel
    try:
      mixture.parse(data.mixture)
    except DataError as e:
      raise ConfigError(str(e)) from None
  fraction = data.get('validation_fraction', 0.0)
  if not 0.0 <= fraction < 1.0:
    raise ConfigError(f'data.validation_fraction={fraction} must be in [0, 1)')


def _check_encoder(cfg: ml_collections.ConfigDict) -> None:
  """model.sliding_window, and the options the encoder and its MLM objective cannot combine with."""
  m = cfg.model
  if m.get('position_offset', 0) < 0:
    raise ConfigError(f'model.position_offset must be >= 0, got {m.position_offset}')
  if m.get('type_vocab_size', 0) < 0:
    raise ConfigError(f'model.type_vocab_size must be >= 0 (0 = no token-type embeddings), got {m.type_vocab_size}')
  window = m.get('sliding_window', 0)
  if isinstance(window, bool) or not isinstance(window, int) or window < 0:
    raise ConfigError(f'model.sliding_window must be an integer >= 0 (0 = no window), got {window!r}')
  pattern = m.get('window_pattern', '')
  if not isinstance(pattern, str) or set(pattern) - set('LG'):
    raise ConfigError(f"model.window_pattern must be letters L (local) and G (global), e.g. 'LG'; got {pattern!r}")
  if pattern and not window:
    raise ConfigError(f"model.window_pattern={pattern!r} marks local layers but model.sliding_window=0: set the "
                      "window (e.g. model.sliding_window=4096) or window_pattern=''")
  for key in ('query_scale_dim', 'attn_logit_softcap', 'final_logit_softcap', 'rope_local_theta'):
    value = m.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
      raise ConfigError(f'model.{key} must be a number >= 0 (0 = off), got {value!r}')
  if m.get('rope_local_theta', 0.0) and not window:
    raise ConfigError('model.rope_local_theta is the RoPE base of local layers and model.sliding_window=0 makes '
                      'none: set model.sliding_window or model.rope_local_theta=0')
  if m.get('kind', 'decoder') != 'encoder':
    return
  if window:
    raise ConfigError(f'model.sliding_window={window} is for causal decoders (a query sees the W - 1 keys before '
                      'it); the encoder attends both ways: set model.sliding_window=0')
  if m.loss_vocab_chunk:
    raise ConfigError('model.loss_vocab_chunk > 0 is for decoders: the encoder\'s MLM head has a bias; '
                      'set model.loss_vocab_chunk=0')
  mlm = cfg.get('mlm')
  if mlm is not None and mlm.mask_token_rate + mlm.random_token_rate > 1:
    raise ConfigError(f'mlm.mask_token_rate + mlm.random_token_rate must be <= 1, got '
                      f'{mlm.mask_token_rate} + {mlm.random_token_rate}')


# Numbers that must be finite and in range: (key, lowest, lowest allowed, highest (excluded) or None).
_RANGES = (
    ('optim.learning_rate', 0, False, None), ('optim.end_learning_rate', 0, True, None),
    ('optim.warmup_steps', 0, True, None), ('optim.decay_steps', 0, True, None),
    ('optim.b1', 0, True, 1), ('optim.b2', 0, True, 1), ('optim.eps', 0, False, None),
    ('optim.weight_decay', 0, True, None), ('optim.grad_clip', 0, True, None), ('z_loss', 0, True, None),
    ('optim.decay_start', 0, True, None), ('optim.muon_momentum', 0, True, 1), ('optim.muon_ns_steps', 1, True, None),
    ('optim.muon_rms', 0, True, None), ('optim.adafactor_min_dim', 1, True, None),
    ('optim.adafactor_decay', 0, False, None),
    ('model.dropout', 0, True, 1), ('model.init_std', 0, False, None), ('model.norm_eps', 0, False, None),
    ('model.rope_theta', 0, False, None), ('eval_every', 0, True, None), ('checkpoint_every', 0, True, None),
    ('keep_checkpoints', 1, True, None), ('cpu_peak_flops', 0, True, None), ('skip_nonfinite_steps', 0, True, None),
    ('divergence_factor', 0, True, None), ('grad_spike_factor', 0, True, None),
    ('finetune.head_learning_rate', 0, True, None), ('finetune.lora_alpha', 0, False, None),
    ('mlm.mask_rate', 0, False, 1), ('mlm.mask_token_rate', 0, True, None), ('mlm.random_token_rate', 0, True, None),
)


def _check_range(cfg: ml_collections.ConfigDict, key: str, low: float, low_ok: bool, high: float | None) -> None:
  """One line unless cfg[key] is a finite number >= / > low (and < high)."""
  value = cfg
  for part in key.split('.'):
    if not isinstance(value, ml_collections.ConfigDict) or part not in value:
      return
    value = value[part]
  ok = (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and (value >= low if low_ok else value > low) and (high is None or value < high))
  if not ok:
    wanted = (f'in [{low:g}, {high:g})' if high is not None else f'>= {low:g}' if low_ok else f'> {low:g}')
    raise ConfigError(f'{key} must be a finite number {wanted}, got {value!r}')

"""Run configuration: the one schema of every option, loading, overrides, validation, saving.

Every option is declared exactly once, in `base_config()` (and the section helpers below). Config
files in `configs/` start from it and change values; `--config.a.b=c` flags change them again.
An unknown key or a value of the wrong type is a one-line error.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import traceback
from typing import Any, Sequence

import ml_collections

from fmjax.errors import UserError


class ConfigError(UserError):
  """A configuration problem, reported to the user as one line."""


def model_defaults() -> ml_collections.ConfigDict:
  """Transformer options (a LLaMA-style decoder by default; model.kind='encoder' for BERT-style)."""
  return ml_collections.ConfigDict(dict(
      kind='decoder',          # decoder (causal LM) | encoder (bidirectional, MLM head; see the mlm section)
      vocab_size=259,          # byte tokenizer: 256 bytes + pad/bos/eos
      d_model=128,
      num_layers=4,
      num_heads=4,
      num_kv_heads=0,          # 0 = same as num_heads (MHA); fewer = GQA; 1 = MQA
      head_dim=0,              # 0 = d_model // num_heads
      mlp_dim=512,
      max_seq_len=128,         # learned positions table size; RoPE needs none
      position_offset=0,       # learned positions: token i reads table row i + this (RoBERTa: 2); the
                               # table has max_seq_len + position_offset rows
      activation='swiglu',     # swiglu | gelu (tanh approximation) | gelu_exact (erf: BERT)
      norm='rmsnorm',          # rmsnorm | layernorm
      norm_position='pre',     # pre (norm before attention/MLP) | post (BERT: after each residual add,
                               # a norm on the embeddings, no final norm)
      type_vocab_size=0,       # > 0: token-type (segment) embeddings, all type 0 unless given (BERT: 2)
      norm_eps=1e-5,
      positions='rope',        # rope | learned
      rope_theta=10000.0,
      rope_scaling='none',     # none | linear | llama3 (Llama 3.1+ frequency scaling; fmjax/model/layers.py)
      rope_factor=1.0,         # linear / llama3: context extension factor
      rope_low_freq_factor=1.0,   # llama3: wavelengths above original_max_len / this are divided by the factor
      rope_high_freq_factor=4.0,  # llama3: wavelengths below original_max_len / this are kept
      rope_original_max_len=8192,  # llama3: the context the model was pretrained with
      use_bias=False,          # biases on projections (GPT-2 style)
      tie_embeddings=False,
      dropout=0.0,
      param_dtype='float32',
      dtype='float32',         # compute dtype: float32 | bfloat16
      scan_layers=True,        # one compiled block for any depth
      remat='none',            # none | full | dots | names (save only `remat_names`)
      remat_names='qkv,attn_out',  # with remat='names': comma list of qkv, attn_out, mlp_hidden, block_mid
      attention='auto',        # auto | xla | dense | cudnn | pallas_gpu | splash | chunked (fmjax/model/attention.py)
      attention_chunk=128,     # query/key block for the chunked attention
      loss_vocab_chunk=0,      # > 0: fused output projection + cross-entropy over vocab chunks this size
      init_std=0.02,
  ))


def data_defaults() -> ml_collections.ConfigDict:
  """Input pipeline options: source, tokenizer, packing, loader."""
  return ml_collections.ConfigDict(dict(
      source='stdlib',         # stdlib | text | jsonl | parquet | tfds (files may be .gz / .zst compressed)
      files='',                # glob for text / jsonl / parquet sources; one text file is cut into paragraphs
      eval_files='',           # glob of validation files (then every document of `files` trains)
      mixture='',              # weighted sources, replacing source/files/tfds_name, e.g.
                               # 'web:0.7:/data/web/*.jsonl.zst,code:0.3:parquet:/data/code/*,c4:0.1:tfds:c4/en:3.1.0'
      split_by='file',         # text source: file | paragraph (one document per ...)
      jsonl_field='text',      # jsonl / parquet source: the field / column holding the text
      tfds_name='',            # tfds source: dataset name, e.g. 'c4/en:3.1.0'
      tfds_data_dir='',        # tfds source: data_dir ('' = TFDS default)
      text_feature='text',     # tfds source: the feature holding the text
      train_split='train',
      eval_split='validation',
      validation_fraction=0.02,  # local sources: share of documents held out by stable hash
      tokenizer='byte',        # byte | path to a SentencePiece .model or a char tokenizer .json file
      packing=True,            # pack documents into rows (segment ids); else pad each
      add_bos=True,
      add_eos=True,
      worker_count=0,          # Grain worker processes tokenizing each stream (0 = in the train process);
                               # 1-2 feed a GPU host with SentencePiece, bytes need none
      num_streams=0,           # independent document streams (0 = one per process); fix it to make
                               # the batch order independent of the process count
      cache_dir='',            # where built TFDS datasets live ('' = ~/.cache/fmjax/tfds)
      skip_binary=False,       # text/jsonl: leave out binary files (NUL bytes / not UTF-8) with a warning
                               # instead of refusing them
  ))


def mesh_defaults() -> ml_collections.ConfigDict:
  """Device mesh shape; -1 means 'all remaining devices'."""
  return ml_collections.ConfigDict(dict(data=1, fsdp=-1, tensor=1))


def logical_axis_rules_default() -> tuple:
  """Logical axis name -> mesh axes. Model code names only logical axes."""
  return (
      ('batch', ('data', 'fsdp')),
      ('activation_length', None),
      ('activation_embed', None),
      ('activation_mlp', 'tensor'),
      ('activation_heads', 'tensor'),
      ('activation_kv', None),
      ('activation_vocab', 'tensor'),
      ('embed', 'fsdp'),
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('kv', None),
      ('vocab', 'tensor'),
      ('layers', None),
      ('norm', None),
  )


def optim_defaults() -> ml_collections.ConfigDict:
  """AdamW with linear warmup and cosine decay."""
  return ml_collections.ConfigDict(dict(
      learning_rate=1e-3,
      end_learning_rate=1e-4,
      warmup_steps=100,
      decay_steps=0,           # 0 = train.steps
      b1=0.9,
      b2=0.95,
      eps=1e-8,
      weight_decay=0.1,
      grad_clip=1.0,           # global-norm clip; 0 = off
  ))


def finetune_defaults() -> ml_collections.ConfigDict:
  """Fine-tuning options (`python -m fmjax.finetune`); pretraining ignores them."""
  return ml_collections.ConfigDict(dict(
      task='classify',         # classify | lm (continued pretraining on cfg.data) | prompt (loss on responses)
      init_from='',            # pretrained workdir or checkpoint dir ('' = random initialisation)
      source='csv',            # classify/prompt data: csv | jsonl | tfds | stdlib_packages (embedded demo)
      train_files='',          # csv/jsonl: glob of the train files
      eval_files='',           # csv/jsonl: glob of the eval files
      tfds_name='',            # tfds: dataset name
      tfds_data_dir='',        # tfds: data_dir ('' = TFDS default)
      train_split='train',     # tfds: split names
      eval_split='test',
      text_feature='text',     # column/feature holding the text
      label_feature='label',   # classify: column/feature holding the label
      prompt_feature='prompt',   # prompt task: the prompt column
      response_feature='response',  # prompt task: the response column (the only tokens with loss)
      labels=(),               # classify: label names in class order; () = sorted labels of the train set
      max_train_examples=0,    # 0 = all
      max_eval_examples=0,     # 0 = all
      # The recipe below was chosen on the validation split of the embedded demo (`--demo`: 1,080 train /
      # 120 validation / 300 eval snippets of 4 stdlib packages; configs/default.py pretrained 2,000 steps;
      # seq_len 256, lr 1e-3, head lr 3e-3). Figures are validation macro-F1 of one run each, so differences
      # under ~0.04 are noise. From random initialisation the same recipe gives 0.588.
      validation_fraction=0.1,  # classify/prompt: share of the train split held out (per label, by a stable hash
                               # of the text) to choose the best checkpoint; the eval split is then only reported.
                               # 0 = no validation: the eval split chooses (a warning says its best is optimistic)
      validation_files='',     # csv/jsonl: glob of validation files; when set they are the validation split
      baseline=True,           # classify: fit a bag-of-character-n-grams linear model (scikit-learn) on the same
                               # train split and report it beside the model (summary.json, TensorBoard baseline/*)
      epochs=5.0,              # classify/prompt: > 0 sets `steps` from the train split's size and the global batch
                               # (0 = use steps); lm (continued pretraining) always uses steps. Measured: 5 epochs
                               # 0.830, 10 epochs 0.826 (twice the cost); 3.5 epochs at seq_len 128 0.684 vs 10: 0.759
      warmup_ratio=0.1,        # > 0: share of the fine-tuning steps used for warmup (overrides optim.warmup_steps);
                               # BERT's 10 %, not varied in the measurements
      pooling='mean',          # classify: mean (over real tokens) | last (last real token) | cls (first token; encoders).
                               # Measured: mean 0.830, last 0.698
      classifier_dropout=0.0,  # classify: dropout on the pooled vector, training only. Measured: 0.1 gives 0.831
                               # against 0.830 (no gain), so off
      layer_decay=1.0,         # layer-wise learning-rate decay d (1 = off): block i of L (0 = first) learns at
                               # lr * d^(L - i), the embeddings at lr * d^(L + 1), the head and final norm at lr.
                               # Measured: 0.8 gives 0.792 against 0.830 (a small model needs its lower blocks to move)
      head_learning_rate=0.0,  # classify: peak learning rate of the head; 0 = optim.learning_rate
      freeze_embeddings=False,  # freeze the token (and position) embeddings
      freeze_layers=0,         # freeze the first N blocks
      lora_rank=0,             # > 0: train LoRA adapters only (plus the head)
      lora_alpha=16.0,         # LoRA scale is alpha / rank
      lora_targets=('q', 'k', 'v', 'o', 'wi_0', 'wi_1', 'wi', 'wo'),  # projections that get adapters
      best_metric='macro_f1',  # metric that picks the best checkpoint (classify: accuracy, macro_f1, ...; lm: loss)
      best_mode='max',         # max | min
      demo_packages=('asyncio', 'email', 'tkinter', 'multiprocessing'),  # stdlib_packages: the classes
      demo_per_class=300,      # stdlib_packages: train snippets per class (eval: a quarter of it)
  ))


def mlm_defaults() -> ml_collections.ConfigDict:
  """Masked-language-model objective of model.kind='encoder' (fmjax/objectives/mlm.py); decoders ignore it."""
  return ml_collections.ConfigDict(dict(
      mask_rate=0.15,          # share of real tokens chosen for prediction
      mask_token_rate=0.8,     # of the chosen: replaced by the tokenizer's mask token
      random_token_rate=0.1,   # of the chosen: replaced by a random token (the rest stay as they are)
      whole_word=False,        # choose whole words (all tokens of a word together) where the tokenizer tells words
  ))


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults. Config files start here."""
  c = ml_collections.ConfigDict()
  c.model = model_defaults()
  c.data = data_defaults()
  c.mesh = mesh_defaults()
  c.logical_axis_rules = logical_axis_rules_default()
  c.optim = optim_defaults()
  c.seed = 0
  c.seq_len = 128
  c.global_batch_size = 16
  c.microbatches = 1           # gradient accumulation: the batch is split into this many
  c.steps = 1000
  c.z_loss = 0.0
  c.log_every = 10
  c.eval_every = 0             # 0 = never
  c.eval_batches = 4
  c.checkpoint_every = 200     # 0 = only at the end
  c.keep_checkpoints = 3
  c.async_checkpoints = True
  c.skip_nonfinite_steps = 0   # > 0: skip up to N steps whose loss or gradients are nan/inf (parameters
                               # unchanged, counted as skipped_steps) and stop at the next; 0 = stop at the first
  c.divergence_factor = 3.0    # warn once when the smoothed loss exceeds this x its minimum after warmup (0 = off)
  c.grad_spike_factor = 10.0   # warn once when the gradient norm exceeds this x its moving average (0 = off)
  c.allow_config_change = False  # resume although run-defining options (model, steps, schedule, seed, data,
                                 # global_batch_size, seq_len) differ from the workdir's config.json
  c.force_unlock = False       # take over the workdir lock even when its holder cannot be checked (another host)
  c.progress_bar = True
  c.cpu_peak_flops = 0.0       # 0 = measure with a matmul micro-benchmark
  c.gpu_xla_flags = True       # on GPUs add fmjax's XLA performance flags (fmjax/runtime/gpu_flags.py); yours win
  c.gpu_extra_xla_flags = ''   # more XLA flags for GPU runs (space-separated), applied after fmjax's
  c.gpu_memory_fraction = 0.9  # XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs unless set in the env (0 = JAX's)
  c.workdir = ''
  c.topology = ''             # the slice the config is sized for (e.g. v5p-8): what fmjax.plan checks by default
  c.finetune = finetune_defaults()
  c.mlm = mlm_defaults()
  return c


def load_config_file(path: str) -> ml_collections.ConfigDict:
  """Import a `get_config()` Python file and return its ConfigDict."""
  if not os.path.isfile(path):
    raise ConfigError(f'config file not found: {path}')
  spec = importlib.util.spec_from_file_location('fmjax_user_config', path)
  module = importlib.util.module_from_spec(spec)
  try:
    spec.loader.exec_module(module)
  except Exception as e:  # noqa: BLE001 - any error in the user's file becomes one line naming it
    raise ConfigError(_file_error(path, e)) from e
  if not hasattr(module, 'get_config'):
    raise ConfigError(f'{path} defines no get_config() function')
  try:
    cfg = module.get_config()
  except Exception as e:  # noqa: BLE001
    raise ConfigError(_file_error(path, e)) from e
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f'{path}: get_config() returned {type(cfg).__name__}, not an ml_collections.ConfigDict '
                      '(start from fmjax.config.base_config())')
  return cfg


def _file_error(path: str, error: Exception) -> str:
  """'error in config file FILE line N: SyntaxError: ...' for an exception raised while loading FILE."""
  line = None
  if isinstance(error, SyntaxError) and error.filename and os.path.abspath(error.filename) == os.path.abspath(path):
    line, text = error.lineno, error.msg
  else:
    text = str(error).strip().splitlines()[0] if str(error).strip() else ''
    for frame in traceback.extract_tb(error.__traceback__):
      if os.path.abspath(frame.filename) == os.path.abspath(path):
        line = frame.lineno
  where = f'{path} line {line}' if line else path
  return f'error in config file {where}: {type(error).__name__}{": " + text if text else ""}'


def _parse_value(text: str, current: Any, key: str) -> Any:
  """Parse an override string into the type of the current value."""
  if isinstance(current, bool):
    low = text.lower()
    if low in ('true', '1', 'yes'):
      return True
    if low in ('false', '0', 'no'):
      return False
    raise ConfigError(f'--config.{key}: expected true/false, got {text!r}')
  if isinstance(current, int):
    try:
      return int(text)
    except ValueError:
      raise ConfigError(f'--config.{key}: expected an integer, got {text!r}') from None
  if isinstance(current, float):
    try:
      return float(text)
    except ValueError:
      raise ConfigError(f'--config.{key}: expected a number, got {text!r}') from None
  if isinstance(current, str):
    return text
  if isinstance(current, (tuple, list)):
    try:
      value = json.loads(text)
    except json.JSONDecodeError:
      raise ConfigError(f'--config.{key}: expected a JSON list, got {text!r}') from None
    return type(current)(_to_tuples(value) if isinstance(current, tuple) else value)
  raise ConfigError(f'--config.{key}: cannot override a value of type {type(current).__name__}')


def _to_tuples(value):
  if isinstance(value, list):
    return tuple(_to_tuples(v) for v in value)
  return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> ml_collections.ConfigDict:
  """Apply `a.b=c` strings (with or without a leading `--config.`) to cfg, checking keys and types."""
  for item in overrides:
    text = item[len('--config.'):] if item.startswith('--config.') else item
    if '=' not in text:
      raise ConfigError(f'override {item!r} must look like --config.key=value')
    key, raw = text.split('=', 1)
    parent, leaf = cfg, key
    parts = key.split('.')
    for part in parts[:-1]:
      if part not in parent or not isinstance(parent[part], ml_collections.ConfigDict):
        raise ConfigError(f'unknown config key {key!r} (no section {part!r})')
      parent = parent[part]
    leaf = parts[-1]
    if leaf not in parent:
      raise ConfigError(f'unknown config key {key!r}; known keys here: {", ".join(sorted(parent.keys()))}')
    if isinstance(parent[leaf], ml_collections.ConfigDict):
      raise ConfigError(f'config key {key!r} is a section; set one of its fields instead')
    value = _parse_value(raw, parent[leaf], key)
    with parent.unlocked():
      parent[leaf] = value
  return cfg


def check_schema(cfg: ml_collections.ConfigDict, schema: ml_collections.ConfigDict, prefix: str = '') -> None:
  """Every key of cfg must exist in schema with a compatible type (config files can't invent keys)."""
  for key in cfg.keys():
    name = f'{prefix}{key}'
    if key not in schema:
      raise ConfigError(f'unknown config key {name!r}')
    value, ref = cfg[key], schema[key]
    if isinstance(ref, ml_collections.ConfigDict):
      if not isinstance(value, ml_collections.ConfigDict):
        raise ConfigError(f'config key {name!r} must be a section')
      check_schema(value, ref, name + '.')
    elif isinstance(ref, bool) != isinstance(value, bool) or (
        isinstance(ref, (int, float)) and not isinstance(value, (int, float))) or (
        isinstance(ref, str) and not isinstance(value, str)):
      raise ConfigError(f'config key {name!r} must be of type {type(ref).__name__}, got {value!r}')


_CHOICES = {
    'model.kind': ('decoder', 'encoder'),
    'model.activation': ('swiglu', 'gelu', 'gelu_exact'),
    'model.norm_position': ('pre', 'post'),
    'model.norm': ('rmsnorm', 'layernorm'),
    'model.positions': ('rope', 'learned'),
    'model.rope_scaling': ('none', 'linear', 'llama3'),
    'model.remat': ('none', 'full', 'dots', 'names'),
    'model.attention': ('auto', 'xla', 'dense', 'cudnn', 'pallas_gpu', 'splash', 'chunked'),
    'model.param_dtype': ('float32', 'bfloat16'),
    'model.dtype': ('float32', 'bfloat16'),
    'data.source': ('stdlib', 'text', 'jsonl', 'parquet', 'tfds'),
    'data.split_by': ('file', 'paragraph'),
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
  _check_data(cfg)
  if m.remat == 'names':
    from fmjax.model.transformer import REMAT_NAMES  # pylint: disable=import-outside-toplevel
    unknown = [n for n in m.remat_names.split(',') if n.strip() not in REMAT_NAMES]
    if unknown:
      raise ConfigError(f'model.remat_names: unknown {", ".join(unknown)}; choose from {", ".join(REMAT_NAMES)}')
  if m.positions == 'learned' and cfg.seq_len > m.max_seq_len:
    raise ConfigError(f'seq_len={cfg.seq_len} exceeds model.max_seq_len={m.max_seq_len} (learned positions)')
  if cfg.microbatches <= 0 or cfg.global_batch_size % cfg.microbatches:
    raise ConfigError(f'global_batch_size={cfg.global_batch_size} must divide into '
                      f'microbatches={cfg.microbatches}')
  for key in ('steps', 'seq_len', 'global_batch_size', 'log_every'):
    if cfg[key] <= 0:
      raise ConfigError(f'{key} must be positive, got {cfg[key]}')
  for key, low, low_ok, high in _RANGES:
    _check_range(cfg, key, low, low_ok, high)
  for key in ('divergence_factor', 'grad_spike_factor'):
    if 0 < cfg.get(key, 0) <= 1:
      raise ConfigError(f'{key} must be 0 (off) or > 1, got {cfg[key]}')
  return cfg


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
  """Options the encoder and its MLM objective cannot combine with."""
  m = cfg.model
  if m.get('position_offset', 0) < 0:
    raise ConfigError(f'model.position_offset must be >= 0, got {m.position_offset}')
  if m.get('type_vocab_size', 0) < 0:
    raise ConfigError(f'model.type_vocab_size must be >= 0 (0 = no token-type embeddings), got {m.type_vocab_size}')
  if m.get('kind', 'decoder') != 'encoder':
    return
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


def resolve(path: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
  """Load a config file, check it against the schema, apply overrides and validate."""
  cfg = load_config_file(path)
  check_schema(cfg, base_config())
  cfg = apply_overrides(cfg, overrides)
  return validate(cfg)


def to_json(cfg: ml_collections.ConfigDict) -> str:
  """The resolved config as JSON (what each run saves in its workdir)."""
  return json.dumps(cfg.to_dict(), indent=2, sort_keys=True, default=list)


def save(cfg: ml_collections.ConfigDict, path: str) -> None:
  """Write the resolved config as JSON (atomically; `path` may be a URL)."""
  from fmjax.runtime import paths  # pylint: disable=import-outside-toplevel
  paths.write_text(path, to_json(cfg))

"""The schema: every option, declared once with its default and its role (fmjax/config/roles.py).

`base_config()` turns the declarations into the ConfigDict that config files start from; `ROLES`
maps each dotted key to its role, so checkpoint and resume checks follow a new field on their own.
"""

from __future__ import annotations

import ml_collections

from fmjax.config.roles import FUNCTION, LOCAL, RESTORE, RESUME, RUN, SHAPE, collect, field, values

MODEL = dict(   # a LLaMA-style decoder by default; kind='encoder' for BERT-style
    kind=field('decoder', SHAPE, 'decoder (causal LM) | encoder (bidirectional, MLM head; see the mlm section)'),
    vocab_size=field(259, SHAPE, 'byte tokenizer: 256 bytes + pad/bos/eos'),
    d_model=field(128, SHAPE),
    num_layers=field(4, SHAPE),
    num_heads=field(4, SHAPE),
    num_kv_heads=field(0, SHAPE, '0 = same as num_heads (MHA); fewer = GQA; 1 = MQA'),
    head_dim=field(0, SHAPE, '0 = d_model // num_heads'),
    mlp_dim=field(512, SHAPE),
    max_seq_len=field(128, SHAPE, 'learned positions: the table size; RoPE: the context the model is made for'),
    position_offset=field(0, SHAPE, 'learned positions: token i reads table row i + this (RoBERTa: 2); the table '
                                    'has max_seq_len + position_offset rows'),
    activation=field('swiglu', SHAPE, 'swiglu | geglu (tanh-GELU gate: Gemma) | gelu (tanh approximation) | '
                                      'gelu_exact (erf: BERT)'),
    norm=field('rmsnorm', SHAPE, 'rmsnorm | layernorm'),
    norm_position=field('pre', SHAPE, 'pre (norm before attention/MLP) | post (BERT: after each residual add, a '
                                      'norm on the embeddings, no final norm) | sandwich (Gemma 2/3: pre and post '
                                      'norms around attention and MLP) | after (OLMo 2: a norm on the attention '
                                      'and MLP outputs before each residual add, none before; a final norm)'),
    norm_unit_offset=field(False, FUNCTION, 'RMSNorm scales by (1 + w), w starting at 0 (Gemma)'),
    embed_scale=field(False, FUNCTION, 'multiply the token embeddings by sqrt(d_model) (Gemma)'),
    type_vocab_size=field(0, SHAPE, '> 0: token-type (segment) embeddings, all type 0 unless given (BERT: 2)'),
    norm_eps=field(1e-5, FUNCTION),
    positions=field('rope', SHAPE, 'rope | learned'),
    rope_theta=field(10000.0, FUNCTION),
    rope_scaling=field('none', FUNCTION, 'none | linear | llama3 (Llama 3.1+ frequency scaling; '
                                         'fmjax/model/layers.py)'),
    rope_factor=field(1.0, FUNCTION, 'linear / llama3: context extension factor'),
    rope_low_freq_factor=field(1.0, FUNCTION, 'llama3: wavelengths above original_max_len / this are divided by '
                                              'the factor'),
    rope_high_freq_factor=field(4.0, FUNCTION, 'llama3: wavelengths below original_max_len / this are kept'),
    rope_original_max_len=field(8192, FUNCTION, 'llama3: the context the model was pretrained with'),
    use_bias=field(False, SHAPE, 'biases on projections (GPT-2 style)'),
    attention_bias=field(False, SHAPE, 'biases on the q, k and v projections only (Qwen2); use_bias puts them on '
                                       'every projection'),
    qk_norm=field(False, SHAPE, 'RMSNorm over head_dim of q and of k, per head, before RoPE (Qwen3): learned '
                                'attn/q_norm, attn/k_norm scales, eps model.norm_eps'),
    qk_norm_scope=field('head', SHAPE, "with qk_norm: 'head' (each head over head_dim: Qwen3, Gemma 3) | 'all' "
                                       '(OLMo 2: q over all heads, scale num_heads * head_dim; k likewise)'),
    sliding_window=field(0, FUNCTION, 'causal local layers attend the query and the W - 1 keys before it; '
                                      '0 = the whole context'),
    window_pattern=field('', FUNCTION, "which layers are local: '' = all (Mistral), else L (local) / G (global) "
                                       "letters repeated over the depth (Gemma 2: LG, Gemma 3: LLLLLG)"),
    rope_local_theta=field(0.0, FUNCTION, 'RoPE base of the local layers (Gemma 3); 0 = rope_theta'),
    query_scale_dim=field(0, FUNCTION, 'attention scores scale by this ** -0.5 (Gemma: query_pre_attn_scalar); '
                                       '0 = head_dim'),
    attn_logit_softcap=field(0.0, FUNCTION, 'attention scores cap * tanh(s / cap) (Gemma 2: 50); 0 = none'),
    final_logit_softcap=field(0.0, FUNCTION, 'output logits cap * tanh(z / cap) (Gemma 2: 30); 0 = none'),
    tie_embeddings=field(False, SHAPE),
    num_experts=field(0, SHAPE, '> 0: mixture-of-experts MLPs with this many experts (fmjax/model/moe.py); 0 = dense'),
    num_experts_per_tok=field(2, FUNCTION, 'MoE: experts each token is routed to (top-k)'),
    moe_mlp_dim=field(0, SHAPE, "MoE: each expert's hidden width; 0 = mlp_dim"),
    moe_every=field(1, SHAPE, 'MoE: every N-th layer is an MoE layer (layer i when (i + 1) % N == 0), the others '
                              'dense'),
    moe_first_dense=field(0, SHAPE, 'MoE: the first K layers are dense (DeepSeek-style)'),
    moe_shared_mlp_dim=field(0, SHAPE, 'MoE: > 0 adds a shared SwiGLU expert of this width every token goes through'),
    moe_renormalize=field(True, FUNCTION, 'MoE: renormalise the top-k router probabilities to sum 1 (Mixtral; '
                                          'Qwen3-MoE norm_topk_prob); false keeps them (OLMoE)'),
    moe_capacity_factor=field(0.0, RESTORE, 'MoE: 0 = dropless (grouped matmuls); > 0 = each expert takes at most '
                                            'factor * T * k / E tokens of a row, the rest are dropped (counted)'),
    moe_kernel=field('auto', RESUME, 'MoE dropless grouped matmul: auto (megablox on TPU, blocked on CPU, else '
                                     'ragged_dot) | ragged_dot | megablox | blocked'),
    moe_aux_loss=field(0.01, RESTORE, 'MoE: weight of the load-balancing loss (Switch / Mixtral form)'),
    moe_router_z_loss=field(0.001, RESTORE, 'MoE: weight of the router z-loss (ST-MoE)'),
    dropout=field(0.0, RESTORE),
    param_dtype=field('float32', RESTORE),
    dtype=field('float32', RESUME, 'compute dtype: float32 | bfloat16'),
    scan_layers=field(True, RESUME, 'one compiled block for any depth (a checkpoint keeps its layout)'),
    remat=field('none', RESUME, 'none | full | dots | names (save only `remat_names`)'),
    remat_names=field('qkv,attn_out', RESUME, "with remat='names': comma list of qkv, attn_out, mlp_hidden, "
                                              'block_mid'),
    attention=field('auto', RESUME, 'auto | xla | dense | cudnn | pallas_gpu | splash | chunked '
                                    '(fmjax/model/attention.py)'),
    attention_chunk=field(128, RESUME, 'query/key block for the chunked attention'),
    context_attention=field('ring', RESUME, 'with mesh.sequence > 1: ring (KV blocks passed around the context '
                                            'axis with ppermute; fp32 online softmax) | all_gather (every shard '
                                            'gathers K and V; splash per shard on TPU)'),
    context_load_balance=field(True, RESUME, 'with mesh.sequence > 1 and causal attention: lay the sequence out '
                                             'zigzag (shard s holds chunks s and 2n-1-s) so every shard does the '
                                             'same attention work'),
    loss_vocab_chunk=field(0, RESUME, '> 0: fused output projection + cross-entropy over vocab chunks this size'),
    init_std=field(0.02, RESTORE),
    quantization=field('none', RESTORE, 'none | int8 | fp8: quantized matmuls in the attention and MLP '
                                        'projections (qwix; fp32 master weights; fmjax/model/quantization.py)'),
)


def split_fields(eval_split: str, validation_fraction: float) -> dict:
  """The options naming the train / eval / validation splits, shared by `data` and `finetune`."""
  return dict(
      eval_files=field('', RESUME, 'glob of the eval files (data: its documents validate, then every document '
                                   'of files trains)'),
      tfds_name=field('', RUN, "tfds source: dataset name, e.g. 'c4/en:3.1.0'"),
      tfds_data_dir=field('', RESUME, "tfds source: data_dir ('' = TFDS default)"),
      train_split=field('train', RUN, 'tfds source: the train split'),
      eval_split=field(eval_split, RESUME, 'tfds source: the eval split'),
      text_feature=field('text', RUN, 'the feature (tfds) or column (finetune csv/jsonl) holding the text'),
      validation_fraction=field(validation_fraction, RUN, 'local sources: share of the train documents held out '
                                                          'as the validation split, by a stable hash of the text'),
  )


DATA = dict(   # input pipeline: source, tokenizer, packing, loader
    source=field('stdlib', RUN, 'stdlib | text | jsonl | parquet | tfds (files may be .gz / .zst compressed)'),
    files=field('', RUN, 'glob for text / jsonl / parquet sources; one text file is cut into paragraphs'),
    mixture=field('', RESUME, "weighted sources, replacing source/files/tfds_name, e.g. 'web:0.7:/data/web/*."
                              "jsonl.zst,code:0.3:parquet:/data/code/*,c4:0.1:tfds:c4/en:3.1.0' (weights may "
                              'change on resume)'),
    split_by=field('file', RUN, 'text source: file | paragraph (one document per ...)'),
    jsonl_field=field('text', RUN, 'jsonl / parquet source: the field / column holding the text'),
    **split_fields(eval_split='validation', validation_fraction=0.02),
    tokenizer=field('byte', RUN, 'byte | path to a SentencePiece .model or a char tokenizer .json file'),
    packing=field(True, RUN, 'pack documents into rows (segment ids); else pad each'),
    add_bos=field(True, RUN),
    add_eos=field(True, RUN),
    worker_count=field(0, RESUME, 'Grain worker processes tokenizing each stream (0 = in the train process); '
                                  '1-2 feed a GPU host with SentencePiece, bytes need none'),
    num_streams=field(0, RUN, 'independent document streams (0 = one per process); fix it to make the batch '
                              'order independent of the process count'),
    cache_dir=field('', RESUME, "where built TFDS datasets live ('' = ~/.cache/fmjax/tfds)"),
    skip_binary=field(False, RESUME, 'text/jsonl: leave out binary files (NUL bytes / not UTF-8) with a warning '
                                     'instead of refusing them'),
)

MESH = dict(   # device mesh shape, in device order (the last axis varies fastest); -1 means 'all remaining devices'
    data=field(1, RESUME), fsdp=field(-1, RESUME), expert=field(1, RESUME, 'expert parallelism: MoE experts are '
                                                                           'split over it (it also shards the batch)'),
    sequence=field(1, RESUME, 'context parallelism: activations split along the sequence; attention by '
                              'model.context_attention (ring | all_gather)'),
    tensor=field(1, RESUME),
    dcn=dict(   # sizes ACROSS slices (TPU multislice) or nodes (GPU/CPU processes); the axes above are per slice
        data=field(1, RESUME, 'data parallelism across slices: only gradient reductions cross the DCN'),
        fsdp=field(1, RESUME, 'FSDP across slices: parameter gathers cross the DCN too')))


def logical_axis_rules_default() -> tuple:
  """Logical axis name -> mesh axes. Model code names only logical axes."""
  return (
      ('batch', ('data', 'fsdp', 'expert')),
      ('activation_length', 'sequence'),
      ('activation_embed', None),
      ('activation_mlp', 'tensor'),
      ('activation_heads', 'tensor'),
      ('activation_kv', None),
      ('activation_vocab', 'tensor'),
      ('embed', ('fsdp', 'sequence')),   # the context axis shards parameters as FSDP does
      ('mlp', 'tensor'),
      ('heads', 'tensor'),
      ('kv_heads', 'tensor'),
      ('kv', None),
      ('vocab', 'tensor'),
      ('exp', 'expert'),
      ('layers', None),
      ('norm', None),
  )


OPTIM = dict(   # the optimizer and its learning-rate schedule (fmjax/training/optim.py, schedules.py)
    name=field('adamw', RUN, 'adamw | muon (hidden matrices; AdamW on the rest) | adafactor (factored second '
                             'moment) | lion'),
    schedule=field('cosine', RUN, 'cosine | linear | constant | inverse_sqrt | wsd (warmup, stable, decay); a '
                                  'resume may turn constant or wsd into wsd with a decay_start at or after its '
                                  'checkpoint (a cooldown)'),
    learning_rate=field(1e-3, RUN, 'the peak'),
    end_learning_rate=field(1e-4, RUN, 'where cosine, linear and wsd decay to'),
    warmup_steps=field(100, RUN, 'linear warmup from 0 to the peak'),
    decay_steps=field(0, RUN, "the schedule's end; 0 = steps"),
    decay_start=field(0, RUN, 'wsd: the first step of the decay; 0 = the end minus decay_fraction of it'),
    decay_fraction=field(0.2, RUN, 'wsd: share of the schedule spent decaying, in (0, 1]'),
    decay_shape=field('sqrt', RUN, 'wsd: linear | cosine | sqrt (1 - sqrt(t), the better cooldown in Hagele et '
                                   'al. 2024)'),
    b1=field(0.9, RESUME, 'AdamW (and Muon\'s AdamW part), Lion'),
    b2=field(0.95, RESUME, 'AdamW (and Muon\'s AdamW part), Lion (paper: 0.99)'),
    eps=field(1e-8, RESUME),
    weight_decay=field(0.1, RESUME, 'times the learning rate; norm scales and biases never decay'),
    grad_clip=field(1.0, RESUME, 'global-norm clip; 0 = off'),
    muon_momentum=field(0.95, RESUME, 'muon: Nesterov momentum of the hidden matrices'),
    muon_ns_steps=field(5, RESUME, 'muon: Newton-Schulz iterations'),
    muon_rms=field(0.2, RESUME, "muon: update RMS matched to AdamW's (Liu et al. 2025), so learning_rate and "
                                "weight_decay serve both; 0 = Jordan's sqrt(max(1, cols / rows)) scale"),
    adafactor_min_dim=field(128, RUN, 'adafactor: factor a matrix view when both sides have this many entries '
                                      '(else a full second moment)'),
    adafactor_decay=field(0.8, RESUME, 'adafactor: second-moment decay 1 - t^-this at step t'),
)

# Fine-tuning (`python -m fmjax.finetune`); pretraining ignores it. The recipe was chosen on the validation
# split of the embedded demo (`--demo`: 1,080 train / 120 validation / 300 eval snippets of 4 stdlib packages;
# configs/default.py pretrained 2,000 steps; seq_len 256, lr 1e-3, head lr 3e-3). Figures are validation macro-F1
# of one run each, so differences under ~0.04 are noise. From random initialisation the same recipe gives 0.588.
FINETUNE = dict(
    task=field('classify', RUN, 'classify | lm (continued pretraining on cfg.data) | prompt (loss on responses) | '
                                'sft (chat conversations, loss on assistant turns) | dpo (preference pairs)'),
    init_from=field('', RUN, "pretrained workdir or checkpoint dir ('' = random initialisation)"),
    source=field('csv', RUN, 'classify/prompt data: csv | jsonl | tfds | stdlib_packages (embedded demo)'),
    train_files=field('', RUN, 'csv/jsonl: glob of the train files'),
    # validation_fraction: classify/prompt hold out per label, to choose the best checkpoint (the eval split is
    # then only reported); 0 = no validation: the eval split chooses (a warning says its best is optimistic)
    **split_fields(eval_split='test', validation_fraction=0.1),
    label_feature=field('label', RUN, 'classify: column/feature holding the label'),
    prompt_feature=field('prompt', RUN, 'prompt task: the prompt column'),
    response_feature=field('response', RUN, 'prompt task: the response column (the only tokens with loss)'),
    labels=field((), RUN, 'classify: label names in class order; () = sorted labels of the train set'),
    max_train_examples=field(0, RUN, '0 = all'),
    max_eval_examples=field(0, RESUME, '0 = all'),
    validation_files=field('', RUN, 'csv/jsonl: glob of validation files; when set they are the validation split'),
    baseline=field(True, RESUME, 'classify: fit a bag-of-character-n-grams linear model (scikit-learn) on the same '
                                 'train split and report it beside the model (summary.json, TensorBoard baseline/*)'),
    epochs=field(5.0, RUN, "classify/prompt: > 0 sets `steps` from the train split's size and the global batch "
                           '(0 = use steps); lm always uses steps. Measured: 5 epochs 0.830, 10 epochs 0.826 (twice '
                           'the cost); 3.5 epochs at seq_len 128 0.684 vs 10: 0.759'),
    warmup_ratio=field(0.1, RUN, "> 0: share of the fine-tuning steps used for warmup (overrides "
                                 "optim.warmup_steps); BERT's 10 %, not varied in the measurements"),
    pooling=field('mean', RUN, 'classify: mean (over real tokens) | last (last real token) | cls (first token; '
                               'encoders). Measured: mean 0.830, last 0.698'),
    classifier_dropout=field(0.0, RUN, 'classify: dropout on the pooled vector, training only. Measured: 0.1 gives '
                                       '0.831 against 0.830 (no gain), so off'),
    layer_decay=field(1.0, RUN, 'layer-wise learning-rate decay d (1 = off): block i of L (0 = first) learns at '
                                'lr * d^(L - i), the embeddings at lr * d^(L + 1), the head and final norm at lr. '
                                'Measured: 0.8 gives 0.792 against 0.830 (a small model needs its lower blocks to '
                                'move)'),
    head_learning_rate=field(0.0, RUN, 'classify: peak learning rate of the head; 0 = optim.learning_rate'),
    freeze_embeddings=field(False, RUN, 'freeze the token (and position) embeddings'),
    freeze_layers=field(0, RUN, 'freeze the first N blocks'),
    lora_rank=field(0, RUN, '> 0: train LoRA adapters only (plus the head)'),
    lora_alpha=field(16.0, RUN, 'LoRA scale is alpha / rank'),
    lora_targets=field(('q', 'k', 'v', 'o', 'wi_0', 'wi_1', 'wi', 'wo'), RUN, 'projections that get adapters'),
    best_metric=field('macro_f1', RESUME, 'metric that picks the best checkpoint (classify: accuracy, macro_f1, '
                                          '...; lm: loss)'),
    best_mode=field('max', RESUME, 'max | min'),
    demo_packages=field(('asyncio', 'email', 'tkinter', 'multiprocessing'), RUN, 'stdlib_packages: the classes'),
    demo_per_class=field(300, RUN, 'stdlib_packages: train snippets per class (eval: a quarter of it)'),
    # sft / dpo (fmjax/finetune/chat.py): .jsonl / .parquet files of train_files, eval_files, validation_files
    chat_template=field('', RUN, "sft/dpo: '' = the tokenizer's chat_template (tokenizer_config.json), else the "
                                 "built-in; 'fmjax' = the built-in (System:/User:/Assistant: lines, EOS ends a "
                                 'turn); or a .jinja file'),
    chat_field=field('', RUN, "sft: the conversation field: messages ({role, content}) | conversations (ShareGPT "
                              "{from, value}); '' = whichever a row has"),
    loss_on=field('assistant', RUN, 'sft: assistant (every assistant turn) | last_turn (the last assistant turn)'),
    too_long=field('truncate', RUN, 'sft/dpo: a conversation longer than seq_len: truncate (kept while a trained '
                                    'token remains) | drop; both counted'),
    dpo_beta=field(0.1, RUN, 'dpo: beta, the strength of the pull towards the reference'),
    dpo_loss=field('sigmoid', RUN, 'dpo: sigmoid (DPO) | ipo'),
    dpo_label_smoothing=field(0.0, RUN, 'dpo: sigmoid loss label smoothing (conservative DPO), in [0, 0.5)'),
    sample_prompts=field(4, RESUME, 'sft/dpo: held-out prompts generated greedily at each eval (0 = none)'),
    sample_tokens=field(64, RESUME, 'sft/dpo: new tokens per generated sample'),
)

MLM = dict(   # masked-language-model objective of model.kind='encoder' (fmjax/objectives/mlm.py)
    mask_rate=field(0.15, RESUME, 'share of real tokens chosen for prediction'),
    mask_token_rate=field(0.8, RESUME, "of the chosen: replaced by the tokenizer's mask token"),
    random_token_rate=field(0.1, RESUME, 'of the chosen: replaced by a random token (the rest stay as they are)'),
    whole_word=field(False, RESUME, 'choose whole words (all tokens of a word together) where the tokenizer tells '
                                    'words'),
)

# --- metrics: experiment trackers beside TensorBoard and metrics.jsonl (fmjax/training/wandb_run.py) ---
METRICS = dict(
    wandb_project=field('', RESUME, "Weights & Biases project to log the run's scalars to ('' = off; pip install "
                                    "'fmjax[wandb]')"),
    wandb_entity=field('', RESUME, "W&B entity (user or team; '' = your default)"),
    wandb_run_name=field('', RESUME, "W&B run name ('' = the workdir's name); the run id is kept in "
                                     'WORKDIR/wandb_run_id, so a resume continues the same run'),
    wandb_mode=field('', RESUME, "online | offline | disabled ('' = honour $WANDB_MODE)"),
)
# --- end metrics ---

SCHEMA = dict(
    model=MODEL,
    data=DATA,
    mesh=MESH,
    logical_axis_rules=field(logical_axis_rules_default(), RESUME, 'logical axis name -> mesh axes'),
    optim=OPTIM,
    seed=field(0, RUN),
    seq_len=field(128, RUN),
    global_batch_size=field(16, RUN),
    microbatches=field(1, RESUME, 'gradient accumulation: the batch is split into this many'),
    steps=field(1000, RUN, 'may change on resume when the schedule does not depend on it (optim.decay_steps set, '
                          'a constant or inverse_sqrt schedule) and in a cooldown (optim.decay_start)'),
    z_loss=field(0.0, RESUME),
    log_every=field(10, RESUME),
    eval_every=field(0, RESUME, '0 = never'),
    eval_batches=field(4, RESUME),
    checkpoint_every=field(200, RESUME, '0 = only at the end'),
    eval_tasks=field('', RESUME, "downstream benchmarks while pretraining: lm-eval task / group / tag names, comma-"
                                 "separated (e.g. 'fmjax_sanity'; '' = off; pip install 'fmjax[eval]')"),
    eval_tasks_every=field(0, RESUME, 'steps between eval_tasks runs (and at the end); 0 = at every checkpoint '
                                      '(checkpoint_every) and the end'),
    eval_tasks_limit=field(0, RESUME, 'eval_tasks: documents per task (0 = all)'),
    eval_tasks_batch_size=field(16, RESUME, 'eval_tasks: rows per forward pass'),
    keep_checkpoints=field(3, RESUME),
    async_checkpoints=field(True, RESUME),
    skip_nonfinite_steps=field(0, RESUME, '> 0: skip up to N steps whose loss or gradients are nan/inf (parameters '
                                          'unchanged, counted as skipped_steps) and stop at the next; 0 = stop at '
                                          'the first'),
    divergence_factor=field(3.0, RESUME, 'warn once when the smoothed loss exceeds this x its minimum after warmup '
                                         '(0 = off)'),
    grad_spike_factor=field(10.0, RESUME, 'warn once when the gradient norm exceeds this x its moving average '
                                          '(0 = off)'),
    allow_config_change=field(False, LOCAL, "resume although run-defining options (role 'run', and the model's "
                                            "shape/function/restore fields) differ from the workdir's config.json"),
    force_unlock=field(False, LOCAL, 'take over the workdir lock even when its holder cannot be checked (another '
                                     'host)'),
    progress_bar=field(True, RESUME),
    cpu_peak_flops=field(0.0, RESUME, '0 = measure with a matmul micro-benchmark'),
    gpu_xla_flags=field(True, RESUME, "on GPUs add fmjax's XLA performance flags (fmjax/runtime/gpu_flags.py); "
                                      'yours win'),
    gpu_extra_xla_flags=field('', RESUME, "more XLA flags for GPU runs (space-separated), applied after fmjax's"),
    gpu_memory_fraction=field(0.9, RESUME, "XLA_PYTHON_CLIENT_MEM_FRACTION on GPUs unless set in the env "
                                           "(0 = JAX's)"),
    workdir=field('', LOCAL),
    topology=field('', LOCAL, 'the slice the config is sized for (e.g. v5p-8): what fmjax.plan checks by default'),
    num_slices=field(1, LOCAL, 'how many slices of `topology` the config is sized for (multislice; mesh.dcn '
                               'spans them): what fmjax.plan compiles for by default'),
    finetune=FINETUNE,
    mlm=MLM,
    metrics=METRICS,
)

ROLES: dict[str, str] = collect(SCHEMA)   # dotted key -> role, e.g. 'model.d_model' -> 'shape'


def keys_with_role(*roles: str, section: str | None = None) -> tuple[str, ...]:
  """Dotted keys whose role is one of `roles`; with `section`, that section's field names alone."""
  if section is None:
    return tuple(k for k, r in ROLES.items() if r in roles)
  prefix = section + '.'
  return tuple(k[len(prefix):] for k, r in ROLES.items() if r in roles and k.startswith(prefix))


def model_defaults() -> ml_collections.ConfigDict:
  """Transformer options (a LLaMA-style decoder by default; model.kind='encoder' for BERT-style)."""
  return values(MODEL, 'model.')


def data_defaults() -> ml_collections.ConfigDict:
  """Input pipeline options: source, tokenizer, packing, loader."""
  return values(DATA, 'data.')


def mesh_defaults() -> ml_collections.ConfigDict:
  """Device mesh shape; -1 means 'all remaining devices'."""
  return values(MESH, 'mesh.')


def optim_defaults() -> ml_collections.ConfigDict:
  """The optimizer (AdamW by default) and its learning-rate schedule (warmup + cosine by default)."""
  return values(OPTIM, 'optim.')


def finetune_defaults() -> ml_collections.ConfigDict:
  """Fine-tuning options (`python -m fmjax.finetune`); pretraining ignores them."""
  return values(FINETUNE, 'finetune.')


def mlm_defaults() -> ml_collections.ConfigDict:
  """Masked-language-model objective of model.kind='encoder' (fmjax/objectives/mlm.py); decoders ignore it."""
  return values(MLM, 'mlm.')


def base_config() -> ml_collections.ConfigDict:
  """The full schema with defaults. Config files start here."""
  return values(SCHEMA)

"""Sample from a trained model: `python -m fmjax.generate --workdir DIR --prompt "Once upon"`.

Loads the newest checkpoint of DIR (model config and tokenizer from its metadata) onto the
training mesh (override with `--mesh data,fsdp,tensor` or `--config.mesh.*`), left-pads the
prompts into one batch and decodes with a KV cache (see fmjax.inference.decode). Greedy by default;
`--temperature`, `--top-k`, `--top-p` and `--seed` sample. Prints each completion and the
decode speed; when the context leaves room for fewer than --max-new-tokens, says so on stderr.
"""

from __future__ import annotations

import math
import sys
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from fmjax import cli
from fmjax.inference import decode as decode_lib
from fmjax.inference.decode import DecodeError, Sampling, sampling_options

@dataclass
class Generation:
  """Completions of a batch of prompts and how fast they were made."""
  completions: list[str]
  tokens: list[list[int]]                 # generated ids per prompt (up to and including EOS)
  prompt_tokens: list[list[int]]
  decode_seconds: float = 0.0
  prefill_seconds: float = 0.0
  compile_seconds: float = 0.0
  steps: int = 0
  stats: dict = field(default_factory=dict)

  @property
  def tokens_per_second(self) -> float:
    return sum(len(t) for t in self.tokens) / max(self.decode_seconds, 1e-9)


def encode_prompts(restored, prompts: Sequence[str]) -> list[list[int]]:
  """Token ids of each prompt (with BOS when the model was trained with it); checks the context."""
  tok, add_bos = restored.tokenizer, bool(restored.cfg.data.add_bos)
  if not prompts:
    raise DecodeError('no prompts: pass --prompt TEXT or --prompt-file FILE')
  out = []
  for i, text in enumerate(prompts):
    ids = ([tok.bos_id] if add_bos else []) + [int(x) for x in tok.encode(text)]
    if not ids:
      raise DecodeError(f'prompt {i + 1} is empty')
    if len(ids) >= restored.context_length:
      raise DecodeError(f'prompt {i + 1} has {len(ids)} tokens but the model context is '
                        f'{restored.context_length} (model.max_seq_len / seq_len): shorten it')
    out.append(ids)
  return out


def batch_rows(restored, n: int) -> int:
  """n rounded up to a multiple of the number of batch shards of the mesh."""
  spec = restored.run.batch_sharding.spec
  axes = spec[0] if len(spec) else None
  axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
  ways = math.prod(restored.mesh.shape[a] for a in axes)
  return -(-n // ways) * ways


def cut_at_stop(text: str, stop: Sequence[str]) -> str:
  """`text` up to (not including) the earliest stop string."""
  cuts = [text.find(s) for s in stop if s and s in text]
  return text[:min(cuts)] if cuts else text


def context_cap_note(asked: int, fit: int, prompt_tokens: int, context: int, prompts: int = 1) -> str:
  """The one line, said before decoding starts, that the context caps the number of new tokens."""
  longest = 'the longest prompt' if prompts > 1 else 'the prompt'
  return (f'note: max_new_tokens={asked} capped to {fit} by the model context {context} and {longest} of '
          f'{prompt_tokens} tokens')


def _stderr(message: str) -> None:
  print(message, file=sys.stderr, flush=True)


def generate(restored, prompts: Sequence[str], max_new_tokens: int = 64, sampling: Sampling | None = None,
             seed: int = 0, stop: Sequence[str] = (), params=None, warn=_stderr) -> Generation:
  """Decode `prompts` with the restored model (or `params` of the same shapes and shardings).

  When prompt + max_new_tokens exceeds the context, fewer tokens are generated and `warn` says so in one
  line before decoding starts.
  """
  return generate_ids(restored, encode_prompts(restored, prompts), max_new_tokens, sampling, seed, stop, params,
                      warn)


def generate_ids(restored, ids: Sequence[Sequence[int]], max_new_tokens: int = 64, sampling: Sampling | None = None,
                 seed: int = 0, stop: Sequence[str] = (), params=None, warn=_stderr,
                 stop_ids: Sequence[int] = ()) -> Generation:
  """`generate` from prompt token ids (e.g. a chat template's render); a row also stops at `stop_ids`,
  which completions leave out like EOS."""
  import jax  # pylint: disable=import-outside-toplevel
  sampling = sampling or Sampling(temperature=0.0)
  if max_new_tokens <= 0:
    raise DecodeError(f'max_new_tokens={max_new_tokens} must be positive')
  if restored.cfg.model.get('kind', 'decoder') == 'encoder':
    raise DecodeError('this checkpoint is an encoder (model.kind=encoder, masked-LM): it does not generate text; '
                      'use fmjax.evaluate or fmjax.inspect, or fine-tune it with fmjax.finetune')
  params = restored.params if params is None else params
  tok = restored.tokenizer
  ids = [[int(t) for t in p] for p in ids]
  for i, p in enumerate(ids):
    if len(p) >= restored.context_length:
      raise DecodeError(f'prompt {i + 1} has {len(p)} tokens but the model context is '
                        f'{restored.context_length} (model.max_seq_len / seq_len): shorten it')
  width = max(len(p) for p in ids)
  new = min(max_new_tokens, restored.context_length - width)   # positions must stay in the context
  if new < max_new_tokens:
    warn(context_cap_note(max_new_tokens, new, width, restored.context_length, len(ids)))
  rows = batch_rows(restored, len(ids))
  batch = decode_lib.left_pad(ids, tok.pad_id, rows)
  start = time.perf_counter()
  stops = tuple(sorted({int(s) for s in stop_ids} - {int(tok.eos_id)}))
  key = ('decoder', rows, width, new) + ((stops,) if stops else ())
  if key not in restored.compiled:  # one compiled decoder per shape serves every sampling setting
    decoder = decode_lib.Decoder(restored.model, new, eos_id=tok.eos_id, pad_id=tok.pad_id, stop_ids=stops)
    restored.compiled[key] = decode_lib.compile_decoder(decoder, params, restored.mesh, restored.run.rules, rows,
                                                        width)
  prefill, loop = restored.compiled[key]
  compiled = time.perf_counter() - start

  start = time.perf_counter()
  logits, cache = prefill(params, batch['tokens'], batch['positions'], batch['segment_ids'])
  jax.block_until_ready(logits)
  prefilled = time.perf_counter()
  next_pos = (batch['positions'][:, -1] + 1).astype(np.int32)
  out, lengths, steps = loop(params, cache, logits, next_pos, jax.random.PRNGKey(seed), sampling.as_arrays())
  out, lengths, steps = jax.device_get((out, lengths, steps))
  done = time.perf_counter()

  tokens = [out[i, :lengths[i]].tolist() for i in range(len(ids))]
  ends = {int(tok.eos_id), *stops}
  completions = [cut_at_stop(tok.decode([t for t in seq if t not in ends]), stop) for seq in tokens]
  return Generation(completions=completions, tokens=tokens, prompt_tokens=ids, decode_seconds=done - prefilled,
                    prefill_seconds=prefilled - start, compile_seconds=compiled, steps=int(steps))


def chat_template(restored):
  """The chat template a checkpoint was fine-tuned with (finetune.chat_template of its config), else its
  tokenizer's, else the built-in one (fmjax/data/chat_templates.py)."""
  from fmjax.data import chat_templates  # pylint: disable=import-outside-toplevel
  spec = restored.cfg.finetune.get('chat_template', '') if 'finetune' in restored.cfg else ''
  return chat_templates.for_tokenizer(restored.tokenizer, spec)


def read_prompts(args) -> list[str]:
  prompts = list(args.prompt or [])
  if args.prompt_file:
    try:
      with open(args.prompt_file, encoding='utf-8') as f:
        prompts += [line.rstrip('\n') for line in f if line.strip()]
    except OSError as e:
      raise cli.UsageError(f'cannot read --prompt-file {args.prompt_file}: {e.strerror}') from None
  if not prompts:
    raise cli.UsageError('no prompts: pass --prompt TEXT (repeatable) or --prompt-file FILE')
  return prompts


def run_command(args, overrides: Sequence[str]) -> int:
  """`python -m fmjax.generate` after its flags are parsed (fmjax/generate.py): print the completions."""
  prompts = read_prompts(args)
  temperature = args.temperature
  if temperature is None:  # asking for top-k / top-p means sampling
    temperature = 1.0 if (args.top_k or args.top_p < 1.0) else 0.0
  sampling = sampling_options(temperature=temperature, top_k=args.top_k, top_p=args.top_p)
  from fmjax.checkpoints import restore  # pylint: disable=import-outside-toplevel
  restored = restore.restore(args.workdir, restore.mesh_overrides(args.mesh) + overrides, args.step)
  if args.system is not None and not args.chat:
    raise cli.UsageError('--system needs --chat')
  if args.chat:
    template = chat_template(restored)
    system = [{'role': 'system', 'content': args.system}] if args.system is not None else []
    ids = [template.prompt_ids(system + [{'role': 'user', 'content': p}]) for p in prompts]
    result = generate_ids(restored, ids, args.max_new_tokens, sampling, args.seed, args.stop,
                          stop_ids=template.stop_ids)
  else:
    result = generate(restored, prompts, args.max_new_tokens, sampling, args.seed, args.stop)
  for i, (prompt, completion) in enumerate(zip(prompts, result.completions)):
    print(f'--- [{i + 1}] {prompt!r}')
    print(prompt + completion)
  n = sum(len(t) for t in result.tokens)
  print(f'decode: {n} tokens in {result.decode_seconds:.3f}s ({result.tokens_per_second:.1f} tokens/s, '
        f'{len(prompts)} prompts, {result.steps} steps); prefill {result.prefill_seconds * 1e3:.1f} ms; '
        f'compile {result.compile_seconds:.1f}s; checkpoint step {restored.step}')
  return 0

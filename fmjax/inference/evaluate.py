"""Loss, perplexity and bits per byte of a trained model on a dataset split.

    python -m fmjax.evaluate --workdir DIR [--split validation] [--batches N] [--config.data.X=...]

`evaluate_params` is the one evaluation routine: the command (fmjax/evaluate.py) calls it on a
restored checkpoint and the train loop can call it on its live parameters (build the step once
with `make_evaluator`).
Batches are sharded like training (the Run's batch sharding and parameter shardings).
"""

from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fmjax.training import step as step_lib


def summarize(totals: dict) -> dict:
  """Sums from eval steps -> {'loss', 'perplexity', 'tokens'[, 'bits_per_byte', 'bytes']}."""
  weight = totals.get('weight', 0.0)
  loss = totals.get('loss_sum', 0.0) / max(weight, 1.0)
  out = {'loss': loss, 'perplexity': math.exp(min(loss, 700.0)), 'tokens': weight}
  if 'correct' in totals:  # masked-language-model eval: accuracy on the masked tokens
    out['accuracy'] = totals['correct'] / max(weight, 1.0)
  if totals.get('bytes'):
    out['bits_per_byte'] = totals['loss_sum'] / (math.log(2) * totals['bytes'])
    out['bytes'] = totals['bytes']
  return out


def make_evaluator(run_or_model, token_bytes=None) -> Callable[[Any, Iterable[dict]], dict]:
  """`evaluate(params, batches) -> metrics`, compiled once (reuse it across evaluations).

  `run_or_model` is a `fmjax.training.build.Run` (sharded like training; numpy batches are made global
  arrays on its batch sharding) or a bare model (plain jit, for single-device use).
  """
  from fmjax.training import loop  # pylint: disable=import-outside-toplevel
  token_bytes = None if token_bytes is None else jnp.asarray(token_bytes)
  if hasattr(run_or_model, 'jit_eval_step'):
    step = run_or_model.jit_eval_step(token_bytes)
    to_device = lambda b: loop.to_global(b, run_or_model.batch_sharding)
  else:
    step = jax.jit(step_lib.make_eval_step(run_or_model, token_bytes))
    to_device = lambda b: b

  def evaluate(params, batches: Iterable[dict]) -> dict:
    totals: dict[str, float] = {}
    for batch in batches:
      out = jax.device_get(step(params, to_device(batch)))
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    return summarize(totals)
  return evaluate


def evaluate_params(run_or_model, params, batches: Iterable[dict], token_bytes=None) -> dict:
  """Loss (nats/token), perplexity, tokens and (with `token_bytes`) bits per byte over `batches`."""
  return make_evaluator(run_or_model, token_bytes)(params, batches)


def token_losses(restored, token_rows: Sequence[Sequence[int]], params=None) -> list[np.ndarray]:
  """Per-token loss (nats) of each row's tokens 1..n given the previous ones, on the run's mesh."""
  from fmjax.parallel import sharding as shd  # pylint: disable=import-outside-toplevel
  from fmjax.inference.generate import batch_rows  # pylint: disable=import-outside-toplevel
  params = restored.params if params is None else params
  width = max(len(r) for r in token_rows)
  rows = batch_rows(restored, len(token_rows))
  tokens = np.zeros((rows, width), np.int32)
  segs = np.zeros((rows, width), np.int32)
  for i, r in enumerate(token_rows):
    tokens[i, :len(r)], segs[i, :len(r)] = r, 1
  positions = np.broadcast_to(np.arange(width, dtype=np.int32), (rows, width))

  def losses(params, tokens, positions, segs):
    logits = restored.model.apply({'params': params}, tokens, positions, segs).astype(jnp.float32)
    logp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return -jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1)[..., 0]

  fn = restored.compiled.setdefault('token_losses', jax.jit(losses))
  with shd.activate(restored.mesh, restored.run.rules):
    out = np.asarray(fn(params, tokens, positions, segs))
  return [out[i, :len(r) - 1] for i, r in enumerate(token_rows)]


def score_texts(restored, texts: Sequence[str], params=None) -> float:
  """Mean per-token loss (nats) of `texts` (each with BOS when the model was trained with it)."""
  tok = restored.tokenizer
  bos = [tok.bos_id] if restored.cfg.data.add_bos else []
  rows = [bos + [int(t) for t in tok.encode(text)] for text in texts]
  per_row = token_losses(restored, rows, params)
  return float(np.concatenate(per_row).mean())


def run_command(args, overrides: Sequence[str]) -> int:
  """`python -m fmjax.evaluate` after its flags are parsed (fmjax/evaluate.py): print the metrics."""
  from fmjax.checkpoints import restore  # pylint: disable=import-outside-toplevel
  from fmjax.data import pipeline  # pylint: disable=import-outside-toplevel
  overrides = list(overrides)
  if args.split:
    overrides.append(f'data.eval_split={args.split}')
  restored = restore.restore(args.workdir, restore.mesh_overrides(args.mesh) + overrides, args.step)
  cfg = restored.cfg
  n = args.batches if args.batches is not None else cfg.eval_batches
  local_batch = cfg.global_batch_size // jax.process_count()
  batches = pipeline.make_eval_batches(cfg.data, restored.tokenizer, seq_len=cfg.seq_len, batch_size=local_batch,
                                       num_batches=n, process_index=jax.process_index(),
                                       process_count=jax.process_count())
  result = evaluate_params(restored.run, restored.params, batches, restored.tokenizer.token_byte_lengths())
  metrics = ' '.join(f'{k}={v:.4f}' if k not in ('tokens', 'bytes') else f'{k}={v:g}'
                     for k, v in result.items())
  print(f'{metrics} (split {cfg.data.eval_split!r}, {len(batches)} batches, checkpoint step {restored.step})')
  return 0

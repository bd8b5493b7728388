"""Evaluation of chat fine-tuning: held-out DPO pair metrics, generated samples and exact-match accuracy.

At each eval an sft or dpo run generates greedy answers to the first finetune.sample_prompts held-out
prompts (validation, else eval) with the run's own parameters, logs them and writes
eval/samples_step_N.jsonl ({where, prompt, answer, completion, exact}); `exact_match` is the share of
completions equal to the reference answer after stripping whitespace.
"""

from __future__ import annotations

import json
from typing import Sequence

import jax
import numpy as np

from fmjax.checkpoints import restore
from fmjax.finetune import chat
from fmjax.inference import generate as generate_lib
from fmjax.objectives import preference
from fmjax.parallel import sharding as shd
from fmjax.runtime import paths
from fmjax.training import loop


class PairEval:
  """DPO metrics over held-out pairs: {'loss', 'rewards/chosen', ..., 'pairs'} means over the real pairs."""

  def __init__(self, run, ft):
    self.run = run
    keys = ('inputs', 'targets', 'segment_ids', 'positions', 'weights', preference.REFERENCE_KEY)
    self.fn = jax.jit(preference.eval_fn(run.model, ft.dpo_beta, ft.dpo_label_smoothing, ft.dpo_loss),
                      in_shardings=(run.state.shardings.params, {k: run.batch_sharding for k in keys}),
                      out_shardings=shd.replicated(run.mesh))

  def __call__(self, params, batches) -> dict:
    outs = []
    for b in batches:   # all dispatched, then read back once
      with shd.activate(self.run.mesh, self.run.rules):
        outs.append(self.fn(params, loop.to_global(b, self.run.batch_sharding)))
    totals: dict[str, float] = {}
    for out in jax.device_get(outs):
      for k, v in out.items():
        totals[k] = totals.get(k, 0.0) + float(v)
    pairs = max(totals.get('pairs', 0.0), 1.0)
    report = {'loss': totals['loss_sum'] / pairs, 'pairs': totals.get('pairs', 0.0)}
    report.update({k: totals[k] / pairs for k in preference.METRICS})
    return report


def restored_view(run, tokenizer, cfg) -> restore.Restored:
  """The run as fmjax.inference sees a restored checkpoint, to decode with the training parameters."""
  return restore.Restored(cfg=cfg, meta={'seq_len': cfg.seq_len}, step=0, tokenizer=tokenizer, run=run, params=None)


class SampleDecoder:
  """Decodes the in-run samples on one device (the first), with a copy of the training parameters: on a
  multi-device CPU mesh a sharded decode loop dispatched between train steps was seen to stall XLA's
  collectives past their 40 s rendezvous limit (an abort), and a few prompts need no mesh."""

  def __init__(self, cfg, tokenizer, task):
    """`task(cfg) -> build.Task`: the fine-tune's (fmjax/finetune/parts.py), for the parameters' structure."""
    from fmjax.training import build  # pylint: disable=import-outside-toplevel
    one = cfg.copy_and_resolve_references()
    one.mesh.update(dict(data=1, fsdp=1, tensor=1))
    one.global_batch_size = 1
    one.microbatches = 1
    run = build.build_run(one, shd.make_mesh(one.mesh, jax.devices()[:1]), task(one), compile_step=False)
    self.view = restored_view(run, tokenizer, one)
    self.shardings = run.state.shardings.params

  def params(self, params):
    """The training parameters gathered onto the one device."""
    return jax.device_put(jax.device_get(params), self.shardings)


def answers(view, template, prompts: Sequence[Sequence[dict]], params, max_new_tokens: int,
            batch: int = 64) -> list[str]:
  """Greedy completions of chat prompts (message lists) rendered with the generation prompt."""
  out = []
  for s in range(0, len(prompts), batch):
    ids = [template.prompt_ids(p) for p in prompts[s:s + batch]]
    result = generate_lib.generate_ids(view, ids, max_new_tokens, params=params, stop_ids=template.stop_ids,
                                       warn=lambda _: None)
    out.extend(result.completions)
  return out


def exact(completion: str, answer: str) -> bool:
  return completion.strip() == answer.strip()


def exact_match(view, template, examples: Sequence, params, max_new_tokens: int) -> float:
  """Share of `examples` (conversations or pairs) whose greedy answer equals the reference answer."""
  items = chat.prompts_and_answers(examples, len(examples))
  got = answers(view, template, [p for p, _, _ in items], params, max_new_tokens)
  return float(np.mean([exact(c, a) for c, (_, a, _) in zip(got, items)])) if items else 0.0


def samples(view, template, examples: Sequence, params, count: int, max_new_tokens: int) -> list[dict]:
  """The first `count` held-out prompts answered: [{where, prompt, answer, completion, exact}]."""
  items = chat.prompts_and_answers(examples, count)
  if not items:
    return []
  got = answers(view, template, [p for p, _, _ in items], params, max_new_tokens)
  return [{'where': w, 'prompt': p[-1]['content'], 'answer': a, 'completion': c, 'exact': exact(c, a)}
          for c, (p, a, w) in zip(got, items)]


def write_samples(path: str, rows: list[dict]) -> None:
  paths.write_text(path, ''.join(json.dumps(r, ensure_ascii=False) + '\n' for r in rows))


def sample_lines(step: int, rows: list[dict]) -> list[str]:
  return [f'sample {i + 1} (step {step}, {r["where"]}): {r["prompt"]!r} -> {r["completion"]!r} '
          f'({"exact" if r["exact"] else "expected " + repr(r["answer"])})' for i, r in enumerate(rows)]

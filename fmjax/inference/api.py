"""The Python API: load any fmjax checkpoint (trained, fine-tuned or imported from Hugging Face) and run it.

    import fmjax.api
    lm = fmjax.inference.api.load('/tmp/llama3')            # a workdir, its checkpoints/ or one checkpoints/<step>
    lm.model, lm.params, lm.tokenizer, lm.config   # the flax module, sharded params, tokenizer, run config
    lm.logits(['Hello world'])                     # [(T, vocab) float32 array] per text
    lm.score(['Hello world'])                      # [mean next-token loss in nats] per text
    lm.generate(['Once upon'], max_new_tokens=20)  # completions (greedy unless temperature > 0)

It is the loader of the command-line tools (fmjax.checkpoints.restore.restore): the model section comes from the
checkpoint metadata, the tokenizer from the checkpoint, and the context from the model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np


@dataclass
class LanguageModel:
  """A restored checkpoint with text-level helpers; `restored` is the fmjax.checkpoints.restore.Restored behind it."""
  restored: object

  @property
  def model(self):
    return self.restored.model

  @property
  def params(self):
    return self.restored.params

  @property
  def tokenizer(self):
    return self.restored.tokenizer

  @property
  def config(self):
    return self.restored.cfg

  @property
  def context_length(self) -> int:
    return self.restored.context_length

  def encode(self, text: str) -> list[int]:
    """Token ids as the model reads `text` (bos first when the model was trained with it)."""
    tok = self.tokenizer
    return ([tok.bos_id] if self.config.data.add_bos else []) + [int(i) for i in tok.encode(text)]

  def _rows(self, texts: Sequence[str]) -> list[list[int]]:
    from fmjax.inference.decode import DecodeError  # pylint: disable=import-outside-toplevel
    if isinstance(texts, str):
      raise TypeError('pass a list of texts, not one string')
    rows = [self.encode(t) for t in texts]
    for i, row in enumerate(rows):
      if not row:
        raise DecodeError(f'text {i + 1} is empty')
      if len(row) > self.context_length:
        raise DecodeError(f'text {i + 1} has {len(row)} tokens but the model context is {self.context_length}')
    return rows

  def logits(self, texts: Sequence[str]) -> list[np.ndarray]:
    """Next-token logits (float32, shape (tokens, vocab)) at every position of each text."""
    import jax  # pylint: disable=import-outside-toplevel
    import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
    from fmjax.parallel import sharding as shd  # pylint: disable=import-outside-toplevel
    from fmjax.inference.generate import batch_rows  # pylint: disable=import-outside-toplevel
    rows = self._rows(texts)
    width = max(len(r) for r in rows)
    n = batch_rows(self.restored, len(rows))
    tokens, segs = np.zeros((n, width), np.int32), np.zeros((n, width), np.int32)
    for i, r in enumerate(rows):
      tokens[i, :len(r)], segs[i, :len(r)] = r, 1
    positions = np.broadcast_to(np.arange(width, dtype=np.int32), (n, width))
    model = self.model
    fn = self.restored.compiled.setdefault(
        'logits', jax.jit(lambda p, t, pos, s: model.apply({'params': p}, t, pos, s).astype(jnp.float32)))
    with shd.activate(self.restored.mesh, self.restored.run.rules):
      out = np.asarray(fn(self.params, tokens, positions, segs))
    return [out[i, :len(r)] for i, r in enumerate(rows)]

  def score(self, texts: Sequence[str]) -> list[float]:
    """Mean next-token loss (nats per token) of each text given its start."""
    from fmjax.inference.evaluate import token_losses  # pylint: disable=import-outside-toplevel
    return [float(np.mean(x)) if x.size else float('nan') for x in token_losses(self.restored, self._rows(texts))]

  def generate(self, prompts: Sequence[str], max_new_tokens: int = 64, temperature: float = 0.0, top_k: int = 0,
               top_p: float = 1.0, seed: int = 0) -> list[str]:
    """Completions of `prompts` (fmjax.inference.generate.generate; greedy when temperature is 0)."""
    from fmjax.inference.decode import sampling_options  # pylint: disable=import-outside-toplevel
    from fmjax.inference.generate import generate  # pylint: disable=import-outside-toplevel
    sampling = sampling_options(temperature=temperature, top_k=top_k, top_p=top_p)
    return generate(self.restored, prompts, max_new_tokens, sampling, seed).completions


def load(path: str, overrides: Sequence[str] = (), step: int | None = None, mesh: str | None = None) -> LanguageModel:
  """Load a checkpoint: `path` is a workdir (newest step unless `step`), `overrides` are `a.b=value` config
  items (only fields that may change: mesh, dtype, attention, ...; model.max_seq_len may lower the
  context), `mesh` is 'data,fsdp,tensor'."""
  from fmjax.checkpoints import restore  # pylint: disable=import-outside-toplevel
  return LanguageModel(restore.restore(path, restore.mesh_overrides(mesh) + list(overrides), step))

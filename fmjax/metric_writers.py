"""Where metrics go: TensorBoard event files, a JSONL log, and a console progress bar.

Only process 0 writes; other processes get a writer that drops everything.
"""

from __future__ import annotations

import json
import os
import sys

import jax


class MetricWriter:
  """TensorBoard (tensorboardX) + `metrics.jsonl` in the workdir + tqdm progress bar."""

  def __init__(self, workdir: str, total_steps: int, initial_step: int = 0, progress_bar: bool = True,
               enabled: bool | None = None):
    self.enabled = jax.process_index() == 0 if enabled is None else enabled
    self._tb = self._jsonl = self._bar = None
    if not self.enabled:
      return
    from tensorboardX import SummaryWriter  # imported lazily: only process 0 needs it
    self._tb = SummaryWriter(os.path.join(workdir, 'tensorboard'))
    self._jsonl = open(os.path.join(workdir, 'metrics.jsonl'), 'a')
    if progress_bar:
      from tqdm import tqdm
      self._bar = tqdm(total=total_steps, initial=initial_step, dynamic_ncols=True, file=sys.stderr,
                       mininterval=1.0, unit='step')

  def write(self, step: int, scalars: dict, prefix: str = 'train') -> None:
    """Record scalars for a step (TensorBoard tags `prefix/name`)."""
    if not self.enabled:
      return
    scalars = {k: float(v) for k, v in scalars.items()}
    for k, v in scalars.items():
      self._tb.add_scalar(f'{prefix}/{k}', v, step)
    self._jsonl.write(json.dumps({'step': step, 'split': prefix, **scalars}) + '\n')
    self._jsonl.flush()
    if self._bar is not None:
      shown = {k: scalars[k] for k in ('loss', 'tokens_per_s', 'mfu') if k in scalars}
      self._bar.set_postfix({k: (f'{v:.3g}' if k != 'tokens_per_s' else f'{v:,.0f}') for k, v in shown.items()},
                            refresh=False)
    elif prefix != 'train' or 'loss' in scalars:
      text = ' '.join(f'{k}={v:.4g}' for k, v in scalars.items())
      print(f'[{prefix}] step {step}: {text}', flush=True)

  def advance(self, step: int) -> None:
    """Move the progress bar to `step`."""
    if self._bar is not None:
      self._bar.update(step - self._bar.n)

  def log(self, text: str) -> None:
    """A console line (through the bar when there is one)."""
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.write(text, file=sys.stderr)
    else:
      print(text, flush=True)

  def close(self) -> None:
    if not self.enabled:
      return
    if self._bar is not None:
      self._bar.close()
    self._tb.close()
    self._jsonl.close()

"""DPO's reference model: the log-probability of every response token under the starting parameters.

Computed once, when a fresh run starts (the init_from checkpoint's parameters; with LoRA the adapters
start at zero, so this is the base model without them), and kept in WORKDIR/dpo_reference.npz, which a
resumed run reads back instead of recomputing from its trained parameters. No second copy of the
parameters lives through training and no second optimizer state exists. The file records a
fingerprint of the token rows it belongs to: data that changed under a resumed run is refused.
"""

from __future__ import annotations

import hashlib
import io

import jax
import numpy as np

from fmjax.data.errors import DataError
from fmjax.objectives import preference
from fmjax.parallel import sharding as shd
from fmjax.runtime import distributed, paths
from fmjax.training import loop

FILE = 'dpo_reference.npz'


def fingerprint(named_rows: dict[str, dict]) -> str:
  """A hash of the inputs, targets and weights of every named row set."""
  h = hashlib.blake2b(digest_size=16)
  for name in sorted(named_rows):
    h.update(name.encode())
    for key in ('inputs', 'targets', 'weights'):
      h.update(np.ascontiguousarray(named_rows[name][key]).tobytes())
  return h.hexdigest()


def program(run, keys):
  """The compiled reference pass of `run`: (params, batch of `keys`) -> (B, T) token log-probabilities."""
  return jax.jit(preference.reference_fn(run.model),
                 in_shardings=(run.state.shardings.params, {k: run.batch_sharding for k in keys}),
                 out_shardings=shd.replicated(run.mesh))


def compute(run, params, rows: dict, fn=None) -> np.ndarray:
  """(N, T) weighted token log-probabilities of `rows` under `params`, on the run's mesh (`fn`: a
  `program(run, rows)` to reuse; every batch is dispatched before the first is read back)."""
  fn = fn or program(run, rows)
  gb = run.cfg.global_batch_size
  local = gb // jax.process_count()
  n = len(rows['inputs'])
  out = []
  for s in range(0, n, gb):
    chunk = {k: v[s:s + gb] for k, v in rows.items()}
    short = gb - len(chunk['inputs'])
    if short:
      chunk = {k: np.concatenate([v, np.zeros((short,) + v.shape[1:], v.dtype)]) for k, v in chunk.items()}
    lo = jax.process_index() * local
    mine = {k: v[lo:lo + local] for k, v in chunk.items()}
    with shd.activate(run.mesh, run.rules):
      out.append((fn(params, loop.to_global(mine, run.batch_sharding)), gb - short))
  return np.concatenate([np.asarray(a)[:keep] for a, keep in jax.device_get(out)]).astype(np.float32)


def load_or_compute(workdir: str, resumed: bool, run, params, named_rows: dict[str, dict], log) -> dict[str, np.ndarray]:
  """The reference log-probabilities of each named row set: read from WORKDIR/dpo_reference.npz when it is
  there, else computed from `params` (a fresh run's starting parameters) and written."""
  path = paths.join(workdir, FILE)
  stamp = fingerprint(named_rows)
  if paths.exists(path):
    with np.load(io.BytesIO(paths.read_bytes(path))) as saved:
      if str(saved['fingerprint']) != stamp:
        raise DataError(f'{path} was computed for other data than this run\'s (the pairs, the template or seq_len '
                        'changed): restore the data, or start a new workdir')
      return {name: saved[name] for name in named_rows}
  if resumed:
    raise DataError(f'{path} is missing, and a resumed run cannot recompute the reference from its trained '
                    'parameters: restore the file, or start a new workdir')
  fn = program(run, next(iter(named_rows.values())))   # one compile for every row set (same shapes)
  out = {name: compute(run, params, rows, fn) for name, rows in named_rows.items()}
  if distributed.is_leader():
    buf = io.BytesIO()
    np.savez(buf, fingerprint=np.asarray(stamp), **out)
    paths.write_bytes(path, buf.getvalue())
  log(f'dpo reference: log-probabilities of {sum(len(r["inputs"]) for r in named_rows.values())} sequences '
      f'from the starting parameters, kept in {path}')
  return out

"""fmjax as an lm-evaluation-harness model: `lm_eval.simple_evaluate(model='fmjax', model_args={...})`.

    import fmjax.inference.lm_eval_backend            # registers the model name 'fmjax' with lm-eval
    lm_eval.simple_evaluate(model='fmjax', model_args={'pretrained': WORKDIR, 'batch_size': 16}, tasks=[...])
    FmjaxLM(lm=fmjax.api.load(WORKDIR))               # or wrap a model already loaded (params=... to swap them)

Any fmjax workdir or imported Hugging Face model (`fmjax.api.load`) with its own tokenizer. Requests
follow the conventions of lm-eval's `hf` backend, so the same model scores the same through both:
the context/continuation split of `TemplateLM._encode_pair`; BOS before every encoded text when the
model reads it (data.add_bos; `add_bos_token` overrides), also before a rolling text, whose first
window predicts that BOS from the prefix token as hf's does; an empty context conditioned on
`prefix_token_id` (BOS); inputs longer than the model cut from the left (one notice per call);
rolling windows from `lm_eval.utils.get_rolling_token_windows` + `make_disjoint_window`; generation
greedy unless do_sample, `max_gen_toks` new tokens (default 256) after a context cut to leave room
for them, then cut at the first `until` string (EOS's text added, as hf adds it).

Requests run longest first in batches of `batch_size`, padded to bucket lengths
(fmjax.inference.lm_eval_compute: few compiles, reused) and sharded on the mesh like evaluation;
per-token log-probabilities are float32. Pass dtype=float32 to compute a bfloat16 run in float32.
"""

from __future__ import annotations

import logging
from typing import Any, Sequence

import lm_eval.models  # noqa: F401  (lm-eval's own names, 'hf' included, registered before ours)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import handle_stop_sequences, normalize_gen_kwargs, postprocess_generated_text
from tqdm import tqdm

from fmjax.inference.lm_eval_errors import BackendArgumentError

log = logging.getLogger(__name__)
DEFAULT_BATCH_SIZE = 16
_SAMPLING_KEYS = ('until', 'max_gen_toks', 'do_sample', 'temperature', 'top_k', 'top_p')


def _batch_size(value) -> int:
  """lm-eval's batch_size ('auto', 'auto:N', '8', 8 or None) as a number of rows."""
  if value is None or str(value).startswith('auto'):
    return DEFAULT_BATCH_SIZE
  try:
    size = int(value)
  except ValueError:
    raise BackendArgumentError(f'batch_size={value!r} is not a number (or auto)') from None
  if size < 1:
    raise BackendArgumentError(f'batch_size={size} must be at least 1')
  return size


def _buckets(value, max_length: int) -> list[int]:
  """Row lengths to pad to: True (the default ladder), False / 'none' (each batch's own width), or a list
  (or 'a;b;c': lm-eval's argument strings split on commas)."""
  from fmjax.inference.lm_eval_compute import bucket_lengths  # pylint: disable=import-outside-toplevel
  if isinstance(value, str):
    value = {'true': True, 'false': False, 'none': False, 'off': False}.get(value.lower(), value.split(';'))
  if value is True:
    return bucket_lengths(max_length)
  if not value:
    return []
  try:
    return sorted({min(int(b), max_length) for b in value} | {max_length})
  except (TypeError, ValueError):
    raise BackendArgumentError(f'buckets={value!r}: pass true, none or lengths such as 32;64;128') from None


def _flag(value) -> bool:
  return value if isinstance(value, bool) else str(value).lower() in ('1', 'true', 'yes')


@register_model('fmjax')
class FmjaxLM(TemplateLM):
  """An fmjax checkpoint behind lm-eval's LM interface (see the module docstring)."""

  def __init__(self, pretrained: str | None = None, lm=None, params=None, step: int | None = None,
               mesh: str | None = None, overrides: Sequence[str] = (), dtype: str | None = None,
               batch_size: Any = DEFAULT_BATCH_SIZE, max_length: int | None = None, buckets: Any = True,
               max_gen_toks: int = 256, add_bos_token: Any = None, prefix_token_id: int | None = None,
               seed: int = 0, device: str | None = None, max_batch_size: int | None = None, **unknown):
    super().__init__()
    del device, max_batch_size   # lm-eval passes them to every model; fmjax places work by its mesh
    if unknown:
      raise BackendArgumentError(f'unknown fmjax model argument(s) {", ".join(sorted(unknown))}; known: pretrained, '
                                 'step, mesh, overrides, dtype, batch_size, max_length, buckets, max_gen_toks, '
                                 'add_bos_token, prefix_token_id, seed')
    from fmjax.inference import lm_eval_compute  # pylint: disable=import-outside-toplevel
    if lm is None:
      if not pretrained:
        raise BackendArgumentError('the fmjax model needs pretrained=WORKDIR (a workdir made by fmjax.train or '
                                   'fmjax-convert from-hf)')
      from fmjax.inference import api  # pylint: disable=import-outside-toplevel
      overrides = [overrides] if isinstance(overrides, str) else list(overrides)
      overrides += [f'model.dtype={dtype}'] if dtype else []
      mesh = mesh.replace(';', ',') if isinstance(mesh, str) else mesh   # lm-eval's argument strings split on commas
      lm = api.load(str(pretrained), overrides, None if step is None else int(step), mesh)
    self.restored = getattr(lm, 'restored', lm)
    if self.restored.cfg.model.get('kind', 'decoder') == 'encoder':
      raise BackendArgumentError('this checkpoint is an encoder (model.kind=encoder, masked-LM): lm-eval\'s '
                                 'log-likelihood and generation tasks need a causal decoder')
    self.tokenizer = self.restored.tokenizer
    self.runner = lm_eval_compute.RowRunner(self.restored, params, _batch_size(batch_size))
    self.batch_size = _batch_size(batch_size)
    self._max_length = int(max_length) if max_length else int(self.restored.context_length)
    if not 0 < self._max_length <= self.restored.context_length:
      raise BackendArgumentError(f'max_length={max_length} must be in 1..{self.restored.context_length} (the model '
                                 'context)')
    self.buckets = _buckets(buckets, self._max_length)
    self._max_gen_toks = int(max_gen_toks)
    self.add_bos = bool(self.restored.cfg.data.add_bos) if add_bos_token is None else _flag(add_bos_token)
    self._prefix = None if prefix_token_id is None else int(prefix_token_id)
    self.seed = int(seed)
    bos_text = getattr(self.tokenizer, 'special_tokens', {}).get('bos')   # a Hugging Face tokenizer's BOS text
    self._bos_text = bos_text or None

  # -- lm-eval's model interface -----------------------------------------------------------------
  @property
  def eot_token_id(self) -> int:
    return int(self.tokenizer.eos_id)

  @property
  def prefix_token_id(self) -> int:
    return self._prefix if self._prefix is not None else int(self.tokenizer.bos_id)

  @property
  def max_length(self) -> int:
    return self._max_length

  @property
  def max_gen_toks(self) -> int:
    return self._max_gen_toks

  @property
  def tokenizer_name(self) -> str:
    return repr(self.tokenizer)

  def get_model_info(self) -> dict:
    return {'model_step': int(self.restored.step), 'model_dtype': str(self.restored.cfg.model.dtype),
            'max_length': self.max_length}

  def tok_encode(self, string: str, add_special_tokens: bool | None = None, left_truncate_len: int | None = None,
                 **kwargs) -> list[int]:
    """Token ids of `string`, BOS first as the hf backend adds it (see the module docstring)."""
    del kwargs
    bos = self.add_bos if add_special_tokens is None else (add_special_tokens and self.add_bos)
    if add_special_tokens is None and self._bos_text and string.startswith(self._bos_text):
      bos = False   # the text brings its own BOS (hf's has_bos_prefix)
    ids = ([int(self.tokenizer.bos_id)] if bos else []) + [int(i) for i in self.tokenizer.encode(string)]
    return ids[-left_truncate_len:] if left_truncate_len else ids

  def tok_decode(self, tokens: Sequence[int]) -> str:
    special = {self.tokenizer.bos_id, self.tokenizer.eos_id, self.tokenizer.pad_id}
    return self.tokenizer.decode([int(t) for t in tokens if int(t) not in special])

  # -- log-likelihoods ---------------------------------------------------------------------------
  def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
    """(sum of log p(continuation | context), whether greedy decoding gives it) per (key, context, continuation)."""
    del kwargs
    limit, cut = self.max_length, 0
    rows = []
    for _, context_enc, continuation_enc in requests:
      whole = list(context_enc) + list(continuation_enc)
      if len(continuation_enc) > limit:
        raise BackendArgumentError(f'a continuation of {len(continuation_enc)} tokens is longer than the model '
                                   f'context ({limit} tokens): lm-eval cannot score it')
      cut += len(whole) > limit + 1
      window = whole[-(limit + 1):]
      rows.append((window[:-1], window[1:], len(continuation_enc)))
    if cut:
      self._truncation_notice(cut, len(requests), 'context and continuation')
    order = sorted(range(len(rows)), key=lambda i: (-len(rows[i][0]), tuple(rows[i][0])))
    results: list[tuple[float, bool] | None] = [None] * len(rows)
    bar = tqdm(total=len(rows), desc='fmjax loglikelihood requests', disable=disable_tqdm)
    for start in range(0, len(order), self.batch_size):
      chunk = order[start:start + self.batch_size]
      width = self._bucket(max(len(rows[i][0]) for i in chunk), self.buckets)
      logp, greedy = self.runner.score([rows[i][0] for i in chunk], [rows[i][1] for i in chunk], width)
      for k, i in enumerate(chunk):
        n, length = len(rows[i][0]), rows[i][2]
        results[i] = (float(logp[k, n - length:n].astype('float64').sum()), bool(greedy[k, n - length:n].all()))
        if requests[i][0] is not None:   # rolling windows are cached per text instead
          self.cache_hook.add_partial('loglikelihood', requests[i][0], results[i])
      bar.update(len(chunk))
    bar.close()
    return results

  def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
    """Total log-likelihood of each text, in disjoint windows of the model context (hf's windows)."""
    windows, owners = [], []
    for index, (string,) in enumerate(req.args for req in requests):
      tokens = self.tok_encode(string)
      for context, continuation in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
          token_list=tokens, prefix_token=self.prefix_token_id, max_seq_len=self.max_length, context_len=1)):
        windows.append((None, context, continuation))
        owners.append(index)
    scores = self._loglikelihood_tokens(windows, disable_tqdm=disable_tqdm)
    totals = [0.0] * len(requests)
    for owner, (value, _) in zip(owners, scores):
      totals[owner] += value
    for req, total in zip(requests, totals):
      self.cache_hook.add_partial('loglikelihood_rolling', req.args, total)
    return totals

  # -- generation --------------------------------------------------------------------------------
  def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
    """Greedy (or sampled, with do_sample) continuations cut at the first stop string, in request order."""
    from fmjax.inference.decode import sampling_options  # pylint: disable=import-outside-toplevel
    groups: dict[str, list[int]] = {}
    for i, req in enumerate(requests):
      groups.setdefault(repr(sorted(req.args[1].items())), []).append(i)
    out: list[str | None] = [None] * len(requests)
    eos_text = self.tokenizer.decode([self.eot_token_id]) or None
    bar = tqdm(total=len(requests), desc='fmjax generate_until requests', disable=disable_tqdm)
    for indices in groups.values():
      gen_kwargs = requests[indices[0]].args[1]
      kwargs = normalize_gen_kwargs(gen_kwargs, self.max_gen_toks)
      until = handle_stop_sequences(kwargs.pop('until', None), eos=eos_text)
      new_tokens = int(kwargs.pop('max_gen_toks'))
      room = self.max_length - new_tokens
      if room <= 0:
        raise BackendArgumentError(f'max_gen_toks={new_tokens} leaves no room for a context in the model\'s '
                                   f'{self.max_length} tokens: lower it (task generation_kwargs or --gen-kwargs)')
      unknown = sorted(set(kwargs) - set(_SAMPLING_KEYS))
      if unknown:
        log.warning('generation options %s are not used by the fmjax backend (it knows %s)', unknown,
                    ', '.join(_SAMPLING_KEYS))
      sampling = sampling_options(temperature=float(kwargs.get('temperature') or 0.0) if kwargs.get('do_sample')
                                  else 0.0, top_k=int(kwargs.get('top_k') or 0),
                                  top_p=float(kwargs.get('top_p') or 1.0))
      encoded = {i: self.tok_encode(requests[i].args[0]) for i in indices}
      cut = sum(len(ids) > room for ids in encoded.values())
      if cut:
        self._truncation_notice(cut, len(indices), f'context (with {new_tokens} tokens to generate)')
      encoded = {i: ids[-room:] for i, ids in encoded.items()}
      order = sorted(indices, key=lambda i: (-len(encoded[i]), requests[i].args[0]))
      buckets = [b for b in self.buckets if b < room] + [room] if self.buckets else []
      for start in range(0, len(order), self.batch_size):
        chunk = order[start:start + self.batch_size]
        width = self._bucket(max(len(encoded[i]) for i in chunk), buckets)
        seed = self.seed + start
        for i, ids in zip(chunk, self.runner.decode([encoded[i] for i in chunk], width, new_tokens, sampling, seed)):
          if self.eot_token_id in ids:
            ids = ids[:ids.index(self.eot_token_id)]
          out[i] = postprocess_generated_text(self.tok_decode(ids), until, None)
          self.cache_hook.add_partial('generate_until', requests[i].args, out[i])
        bar.update(len(chunk))
    bar.close()
    return out

  # -- helpers -----------------------------------------------------------------------------------
  @staticmethod
  def _bucket(width: int, buckets: Sequence[int]) -> int:
    from fmjax.inference.lm_eval_compute import pick_length  # pylint: disable=import-outside-toplevel
    return pick_length(width, buckets)

  def _truncation_notice(self, cut: int, total: int, what: str) -> None:
    log.warning('%d of %d requests have a %s longer than the model context (%d tokens): cut from the left, as '
                'lm-eval does', cut, total, what, self.max_length)

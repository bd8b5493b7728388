"""Mapping tables between Hugging Face tensor names and fmjax parameter paths.

A family (llama.py, gpt2.py) lists `Rule`s: one HF tensor <-> one or more fmjax parameters with a
transform each way (the MaxText scheme). '{i}' in a name stands for the layer index. fmjax paths
are written in the unrolled layout ('layers_{i}/attn/q/kernel'); `locate` maps them into a scanned
tree. Transforms work on NumPy arrays, one tensor at a time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import numpy as np

from fmjax.errors import UserError


class ConversionError(UserError):
  """A checkpoint, tensor or flag that cannot be converted; the message names it."""


@dataclass(frozen=True)
class Rule:
  hf: str                      # HF tensor name; '{i}' = layer index
  fm: tuple                    # fmjax parameter paths ('/'-separated); '{i}' = layer index
  hf_shape: tuple              # shape of the HF tensor
  to_hf: Callable              # (*fm arrays) -> HF array
  from_hf: Callable            # HF array -> tuple of fm arrays

  @property
  def per_layer(self) -> bool:
    return '{i}' in self.hf


def expand(rules, num_layers: int):
  """[(hf name, layer index or None, rule)] for every tensor of the model."""
  out = []
  for rule in rules:
    layers = range(num_layers) if rule.per_layer else [None]
    out.extend((rule.hf.format(i=i), i, rule) for i in layers)
  return out


def locate(path: str, layer: int | None, scanned: bool):
  """(keys into the params tree, index along the stacked layer axis or None)."""
  keys = path.split('/')
  if layer is None:
    return keys, None
  if scanned:
    return ['layers'] + keys[1:], layer
  return [keys[0].format(i=layer)] + keys[1:], None


# -- transforms -------------------------------------------------------------------------------------

def identity(shape):
  """A tensor stored the same way on both sides."""
  return dict(hf_shape=tuple(shape), to_hf=lambda x: x, from_hf=lambda x: (x,))


def linear(in_shape, out_shape):
  """torch nn.Linear weight [out, in] <-> fmjax kernel in_shape + out_shape."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return dict(hf_shape=(n_out, n_in),
              to_hf=lambda k: k.reshape(n_in, n_out).T,
              from_hf=lambda w: (w.T.reshape(tuple(in_shape) + tuple(out_shape)),))


def reshape(hf_shape, fm_shape):
  """A tensor stored flat on one side and reshaped on the other (attention biases: (H*D,) <-> (H, D))."""
  return dict(hf_shape=tuple(hf_shape), to_hf=lambda x: x.reshape(hf_shape),
              from_hf=lambda w: (w.reshape(fm_shape),))


def conv1d(in_shape, out_shape):
  """GPT-2 Conv1D weight [in, out] <-> fmjax kernel in_shape + out_shape (no transpose)."""
  n_in, n_out = math.prod(in_shape), math.prod(out_shape)
  return dict(hf_shape=(n_in, n_out),
              to_hf=lambda k: k.reshape(n_in, n_out),
              from_hf=lambda w: (w.reshape(tuple(in_shape) + tuple(out_shape)),))


def fused(parts: int, lead: tuple, shape: tuple):
  """One HF tensor = `parts` fmjax tensors of `lead + shape` concatenated on the last HF axis."""
  n = math.prod(shape)
  return dict(hf_shape=tuple(lead) + (parts * n,),
              to_hf=lambda *xs: np.concatenate([x.reshape(tuple(lead) + (n,)) for x in xs], axis=-1),
              from_hf=lambda w: tuple(p.reshape(tuple(lead) + tuple(shape)) for p in np.split(w, parts, axis=-1)))


def stacked_linear(in_shape, out_shapes):
  """One torch nn.Linear weight whose output rows stack several fmjax kernels ([sum of outs, in]: Phi-3's
  qkv_proj, q then k then v rows, and gate_up_proj, gate then up) <-> fmjax kernels in_shape + out_shape each."""
  n_in, sizes = math.prod(in_shape), [math.prod(s) for s in out_shapes]
  cuts = np.cumsum(sizes)[:-1]
  return dict(hf_shape=(sum(sizes), n_in),
              to_hf=lambda *ks: np.concatenate([k.reshape(n_in, n).T for k, n in zip(ks, sizes)], axis=0),
              from_hf=lambda w: tuple(p.T.reshape(tuple(in_shape) + tuple(s))
                                      for p, s in zip(np.split(w, cuts, axis=0), out_shapes)))

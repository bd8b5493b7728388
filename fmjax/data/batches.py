"""Rows of L+1 tokens -> the model's batch format.

A row holds L+1 tokens with per-token segment ids (1, 2, ... per document, 0 = padding) and
positions (restarting at 0 where each document starts in the row; a document continued
from the previous row starts again at 0). The model batch is, for [B, L]:

  inputs      int32   row[:-1]
  targets     int32   row[1:]
  segment_ids int32   segment of each input token (0 = padding)
  positions   int32   position of each input token inside its document (within the row)
  weights     float32 1 where the target is the next token of the input's document, else 0
"""

from __future__ import annotations

import numpy as np

BATCH_KEYS = ('inputs', 'targets', 'segment_ids', 'positions', 'weights')


def pad_row(tokens: np.ndarray, length: int, pad_id: int) -> dict[str, np.ndarray]:
  """One document as one row: truncated to `length` tokens or padded with pad_id."""
  tokens = np.asarray(tokens, dtype=np.int32)[:length]
  n = len(tokens)
  row = np.full(length, pad_id, dtype=np.int32)
  row[:n] = tokens
  segment_ids = np.zeros(length, dtype=np.int32)
  segment_ids[:n] = 1
  positions = np.zeros(length, dtype=np.int32)
  positions[:n] = np.arange(n, dtype=np.int32)
  return {'tokens': row, 'segment_ids': segment_ids, 'positions': positions}


def model_batch(rows: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
  """A stacked batch of rows [B, L+1] -> the model batch [B, L] (see module docstring)."""
  tokens, seg, pos = rows['tokens'], rows['segment_ids'], rows['positions']
  same_doc = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] != 0)
  return {
      'inputs': np.ascontiguousarray(tokens[:, :-1]),
      'targets': np.ascontiguousarray(tokens[:, 1:]),
      'segment_ids': np.ascontiguousarray(seg[:, :-1]),
      'positions': np.ascontiguousarray(pos[:, :-1]),
      'weights': same_doc.astype(np.float32),
  }


def empty_batch(batch_size: int, seq_len: int, pad_id: int) -> dict[str, np.ndarray]:
  """A batch of padding only (all weights 0): fills up a short final eval batch."""
  rows = {'tokens': np.full((batch_size, seq_len + 1), pad_id, dtype=np.int32),
          'segment_ids': np.zeros((batch_size, seq_len + 1), dtype=np.int32),
          'positions': np.zeros((batch_size, seq_len + 1), dtype=np.int32)}
  return model_batch(rows)

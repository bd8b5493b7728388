"""TensorBoard event files: one written synchronously per run segment, and earlier ones cut back on resume.

A resumed run calls `drop_steps_after(directory, resume_step)` before opening its file: every earlier
event file is rewritten without the events of later steps (the steps a killed run logged after its
last checkpoint), so any reader, TensorBoard's Python loader and its Rust data server alike, shows each
step once. The new file also starts with a SessionLog START at resume_step + 1, which makes a TensorBoard
that already loaded the stale points purge them. File names sort in creation order (TensorBoard reads a
run's files in name order), also for two segments opened within the same second.
"""

from __future__ import annotations

import os
import struct
import time

from fmjax.runtime import paths

PREFIX = 'events.out.tfevents.'


class EventFile:
  """TensorBoard scalars written synchronously with tensorboardX's EventsWriter: `flush` means on disk, and a
  failed write raises here rather than killing a background thread (whose queue then blocks the run)."""

  def __init__(self, directory: str, purge_step: int | None):
    from tensorboardX.event_file_writer import EventsWriter  # imported lazily: only process 0 needs it
    from tensorboardX.proto import event_pb2, summary_pb2
    self._event_pb2, self._summary_pb2 = event_pb2, summary_pb2
    os.makedirs(directory, exist_ok=True)
    # name: events.out.tfevents.<seconds>.<host>.<nanoseconds, zero-padded>.<pid>: later files sort later
    self._events = EventsWriter(os.path.join(directory, 'events'), f'.{time.time_ns():020d}.{os.getpid()}')
    self.path = self._events._file_name  # pylint: disable=protected-access
    self._closed = False
    self.flushed_at = time.monotonic()
    if purge_step is not None:  # TensorBoard drops the earlier files' events at steps >= purge_step
      start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
      self._events.write_event(event_pb2.Event(step=purge_step, wall_time=time.time(), session_log=start))

  def scalars(self, step: int, values: dict[str, float]) -> None:
    """One event holding every scalar of a step."""
    summary = self._summary_pb2.Summary(
        value=[self._summary_pb2.Summary.Value(tag=tag, simple_value=v) for tag, v in values.items()])
    self._events.write_event(self._event_pb2.Event(step=step, wall_time=time.time(), summary=summary))

  def image(self, step: int, tag: str, pixels) -> None:
    """One event holding a PNG-encoded image."""
    from tensorboardX import summary  # pylint: disable=import-outside-toplevel
    event = self._event_pb2.Event(step=step, wall_time=time.time(),
                                  summary=summary.image(tag, pixels, dataformats='HWC'))
    self._events.write_event(event)

  def flush(self) -> None:
    self._events.flush()
    self.flushed_at = time.monotonic()

  def close(self, quiet: bool = False) -> None:
    if self._closed:
      return
    self._closed = True
    try:
      self._events.close()
    except OSError:
      if not quiet:
        raise


def records(data: bytes):
  """(framed record bytes, Event) of each whole record of an event file's bytes; a torn tail is skipped."""
  from tensorboardX.proto import event_pb2  # pylint: disable=import-outside-toplevel
  i = 0
  while i + 12 <= len(data):
    (n,) = struct.unpack('<Q', data[i:i + 8])
    end = i + 12 + n + 4          # length, its CRC, the payload, its CRC
    if end > len(data):
      return
    try:
      event = event_pb2.Event.FromString(data[i + 12:i + 12 + n])
    except Exception:  # pylint: disable=broad-except  # a garbled record: the rest cannot be framed
      return
    yield data[i:end], event
    i = end


def drop_steps_after(directory: str, last_step: int) -> int:
  """Rewrite each event file in `directory` (local or URL) without the events of steps > last_step, atomically;
  a file left with no summary is deleted. Returns how many events were dropped."""
  dropped = 0
  for name in sorted(paths.listdir(directory)):
    if not name.startswith(PREFIX):
      continue
    path = paths.join(directory, name)
    data = paths.read_bytes(path)
    kept, summaries = [], 0
    for record, event in records(data):
      if event.step > last_step:
        dropped += 1
      else:
        kept.append(record)
        summaries += event.HasField('summary')
    if not summaries:
      paths.remove(path)
    elif sum(map(len, kept)) != len(data):   # something dropped, or a torn tail cut off
      paths.write_bytes(path, b''.join(kept))
  return dropped

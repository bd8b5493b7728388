"""The train loop's data-wait metric: time in next(batches), its share, one warning."""

import time

from fmjax.training.loop import DataWait


def _slow_batches(delay):
  while True:
    time.sleep(delay)
    yield {}


def test_wait_share_and_one_warning():
  logged = []
  wait = DataWait(_slow_batches(0.004), seq_len=8, log=logged.append)
  for window in range(4):
    started = time.perf_counter()
    for _ in range(10):
      wait.next()
      time.sleep(0.004)          # the 'step': as long as the wait
    out = wait.metrics(10 * (window + 1), 10, time.perf_counter() - started)
    assert 0.3 < out['data_wait_share'] < 0.7 and 0.003 < out['data_wait_s'] < 0.02, out
  assert len(logged) == 1 and 'waited for input data' in logged[0] and 'data.worker_count' in logged[0]


def test_no_warning_when_data_is_ready_and_mixture_tokens():
  class Mixture:
    rows_seen_at = staticmethod(lambda step: {'web': 7 * step, 'code': 3 * step})

    def __next__(self):
      return {}

  logged = []
  wait = DataWait(Mixture(), seq_len=8, log=logged.append)
  for window in range(5):
    started = time.perf_counter()
    for _ in range(10):
      wait.next()
      time.sleep(0.002)
    out = wait.metrics(10 * (window + 1), 10, time.perf_counter() - started)
    assert out['data_wait_share'] < 0.1
  assert not logged
  assert out['data_tokens/web'] == 7 * 50 * 8 and out['data_tokens/code'] == 3 * 50 * 8

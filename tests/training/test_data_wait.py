"""The train loop's data-wait metric: time in next(batches), its share, one warning (on an injected clock)."""

from fmjax.training.loop import DataWait


class Clock:
  """A clock that moves only when told: the test decides how long each wait and each step takes."""

  def __init__(self):
    self.now = 0.0

  def __call__(self) -> float:
    return self.now

  def advance(self, seconds: float) -> None:
    self.now += seconds


def _batches(clock, delay):
  while True:
    clock.advance(delay)   # the loader takes `delay` seconds per batch
    yield {}


def _window(wait, clock, step_seconds, steps=10):
  started = clock()
  for _ in range(steps):
    wait.next()
    clock.advance(step_seconds)   # the device step
  return clock() - started


def test_wait_share_and_one_warning():
  clock, logged = Clock(), []
  wait = DataWait(_batches(clock, 0.004), seq_len=8, log=logged.append, clock=clock)
  for window in range(4):
    seconds = _window(wait, clock, 0.004)
    out = wait.metrics(10 * (window + 1), 10, seconds)
    assert abs(out['data_wait_share'] - 0.5) < 1e-9 and abs(out['data_wait_s'] - 0.004) < 1e-12, out
  assert len(logged) == 1 and 'waited for input data' in logged[0] and 'data.worker_count' in logged[0]
  assert '50%' in logged[0] and 'over 20 steps (to step 30)' in logged[0]   # the first window (compile) is left out


def test_no_warning_below_the_threshold():
  clock, logged = Clock(), []
  wait = DataWait(_batches(clock, 0.0009), seq_len=8, log=logged.append, clock=clock)
  for window in range(5):   # 9 % of the train time: under WARN_SHARE
    out = wait.metrics(10 * (window + 1), 10, _window(wait, clock, 0.0091))
  assert abs(out['data_wait_share'] - 0.09) < 1e-9
  assert not logged


def test_no_warning_when_data_is_ready_and_mixture_tokens():
  clock = Clock()

  class Mixture:
    rows_seen_at = staticmethod(lambda step: {'web': 7 * step, 'code': 3 * step})

    def __next__(self):
      return {}

  logged = []
  wait = DataWait(Mixture(), seq_len=8, log=logged.append, clock=clock)
  for window in range(5):
    out = wait.metrics(10 * (window + 1), 10, _window(wait, clock, 0.002))
    assert out['data_wait_share'] == 0.0
  assert not logged
  assert out['data_tokens/web'] == 7 * 50 * 8 and out['data_tokens/code'] == 3 * 50 * 8

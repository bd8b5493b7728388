"""bench --sweep: override sets, and KEY=V1,V2,... as one set per value."""

import pytest

from fmjax import config
from fmjax.perf import bench


def test_sweep_sets_and_values_of_one_key():
  assert bench.parse_sweep('a=1,b=2;a=3') == [['a=1', 'b=2'], ['a=3']]
  assert bench.parse_sweep('optim.name=adamw,muon,adafactor,lion') == [
      ['optim.name=adamw'], ['optim.name=muon'], ['optim.name=adafactor'], ['optim.name=lion']]
  assert bench.parse_sweep('a=1,2,b=x,y;c=0') == [['a=1', 'b=x'], ['a=1', 'b=y'], ['a=2', 'b=x'], ['a=2', 'b=y'],
                                                  ['c=0']]
  assert bench.parse_sweep('') == []


def test_sweep_value_without_a_key_is_one_line():
  with pytest.raises(config.ConfigError, match="'muon' follows no KEY=VALUE"):
    bench.parse_sweep('muon,a=1')

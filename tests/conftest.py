"""Force 8 host CPU devices before jax is imported, so sharding is tested on CPU."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compile-only TPU tests load libtpu in-process; without this, another JAX process on the machine
# holding libtpu's lockfile makes them fail.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# gcsfs reads this when imported: the offline GCS of tests/fake_gcs.py speaks HTTP only (no gRPC probe)
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'


import pytest  # noqa: E402  (after the environment above)


@pytest.fixture(scope='session')
def gcs():
  """An offline gs:// for the session (tests/fake_gcs.py): yields the bucket URL 'gs://fmjax-test'.

  One emulator per session: gcsfs, etils and TensorStore keep their endpoint once they have used it."""
  import importlib.util
  for module, why in (('gcp_storage_emulator', 'the fake GCS needs gcp-storage-emulator (the test extra)'),
                      ('gcsfs', 'gs:// paths need gcsfs (the gcs extra)')):
    if importlib.util.find_spec(module) is None:
      pytest.skip(why)
  import fake_gcs
  with fake_gcs.fake_gcs('fmjax-test'):
    yield 'gs://fmjax-test'


_PRETRAINED = {}


@pytest.fixture(scope='session')
def pretrained(tmp_path_factory):
  """(config, final params) of a tiny model pretrained in-process for 4 steps (once per session)."""
  if not _PRETRAINED:
    from helpers import pretrain_tiny
    _PRETRAINED['run'] = pretrain_tiny(tmp_path_factory.mktemp('pretrain'))
  return _PRETRAINED['run']

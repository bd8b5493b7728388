"""Force 8 host CPU devices before jax is imported, so sharding is tested on CPU."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compile-only TPU tests load libtpu in-process; without this, another JAX process on the machine
# holding libtpu's lockfile makes them fail.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')
# One XLA compilation cache for the session and the CLI runs it starts (they inherit the environment):
# the same tiny programs compile in many tests, and a cache hit replaces a compile. Fresh per session,
# so a run only reuses its own compiles; FMJAX_TEST_COMPILATION_CACHE=0 turns it off.
if os.environ.get('FMJAX_TEST_COMPILATION_CACHE', '1') != '0' and 'JAX_COMPILATION_CACHE_DIR' not in os.environ:
  import atexit
  import shutil
  import tempfile
  _CACHE = tempfile.mkdtemp(prefix='fmjax-tests-xla-cache-')
  atexit.register(shutil.rmtree, _CACHE, True)
  os.environ['JAX_COMPILATION_CACHE_DIR'] = _CACHE
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0')
  os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES', '0')
# gcsfs reads this when imported: the offline GCS of tests/fake_gcs.py speaks HTTP only (no gRPC probe)
os.environ['GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT'] = 'false'


import pathlib  # noqa: E402

import pytest  # noqa: E402  (after the environment above)

_TESTS = pathlib.Path(__file__).parent
# Markers by what a test needs (declared in pyproject.toml): select with -m, e.g. `pytest -m "not hf"`.
_HF_USES = ('import torch', 'import transformers', "importorskip('torch')", "importorskip('transformers')",
            'from hf_models import')
_SOURCES = {}


def _source(path: pathlib.Path) -> str:
  if path not in _SOURCES:
    _SOURCES[path] = path.read_text() if path.suffix == '.py' else ''
  return _SOURCES[path]


def pytest_collection_modifyitems(config, items):
  """Mark every test by where it lives and what it uses: e2e (tests/e2e/ and other whole-run tests
  marked slow), hf (modules that use torch/transformers), tpu_compile (compile-only TPU programs
  with libtpu), gcs (the offline gs:// fixture)."""
  for item in items:
    path = pathlib.Path(str(item.fspath)).resolve()
    if _TESTS / 'e2e' in path.parents or item.get_closest_marker('slow'):
      item.add_marker(pytest.mark.e2e)
    if any(use in _source(path) for use in _HF_USES):
      item.add_marker(pytest.mark.hf)
    if path.name == 'test_tpu_compile.py' or 'tpu' in item.name.split('[')[0].split('_'):
      item.add_marker(pytest.mark.tpu_compile)
    if 'gcs' in getattr(item, 'fixturenames', ()):
      item.add_marker(pytest.mark.gcs)


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

"""A mesh that does not fit the devices is one line naming the fix, and the fix it names works."""

import os
import re
import subprocess
import sys

import jax
import pytest

from fmjax.parallel import sharding as shd

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _error(mesh, devices):
  with pytest.raises(shd.MeshError) as e:
    shd.make_mesh(mesh, devices)
  message = str(e.value)
  assert '\n' not in message
  return message


def test_readme_tensor_2_on_one_cpu_device_names_the_cpu_fix():
  """README's training example (--config.mesh.tensor=2, fsdp=-1 by default) on a 1-device machine."""
  message = _error(dict(data=1, fsdp=-1, tensor=2), jax.devices()[:1])
  assert message.startswith('mesh data=1 fsdp=-1 tensor=2 needs a multiple of 2 devices but 1 is available (cpu)')
  assert message.endswith('to try this mesh on CPU, run with XLA_FLAGS=--xla_force_host_platform_device_count=2')


def test_a_fixed_mesh_names_the_devices_it_needs_and_the_cpu_fix():
  message = _error(dict(data=1, fsdp=1, tensor=2), jax.devices()[:1])
  assert message.startswith('mesh data=1 fsdp=1 tensor=2 needs 2 devices but 1 is available (cpu); '
                            'set --config.mesh.tensor so the product is 1')
  assert 'xla_force_host_platform_device_count=2' in message
  message = _error(dict(data=3, fsdp=3, tensor=1), jax.devices())
  assert 'needs 9 devices but 8 are available (cpu)' in message and 'device_count=9' in message


def test_a_mesh_smaller_than_the_machine_only_asks_for_the_product():
  message = _error(dict(data=1, fsdp=2, tensor=1), jax.devices())
  assert message == 'mesh data=1 fsdp=2 tensor=1 needs 2 devices but 8 are available (cpu); set --config.mesh.fsdp so ' \
                    'the product is 8'


def test_on_accelerators_the_hint_is_more_devices():
  with pytest.raises(shd.MeshError, match=r'needs 16 devices but 4 are available \(tpu\); .* with 16 devices$'):
    shd.mesh_shape(dict(data=1, fsdp=16, tensor=1), 4, 'tpu')


def test_the_named_fix_runs_the_mesh():
  """The XLA_FLAGS of the message, set before the command, give the mesh its devices."""
  message = _error(dict(data=1, fsdp=-1, tensor=2), jax.devices()[:1])
  flags = re.search(r'XLA_FLAGS=(\S+)', message).group(1)
  env = dict(os.environ, XLA_FLAGS=flags, JAX_PLATFORMS='cpu')
  env['PYTHONPATH'] = os.pathsep.join(p for p in [ROOT, env.get('PYTHONPATH', '')] if p)
  code = ('from fmjax.parallel import sharding as shd\n'
          'print(shd.describe(shd.make_mesh(dict(data=1, fsdp=-1, tensor=2))))')
  done = subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr[-2000:]
  assert done.stdout.strip() == 'data=1 fsdp=1 tensor=2 (2 devices, cpu)'


def test_the_train_command_on_one_device_prints_the_fix(tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'XLA_FLAGS'}
  env.update(JAX_PLATFORMS='cpu', PYTHONPATH=os.pathsep.join(p for p in [ROOT, env.get('PYTHONPATH', '')] if p))
  done = subprocess.run([sys.executable, '-m', 'fmjax.train', '--config', 'default', '--workdir', str(tmp_path / 'w'),
                         '--config.model.num_layers=2', '--config.steps=200', '--config.mesh.tensor=2'],
                        env=env, capture_output=True, text=True, timeout=300, cwd=tmp_path)
  assert done.returncode == 2, done.stderr[-2000:]
  error = done.stderr.strip().splitlines()[-1]
  assert error.startswith('fmjax.train: error: mesh data=1 fsdp=-1 tensor=2 needs a multiple of 2 devices but 1 is '
                          'available (cpu)'), done.stderr[-2000:]
  assert error.endswith('XLA_FLAGS=--xla_force_host_platform_device_count=2')


def test_the_error_names_the_axis_that_does_not_fit():
  with pytest.raises(shd.MeshError, match=r'^mesh data=1 fsdp=1 sequence=3 tensor=1 needs 3 devices but 8 are '
                                          r'available \(cpu\); set --config.mesh.sequence so the product is 8$'):
    shd.mesh_shape(dict(data=1, fsdp=1, sequence=3, tensor=1), 8, 'cpu')
  with pytest.raises(shd.MeshError, match=r'mesh.sequence'):
    shd.mesh_shape(dict(fsdp=-1, sequence=3), 8, 'cpu')


def test_a_dcn_axis_on_one_slice_is_one_line_before_compiling():
  with pytest.raises(shd.MeshError) as e:
    shd.make_mesh(dict(data=1, fsdp=-1, dcn=dict(data=2)))
  message = str(e.value)
  assert '\n' not in message
  assert message.startswith('mesh.dcn.data=2 spans 2 slices but the 8 devices form one slice (cpu)')


def test_dcn_sizes_must_match_the_slices():
  with pytest.raises(shd.MeshError, match=r'^the devices form 2 slices but mesh.dcn.\* spans 4 \(mesh.dcn.data=4\)'):
    shd.mesh_shape(dict(fsdp=-1, dcn=dict(data=4)), 8, 'tpu', num_slices=2)
  with pytest.raises(shd.MeshError, match=r'mesh.dcn.tensor is not an axis that can span slices'):
    shd.mesh_shape(dict(fsdp=-1, dcn=dict(tensor=2)), 8, 'tpu', num_slices=2)
  # per slice, then across: data = 1 x 2, fsdp = 4 x 1
  assert shd.mesh_shape(dict(data=1, fsdp=-1, dcn=dict(data=2)), 8, 'tpu', num_slices=2) == (2, 4, 1, 1, 1)
  assert shd.mesh_shapes(dict(data=1, fsdp=-1, dcn=dict(data=2)), 8, 'tpu', num_slices=2) == ((1, 4, 1, 1, 1),
                                                                                           (2, 1, 1, 1, 1))

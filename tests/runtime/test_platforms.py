"""JAX's platforms are chosen before it starts: libtpu only on TPU hosts, the user's JAX_PLATFORMS first."""

import importlib.util
import os
import re
import subprocess
import sys

import pytest

from fmjax.runtime import platforms


def _touch(root, *paths, text=''):
  for path in paths:
    full = root / path
    full.parent.mkdir(parents=True, exist_ok=True)
    full.write_text(text)


def _pci(root, slot, vendor, device):
  _touch(root, f'sys/bus/pci/devices/{slot}/vendor', text=f'{vendor}\n')
  _touch(root, f'sys/bus/pci/devices/{slot}/device', text=f'{device}\n')


def test_a_plain_machine_gets_cpu_and_an_nvidia_one_cuda_when_the_plugin_is_installed(tmp_path):
  assert platforms.choice({}, str(tmp_path), plugins=[]) == 'cpu'
  assert platforms.choice({}, str(tmp_path), plugins=['xla_cuda12']) == 'cpu'   # plugin, no GPU
  _touch(tmp_path, 'dev/nvidia0', 'dev/nvidiactl')
  assert platforms.choice({}, str(tmp_path), plugins=[]) == 'cpu'               # GPU, no plugin
  assert platforms.choice({}, str(tmp_path), plugins=['xla_cuda12']) == 'cuda,cpu'
  _touch(tmp_path, 'dev/kfd')
  assert platforms.choice({}, str(tmp_path), plugins=['xla_cuda13', 'xla_rocm7']) == 'cuda,rocm,cpu'


def test_an_unknown_plugin_is_left_to_jax(tmp_path):
  assert platforms.choice({}, str(tmp_path), plugins=['xla_cuda12', 'some_accelerator']) is None


@pytest.mark.parametrize('device', ['dev/accel0', 'dev/vfio/0'])
def test_tpu_device_files_leave_the_choice_to_jax(tmp_path, device):
  _touch(tmp_path, 'dev/vfio/vfio')   # the vfio control file alone is on many machines: not a TPU
  assert platforms.choice({}, str(tmp_path), plugins=[]) == 'cpu'
  _touch(tmp_path, device)
  assert platforms.tpu_host_evidence({}, str(tmp_path)).endswith(device)
  assert platforms.choice({}, str(tmp_path), plugins=[]) is None


def test_a_tpu_pci_device_is_a_tpu_host_but_other_google_devices_are_not(tmp_path):
  _pci(tmp_path, '0000:00:04.0', '0x1ae0', '0x0042')   # gVNIC
  _pci(tmp_path, '0000:00:05.0', '0x8086', '0x0062')
  assert platforms.tpu_pci_devices(str(tmp_path)) == 0
  assert platforms.choice({}, str(tmp_path), plugins=[]) == 'cpu'
  _pci(tmp_path, '0000:00:06.0', '0x1ae0', '0x0062')   # v5p
  assert platforms.tpu_pci_devices(str(tmp_path)) == 1
  assert platforms.choice({}, str(tmp_path), plugins=[]) is None


@pytest.mark.parametrize('name', ['TPU_WORKER_HOSTNAMES', 'TPU_ACCELERATOR_TYPE', 'TPU_NAME', 'CLOUD_TPU_TASK_ID'])
def test_tpu_vm_environment_leaves_the_choice_to_jax(tmp_path, name):
  assert platforms.choice({name: ''}, str(tmp_path), plugins=[]) == 'cpu'   # empty: not set
  assert platforms.choice({name: 'v5p-8'}, str(tmp_path), plugins=[]) is None


@pytest.mark.parametrize('setting', [{'JAX_PLATFORMS': 'tpu'}, {'JAX_PLATFORMS': ''}, {'JAX_PLATFORM_NAME': 'cpu'}])
def test_the_users_setting_wins(tmp_path, setting):
  env = dict(setting)
  assert platforms.choose(env, str(tmp_path), plugins=[]) is None
  assert env == setting


def _run(code, env):
  return subprocess.run([sys.executable, '-c', code], env=env, capture_output=True, text=True, timeout=300)


def _env_without_platforms():
  env = {k: v for k, v in os.environ.items() if k not in platforms.USER_SETTINGS}
  env['PYTHONPATH'] = os.pathsep.join(p for p in [os.getcwd(), env.get('PYTHONPATH', '')] if p)
  return env


def test_choose_sets_the_environment_before_jax_and_the_option_after_its_import(tmp_path):
  """In fresh processes: before jax is imported the environment gets JAX_PLATFORMS; after its import but
  before a backend exists, jax's option; once a backend has started, nothing changes."""
  root = str(tmp_path)
  code = ('import sys\nfrom fmjax.runtime import platforms\nenv = {}\n'
          f'print(platforms.choose(env, {root!r}, plugins=[]), env, "jax" in sys.modules)\n')
  done = _run(code, _env_without_platforms())
  assert done.returncode == 0, done.stderr
  assert done.stdout.strip() == "cpu {'JAX_PLATFORMS': 'cpu'} False"
  code = ('import jax\nfrom fmjax.runtime import platforms\n'
          f'print(platforms.choose({{}}, {root!r}, plugins=[]), jax.config.jax_platforms)\n'
          'jax.devices()\n'
          'jax.config.update("jax_platforms", None)\n'
          f'print(platforms.choose({{}}, {root!r}, plugins=[]))\n')
  done = _run(code, _env_without_platforms())
  assert done.returncode == 0, done.stderr
  assert done.stdout.split() == ['cpu', 'cpu', 'None']


def test_on_this_machine_jax_starts_without_libtpu_lines():
  """With libtpu installed and no JAX_PLATFORMS, choose() keeps JAX's start silent off a TPU host."""
  if importlib.util.find_spec('libtpu') is None or platforms.tpu_host_evidence():
    pytest.skip('needs libtpu installed on a machine that is not a TPU host')
  done = _run('from fmjax.runtime import platforms\nplatforms.choose()\nimport jax\nprint(jax.devices()[0].platform)',
              _env_without_platforms())
  assert done.returncode == 0, done.stderr
  lines = (done.stdout + done.stderr).splitlines()
  assert done.stdout.split()[-1] == 'cpu'
  assert not [line for line in lines if re.search(r'\b(lib)?tpu\b|\bTPU_[A-Z]', line, re.IGNORECASE)], lines

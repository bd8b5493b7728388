"""Force 8 host CPU devices before jax is imported, so sharding is tested on CPU."""

import os

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') + ' --xla_force_host_platform_device_count=8').strip()
os.environ.setdefault('JAX_PLATFORMS', 'cpu')
# Compile-only TPU tests load libtpu in-process; without this, another JAX process on the machine
# holding libtpu's lockfile makes them fail.
os.environ.setdefault('ALLOW_MULTIPLE_LIBTPU_LOAD', '1')

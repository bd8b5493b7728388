"""Compile-only TPU verification: the real train path compiled for TPU topologies with libtpu.

No TPU is needed: `jax.experimental.topologies` gives compile-only devices of a topology and
XLA's TPU compiler runs on this CPU host. The programs are what `fmjax.train` builds (through
`build.build_lm_run`, the same builder), with model.attention=auto resolved for the target: the
Pallas splash kernel must be in the compiled program, forward and backward.
"""

from __future__ import annotations

import re

import jax
import pytest

pytest.importorskip('libtpu', reason='TPU compile tests need the tpu extra (pip install -e ".[test]" installs it)')

from fmjax.training import build  # noqa: E402
from fmjax.perf import flops as metrics
from fmjax.perf import plan
from fmjax.parallel import sharding as shd  # noqa: E402
from helpers import tiny_config  # noqa: E402

# (topology as users name it, chips, processes of the slice)
TOPOLOGIES = [('v5p-8', 4, 1), ('v6e-8', 8, None), ('v4-8', 4, 1), ('v5p-16', 8, 2)]
SPLASH_KERNELS = ('splash_mha_fwd', 'splash_mha_dkv', 'splash_mha_dq')


def splash_config(**top):
  """A small model the splash kernel tiles (seq 256, head dim 128), FSDP over the whole slice."""
  cfg = tiny_config(d_model=256, num_heads=2, num_kv_heads=1, head_dim=128, mlp_dim=512, vocab_size=512,
                    max_seq_len=256)
  cfg.seq_len, cfg.global_batch_size = 256, 8
  cfg.model.attention = 'auto'
  for k, v in top.items():
    cfg[k] = v
  return cfg


def kernels(compiled) -> set[str]:
  """Names of the Pallas TPU kernels (custom calls) in a compiled program."""
  text = compiled.as_text()
  return {name for line in text.splitlines() if 'tpu_custom_call' in line
          for name in re.findall(r'%(splash_mha_\w+?)(?:_segmented\w*)?\.\d+ =', line)}


@pytest.fixture(scope='module', params=TOPOLOGIES, ids=[t[0] for t in TOPOLOGIES])
def compiled_run(request):
  name, chips, processes = request.param
  kind, expected_chips = plan.parse_topology(name)
  devices = plan.tpu_devices(name)
  assert len(devices) == chips == expected_chips, (name, len(devices))
  if processes:
    assert len({d.process_index for d in devices}) == processes
  cfg = splash_config()
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, devices))
  return kind, run


def test_train_step_runs_splash_forward_and_backward(compiled_run):
  _, run = compiled_run
  assert run.cfg.model.attention == 'auto'
  found = kernels(run.train_step)
  assert {k for k in SPLASH_KERNELS if any(f.startswith(k) for f in found)} == set(SPLASH_KERNELS), found


def test_state_is_sharded_as_the_rules_say(compiled_run):
  _, run = compiled_run
  chips = run.mesh.size
  state_in = run.train_step.input_shardings[0][0]
  # rules: vocab -> tensor (1 way here), embed -> fsdp (every chip): the (vocab, embed) table is split on embed
  assert state_in.params['embedding'].shard_shape((512, 256)) == (512, 256 // chips)
  flat_params = jax.tree_util.tree_leaves_with_path(run.state.shardings.params)
  compiled_params = jax.tree_util.tree_leaves(state_in.params)
  assert [s.spec for _, s in flat_params] == [s.spec for s in compiled_params]
  # optimizer moments follow their parameters
  mu_specs = [s.spec for p, s in jax.tree_util.tree_leaves_with_path(state_in.opt_state)
              if 'embedding' in jax.tree_util.keystr(p)]
  assert mu_specs and all(spec == state_in.params['embedding'].spec for spec in mu_specs)


def test_fits_the_chip(compiled_run):
  kind, run = compiled_run
  mem = run.train_step.memory_analysis()
  used = mem.argument_size_in_bytes + mem.temp_size_in_bytes
  assert 0 < used < metrics.ACCELERATORS[kind].hbm_gib * 2**30


def test_init_and_eval_compile_for_the_slice(compiled_run):
  _, run = compiled_run
  init = run.init.lower(jax.random.PRNGKey(0)).compile()
  assert jax.tree.structure(init.output_shardings) == jax.tree.structure(run.state.shardings)
  evaluate = run.jit_eval_step().lower(run.state.abstract.params, run.abstract_batch()).compile()
  assert any(k.startswith('splash_mha_fwd') for k in kernels(evaluate))


# Fine-tuning and decoding: the same checks on a single-host and a multi-host slice (within CI's time).
SLICES = [('v5p-8', 4), ('v5p-16', 8)]


@pytest.mark.parametrize('name,chips', SLICES, ids=[s[0] for s in SLICES])
def test_finetune_classifier_step_compiles_with_splash_lora_and_the_head(name, chips):
  """The fine-tuning task as `finetune` builds it (finetune.parts.task through build.build_run):
  LoRA adapters and a classification head, splash forward and backward, sharded, within the chip."""
  from fmjax.finetune import parts
  from fmjax.objectives.classification import HEAD
  kind, _ = plan.parse_topology(name)
  cfg = splash_config()
  cfg.finetune.task, cfg.finetune.lora_rank = 'classify', 8
  run = build.build_run(cfg, shd.make_mesh(cfg.mesh, plan.tpu_devices(name)), parts.task(cfg, num_classes=3))
  assert run.mesh.size == chips
  found = kernels(run.train_step)
  assert {k for k in SPLASH_KERNELS if any(f.startswith(k) for f in found)} == set(SPLASH_KERNELS), found
  params = run.train_step.input_shardings[0][0].params
  assert HEAD in params and any('lora' in jax.tree_util.keystr(p).lower()
                                for p, _ in jax.tree_util.tree_leaves_with_path(params))
  assert params['embedding'].shard_shape((512, 256)) == (512, 256 // chips)   # the base as in pretraining
  mem = run.train_step.memory_analysis()
  assert 0 < mem.argument_size_in_bytes + mem.temp_size_in_bytes < metrics.ACCELERATORS[kind].hbm_gib * 2**30


@pytest.mark.parametrize('name,chips', SLICES, ids=[s[0] for s in SLICES])
def test_generate_prefill_and_decode_loop_compile_for_the_slice(name, chips):
  """`generate`'s decoder (decode.compile_decoder: prefill + the decode loop) compiled for the slice, on
  the parameters' training shardings; the KV cache is split over the batch axes and fits the chip."""
  from fmjax.inference import decode
  kind, _ = plan.parse_topology(name)
  cfg = splash_config()
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, plan.tpu_devices(name)), compile_step=False)
  decoder = decode.Decoder(run.model, max_new_tokens=8, eos_id=1, pad_id=0)
  batch, width = chips, 128
  prefill, loop = decode.compile_decoder(decoder, run.state.abstract.params, run.mesh, run.rules, batch, width)
  cache_in, cache_args = loop.input_shardings[0][1], loop.args_info[0][1]
  keys = [(s, a.shape) for (p, s), a in zip(jax.tree_util.tree_leaves_with_path(cache_in),
                                            jax.tree_util.tree_leaves(cache_args))
          if jax.tree_util.keystr(p).endswith("['key']")]
  assert keys and all(shape[-4] == batch for _, shape in keys)
  assert all(s.shard_shape(shape)[-4] == batch // chips for s, shape in keys)   # rows split over the chips
  for compiled in (prefill, loop):
    mem = compiled.memory_analysis()
    assert 0 < mem.argument_size_in_bytes + mem.temp_size_in_bytes < metrics.ACCELERATORS[kind].hbm_gib * 2**30


def _int8_dots(compiled) -> int:
  """Matmuls (dot or convolution) of the compiled TPU program whose two operands are int8 (the MXU's
  int8 path; XLA may fuse the rescale's convert into the matmul's output type)."""
  text = compiled.as_text()
  types = dict(re.findall(r'%([\w.\-]+) = ([a-z0-9]+)\[', text))
  count = 0
  for operands in re.findall(r'= \S+ (?:dot|convolution)\(([^)]*)\)', text):
    names = re.findall(r'%([\w.\-]+)', operands)
    count += len(names) == 2 and all(types.get(n) == 's8' for n in names)
  return count


@pytest.mark.slow   # a 1.1B-parameter train step compiled twice for TPU: with the slow suite (CI runs both)
@pytest.mark.parametrize('name', ['v5p-8', 'v6e-8'])
def test_llama_1b_trains_int8_on_the_slice(name):
  """configs/llama_1b.py with model.quantization=int8, compiled for the slice: the projection matmuls of
  the forward and backward passes are int8 on the MXU, splash still runs, and the step fits the chip at
  a global batch of 8 sequences per chip."""
  import os
  if name != 'v5p-8' and os.environ.get('FMJAX_TEST_ALL_PRESET_SLICES') != '1':
    pytest.skip('v6e-8 compiles with FMJAX_TEST_ALL_PRESET_SLICES=1 (CI time)')
  from fmjax import cli, config as config_lib
  kind, chips = plan.parse_topology(name)
  cfg = config_lib.resolve(cli.config_path('llama_1b'), ['--config.model.quantization=int8'])
  cfg.global_batch_size, cfg.microbatches = 8 * chips, 1
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, plan.tpu_devices(name)))
  found = kernels(run.train_step)
  assert {k for k in SPLASH_KERNELS if any(f.startswith(k) for f in found)} == set(SPLASH_KERNELS), found
  # 7 projections per layer (one scanned body): forward, input gradient and weight gradient each
  assert _int8_dots(run.train_step) >= 3 * 7, _int8_dots(run.train_step)
  mem = run.train_step.memory_analysis()
  assert 0 < mem.argument_size_in_bytes + mem.temp_size_in_bytes < metrics.ACCELERATORS[kind].hbm_gib * 2**30
  print(f'{name}: {_int8_dots(run.train_step)} int8 matmuls; arguments {mem.argument_size_in_bytes / 2**30:.2f} '
        f'GiB, temporaries {mem.temp_size_in_bytes / 2**30:.2f} GiB per chip')


# The presets of the 2026 families, each compiled as shipped (its batch, sequence and microbatches) for a
# TPU slice. A compile takes 70-170 s on a 2-core CPU, so CI compiles the two whose attention is new
# (Gemma's local layers, Gemma 2's soft-cap), one per slice; FMJAX_TEST_ALL_PRESET_SLICES=1 compiles every
# preset for both slices.
PRESET_SLICES = [('gemma3_1b', 'v5p-8'), ('gemma2_2b', 'v6e-8'), ('qwen3_0_6b', 'v6e-8'), ('qwen2_5_1_5b', 'v5p-8'),
                 ('qwen3_0_6b', 'v5p-8'), ('qwen2_5_1_5b', 'v6e-8'), ('gemma3_1b', 'v6e-8'), ('gemma2_2b', 'v5p-8')]


@pytest.mark.slow
@pytest.mark.parametrize('preset,name', PRESET_SLICES, ids=[f'{p}-{n}' for p, n in PRESET_SLICES])
def test_family_presets_compile_with_splash_and_fit(preset, name):
  """The preset's real shapes: splash forward and backward in the compiled step (Gemma's local layers
  with the local mask, Gemma 2's soft-cap in the kernel), the state sharded over the slice, and the
  step within the chip's memory; the FLOP count has each local layer attend its window."""
  import os
  from fmjax import cli, config as config_lib
  from fmjax.model import attention_spec
  if PRESET_SLICES.index((preset, name)) >= 1 and os.environ.get('FMJAX_TEST_ALL_PRESET_SLICES') != '1':
    pytest.skip('the other presets and slices compile with FMJAX_TEST_ALL_PRESET_SLICES=1')
  kind, chips = plan.parse_topology(name)
  cfg = config_lib.resolve(cli.config_path(preset), [])
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, plan.tpu_devices(name)))
  found = kernels(run.train_step)
  assert {k for k in SPLASH_KERNELS if any(f.startswith(k) for f in found)} == set(SPLASH_KERNELS), found
  mem = run.train_step.memory_analysis()
  used = mem.argument_size_in_bytes + mem.temp_size_in_bytes
  assert 0 < used < metrics.ACCELERATORS[kind].hbm_gib * 2**30
  m, t = cfg.model, cfg.seq_len
  local = sum(attention_spec.is_local(m, i) for i in range(m.num_layers))
  w = min(m.sliding_window or t, t)
  keys = local * (w * (w + 1) / 2 + (t - w) * w) / t + (m.num_layers - local) * (t + 1) / 2
  assert metrics.attended_keys(m, t) == pytest.approx(keys)
  print(f'{preset} on {name}: {used / 2**30:.1f} GiB per chip of {metrics.ACCELERATORS[kind].hbm_gib}; '
        f'{local} local layers; {metrics.flops_per_token(m, t):.3g} FLOPs per token')


def _pallas_calls(compiled) -> set[str]:
  """Names of every Pallas TPU kernel (custom call) in a compiled program."""
  lines = [line for line in compiled.as_text().splitlines() if 'tpu_custom_call' in line]
  return set(re.findall(r'%([a-zA-Z_]+?)(?:\.\d+)* = ', '\n'.join(lines)))


def test_moe_step_runs_megablox_over_an_expert_axis_on_v5p_8():
  """A small MoE (8 experts, top-2) on v5p-8 as expert=4: the dropless grouped matmuls are megablox's
  gmm (forward, input gradient) and tgmm (weight gradient) Pallas kernels beside splash."""
  cfg = splash_config(mesh=dict(data=1, fsdp=1, expert=4, tensor=1))
  cfg.model.update(dict(num_experts=8, num_experts_per_tok=2, moe_mlp_dim=256, dtype='bfloat16'))
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, plan.tpu_devices('v5p-8')))
  found = _pallas_calls(run.train_step)
  assert {'gmm', 'tgmm'} <= found and any(k.startswith('splash_mha_dq') for k in found), found
  wi = run.state.shardings.params['layers']['moe']['wi_0']
  assert wi.spec[1] == 'expert', wi.spec


@pytest.mark.slow   # 30B parameters compiled for 16 chips (about 150 s on a 2-core CPU)
def test_qwen3_moe_preset_compiles_with_megablox_and_fits_v5p_32():
  """configs/qwen3_moe_small.py as shipped (Qwen3-30B-A3B's shapes, expert=8 x fsdp=2 on v5p-32): megablox
  and splash in the step, and the step within the chip's memory; FLOPs count the 3.35B active parameters.
  With FMJAX_TEST_ALL_PRESET_SLICES=1 (CI time: the tiny MoE step above compiles megablox for v5p-8)."""
  import os
  if os.environ.get('FMJAX_TEST_ALL_PRESET_SLICES') != '1':
    pytest.skip('the Qwen3-MoE preset compiles with FMJAX_TEST_ALL_PRESET_SLICES=1 (CI time)')
  from fmjax import cli, config as config_lib
  cfg = config_lib.resolve(cli.config_path('qwen3_moe_small'), [])
  kind, _ = plan.parse_topology(cfg.topology)
  run = build.build_lm_run(cfg, shd.make_mesh(cfg.mesh, plan.tpu_devices(cfg.topology)))
  assert {'gmm', 'tgmm'} <= _pallas_calls(run.train_step)
  mem = run.train_step.memory_analysis()
  used = mem.argument_size_in_bytes + mem.temp_size_in_bytes
  assert 0 < used < metrics.ACCELERATORS[kind].hbm_gib * 2**30
  active = metrics.matmul_params(cfg.model)
  assert 3.0e9 < active < 3.5e9, active
  print(f'qwen3_moe_small on {cfg.topology}: {used / 2**30:.1f} GiB per chip; {active / 1e9:.2f}B active matmul '
        'parameters')

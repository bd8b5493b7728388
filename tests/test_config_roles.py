"""Field roles: every option declares one beside its default, and the checkpoint and resume checks
follow them; plus the config's one-line messages for a near-miss key and seq_len beyond max_seq_len."""

import logging
import os

import pytest

from fmjax import config
from fmjax.checkpoints import resume, store
from fmjax.config import roles, schema

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT = os.path.join(ROOT, 'configs', 'default.py')


def _other(value):
  """A value of the same type that differs from `value` (the checks compare, they do not validate)."""
  if isinstance(value, bool):
    return not value
  if isinstance(value, int):
    return value + 1
  if isinstance(value, float):
    return value * 2 + 1
  if isinstance(value, str):
    return value + '_changed'
  return tuple(value) + (('changed', None),)


def _model_fields(*wanted):
  return [k for k, r in config.ROLES.items() if k.startswith('model.') and r in wanted]


# Every option has a role -------------------------------------------------------------------------

def test_every_field_of_every_section_has_a_role():
  cfg = config.base_config()
  assert config.missing_roles(cfg, config.ROLES) == []
  sections = {k for k in cfg.keys() if hasattr(cfg[k], 'keys')}
  assert {'model', 'data', 'mesh', 'optim', 'finetune', 'mlm'} <= sections == {k.split('.')[0] for k in config.ROLES
                                                                              if '.' in k}
  assert all(r in roles.MODEL_ROLES for k, r in config.ROLES.items() if k.startswith('model.'))
  assert all(r in roles.RUN_ROLES for k, r in config.ROLES.items() if not k.startswith('model.'))


def test_a_model_field_added_without_a_role_fails_the_check(monkeypatch):
  cfg = config.base_config()
  with cfg.model.unlocked():
    cfg.model.qkv_bias = False            # added to the config, not declared with field()
  assert config.missing_roles(cfg, config.ROLES) == ['model.qkv_bias']
  monkeypatch.setitem(schema.MODEL, 'qkv_bias', False)   # declared in the schema without field()
  with pytest.raises(TypeError, match=r'config option model\.qkv_bias declares no role'):
    config.base_config()
  with pytest.raises(TypeError, match=r'model\.qkv_bias declares no role'):
    roles.collect(schema.SCHEMA)


def test_roles_outside_the_vocabulary_or_the_section_are_refused():
  with pytest.raises(ValueError, match="unknown field role 'shapes'"):
    roles.field(0, 'shapes')
  with pytest.raises(ValueError, match="model.qk_norm has role 'run'"):
    roles.collect({'model': {'qk_norm': roles.field(False, roles.RUN)}})
  with pytest.raises(ValueError, match="steps has role 'shape'"):
    roles.collect({'steps': roles.field(1, roles.SHAPE)})


def test_derived_key_lists_follow_the_roles():
  from fmjax.checkpoints import restore
  assert 'd_model' in store.SHAPE_KEYS and 'rope_theta' in store.FUNCTION_KEYS and 'dtype' in restore.MUTABLE_MODEL_KEYS
  model_keys = set(config.model_defaults().keys())
  mutable = set(restore.MUTABLE_MODEL_KEYS) - {'lora'}
  assert set(store.SHAPE_KEYS) | set(store.FUNCTION_KEYS) | mutable == model_keys     # every model field, once
  assert not (set(store.SHAPE_KEYS) | set(store.FUNCTION_KEYS)) & mutable
  assert 'model.attention' in resume.HARMLESS and 'model.dropout' in resume.RUN_DEFINING
  assert 'workdir' in resume.NOT_COMPARED and 'finetune.lora_rank' in resume.FINETUNE_DEFINING


# check_compatible: shape and function fields refuse, restore and resume fields pass ----------------

def _meta():
  cfg = config.base_config()
  return store.make_metadata(cfg), cfg.model


def _refusal(meta, model_cfg):
  with pytest.raises(store.CheckpointError) as e:
    store.check_compatible(meta, model_cfg, 'W/checkpoints/7')
  text = str(e.value)
  assert '\n' not in text
  return text


@pytest.mark.parametrize('role', [roles.SHAPE, roles.FUNCTION])
def test_check_compatible_refuses_a_checkpoint_differing_in_a_defining_field(role):
  for key in _model_fields(role):
    meta, model_cfg = _meta()
    leaf = key.split('.')[1]
    model_cfg[leaf] = _other(model_cfg[leaf])
    text = _refusal(meta, model_cfg)
    assert text.startswith(f'checkpoint W/checkpoints/7 has model.{leaf}={meta["model"][leaf]!r} but the config '
                           f'has {model_cfg[leaf]!r}'), text


def test_check_compatible_names_one_shape_and_one_function_field_with_both_values():
  meta, model_cfg = _meta()
  model_cfg.d_model = 96
  assert 'model.d_model=128 but the config has 96' in _refusal(meta, model_cfg)
  meta, model_cfg = _meta()
  model_cfg.rope_theta = 500000.0           # same shapes, another function
  assert 'model.rope_theta=10000.0 but the config has 500000.0' in _refusal(meta, model_cfg)


@pytest.mark.parametrize('role', [roles.RESTORE, roles.RESUME])
def test_check_compatible_accepts_a_change_of_a_restore_or_resume_field(role):
  for key in _model_fields(role):
    if key == 'model.scan_layers':           # the saved layout is checked on its own (it changes the tree)
      continue
    meta, model_cfg = _meta()
    leaf = key.split('.')[1]
    model_cfg[leaf] = _other(model_cfg[leaf])
    store.check_compatible(meta, model_cfg, 'W/checkpoints/7')
  meta, model_cfg = _meta()
  model_cfg.dtype, model_cfg.dropout, model_cfg.attention = 'bfloat16', 0.1, 'chunked'
  store.check_compatible(meta, model_cfg, 'W/checkpoints/7')


def test_old_metadata_without_a_later_field_counts_as_its_default():
  meta, model_cfg = _meta()
  del meta['model']['rope_scaling']          # a checkpoint written before the field existed
  store.check_compatible(meta, model_cfg, 'W/checkpoints/7')
  model_cfg.rope_scaling = 'llama3'
  assert "model.rope_scaling='none' (absent from its metadata: the default) but the config has 'llama3'" in \
      _refusal(meta, model_cfg)
  store.check_compatible({}, model_cfg, 'W/checkpoints/7')   # no model metadata at all: nothing to compare


# Resume: run-defining changes refuse, resume changes pass -------------------------------------------

def _saved(tmp_path):
  cfg = config.base_config()
  cfg.workdir = str(tmp_path)
  config.save(cfg, os.path.join(tmp_path, 'config.json'))
  return cfg


def _changed(cfg, key):
  new = cfg.copy_and_resolve_references()
  *sections, leaf = key.split('.')
  parent = new
  for s in sections:
    parent = parent[s]
  with parent.unlocked():
    parent[leaf] = _other(parent[leaf])
  return new


@pytest.mark.parametrize('role', [roles.RUN, roles.SHAPE, roles.FUNCTION, roles.RESTORE])
def test_resume_refuses_a_change_of_a_run_defining_field(tmp_path, role):
  cfg = _saved(tmp_path)
  keys = [k for k, r in config.ROLES.items() if r == role]
  assert keys
  for key in keys:
    new = _changed(cfg, key)
    finetune = key.startswith('finetune.')
    if finetune:   # the finetune section defines fine-tuning runs only: pretraining prints the change
      lines = resume.resume_changes(str(tmp_path), new, resuming=True)
      assert len(lines) == 1 and lines[0].startswith(f'config change on resume: {key}: '), (key, lines)
    with pytest.raises(config.ConfigError) as e:
      resume.resume_changes(str(tmp_path), new, resuming=True, finetune=finetune)
    assert f'changed run-defining options: {key} ' in str(e.value) and '\n' not in str(e.value), key


def test_resume_allows_and_prints_a_change_of_a_resume_field(tmp_path):
  cfg = _saved(tmp_path)
  keys = [k for k, r in config.ROLES.items() if r == roles.RESUME]
  assert 'log_every' in keys and 'model.attention' in keys and 'progress_bar' in keys
  for key in keys:
    new = _changed(cfg, key)
    lines = resume.resume_changes(str(tmp_path), new, resuming=True, finetune=True)
    assert len(lines) == 1 and lines[0].startswith(f'config change on resume: {key}: '), (key, lines)


def test_resume_ignores_a_local_field(tmp_path):
  cfg = _saved(tmp_path)
  for key in (k for k, r in config.ROLES.items() if r == roles.LOCAL):
    assert resume.resume_changes(str(tmp_path), _changed(cfg, key), resuming=True) == [], key


def test_resume_of_a_config_json_written_before_a_field_existed(tmp_path):
  import json
  cfg = _saved(tmp_path)
  path = os.path.join(tmp_path, 'config.json')
  saved = json.load(open(path))
  del saved['model']['rope_scaling']
  open(path, 'w').write(json.dumps(saved))
  assert resume.resume_changes(str(tmp_path), cfg, resuming=True) == []
  cfg.model.rope_scaling = 'llama3'
  with pytest.raises(config.ConfigError, match='model.rope_scaling "none" -> "llama3"'):
    resume.resume_changes(str(tmp_path), cfg, resuming=True)


# Options declared once --------------------------------------------------------------------------

def test_data_and_finetune_share_their_split_options_with_their_own_defaults():
  shared = schema.split_fields('x', 0.5)
  assert len(shared) == 7
  for name in shared:
    assert (schema.DATA[name].role, schema.DATA[name].doc) == (schema.FINETUNE[name].role, schema.FINETUNE[name].doc)
  data, ft = config.data_defaults(), config.finetune_defaults()
  assert (data.eval_split, data.validation_fraction) == ('validation', 0.02)
  assert (ft.eval_split, ft.validation_fraction) == ('test', 0.1)
  assert all(data[k] == ft[k] for k in shared if k not in ('eval_split', 'validation_fraction'))


# One-line messages ------------------------------------------------------------------------------

def test_unknown_key_names_the_nearest_field():
  with pytest.raises(config.ConfigError) as e:
    config.resolve(DEFAULT, ['--config.model.num_layer=3'])
  assert str(e.value) == "unknown config key 'model.num_layer' (did you mean model.num_layers?)"
  with pytest.raises(config.ConfigError) as e:
    config.resolve(DEFAULT, ['--config.modle.num_layers=3'])
  assert str(e.value) == "unknown config key 'modle.num_layers' (no section 'modle') (did you mean model?)"
  with pytest.raises(config.ConfigError) as e:
    config.resolve(DEFAULT, ['--config.model.zzzz=3'])   # nothing near: no guess
  assert str(e.value) == "unknown config key 'model.zzzz'"


def test_seq_len_beyond_learned_positions_is_one_line_error():
  with pytest.raises(config.ConfigError) as e:
    config.resolve(DEFAULT, ['--config.model.positions=learned', '--config.seq_len=200'])
  assert str(e.value) == ('seq_len=200 exceeds model.max_seq_len=128, the rows of the learned positions table: '
                          'set seq_len <= 128 or model.max_seq_len >= 200')


def test_seq_len_beyond_max_seq_len_with_rope_warns_once(caplog):
  caplog.set_level(logging.WARNING, logger='fmjax.config')
  cfg = config.resolve(DEFAULT, ['--config.seq_len=136'])    # RoPE: accepted
  config.validate(cfg)                                       # validated again (as the train command does)
  said = [r.getMessage() for r in caplog.records if r.name == 'fmjax.config']
  assert said == ['warning: seq_len=136 exceeds model.max_seq_len=128: RoPE takes any length, but the model is '
                  'configured for 128 tokens (set model.max_seq_len=136 if intended)']
  caplog.clear()
  config.resolve(DEFAULT, ['--config.seq_len=128'])
  assert not [r for r in caplog.records if r.name == 'fmjax.config']

"""Run configuration: the one schema of every option, loading, overrides, validation, saving.

Every option is declared exactly once, with its default and its role, in fmjax/config/schema.py
(roles: fmjax/config/roles.py). Config files in `configs/` start from `base_config()` and change
values; `--config.a.b=c` flags change them again. An unknown key (with the nearest names) or a
value of the wrong type is a one-line error. Importing this package imports no JAX.
"""

from __future__ import annotations

from fmjax.config.checks import validate
from fmjax.config.errors import ConfigError
from fmjax.config.io import (_to_tuples, apply_overrides, check_schema, did_you_mean, load_config_file, resolve, save,
                             to_json)
from fmjax.config.roles import missing_roles
from fmjax.config.schema import (ROLES, SCHEMA, base_config, data_defaults, finetune_defaults, keys_with_role,
                                 logical_axis_rules_default, mesh_defaults, mlm_defaults, model_defaults,
                                 optim_defaults)

__all__ = ['ConfigError', 'ROLES', 'SCHEMA', 'apply_overrides', 'base_config', 'check_schema', 'data_defaults',
           'did_you_mean', 'finetune_defaults', 'keys_with_role', 'load_config_file', 'logical_axis_rules_default',
           'mesh_defaults', 'missing_roles', 'mlm_defaults', 'model_defaults', 'optim_defaults', 'resolve', 'save',
           'to_json', 'validate']

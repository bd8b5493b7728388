"""Data curation on datatrove: `python -m fmjax.curate` (exact and near-duplicate removal, quality
filters, PII redaction, decontamination, a data report). Entry point: fmjax/curate/cli.py;
options: fmjax/curate/schema.py; stages: fmjax/curate/pipeline.py."""

from fmjax.curate.schema import curate_defaults

__all__ = ['curate_defaults']

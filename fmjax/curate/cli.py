"""Curate raw documents into training shards: dedup, quality filters, PII redaction, decontamination.

`python -m fmjax.curate --config configs/curate_default.py --config.input=GLOB --config.output=DIR`
writes curated, compressed JSONL shards (OUT/*.jsonl.gz, a `text` field) that fmjax.train reads,
and a data report (OUT/report.json, OUT/length_histogram.png, a console summary). Rerunning the
same command resumes an interrupted curation.
"""

from __future__ import annotations

from typing import Sequence

from fmjax import cli

USAGE = """python -m fmjax.curate --config CONFIG --config.input=GLOB --config.output=DIR [--overwrite]
       [--dry-run] [--verbose] [--config.KEY=VALUE ...]"""
DESCRIPTION = """Curate raw documents into training shards: exact and near-duplicate removal, quality filters,
PII redaction and decontamination on datatrove, locally with N worker processes or as SLURM job
arrays (--config.executor=slurm). Writes OUT/*.jsonl.gz (what fmjax.train reads) and a data report;
rerunning the same command resumes an interrupted curation. Shipped configs: curate_default
(prose) and curate_code (source code)."""


def parser() -> cli.ArgumentParser:
  p = cli.ArgumentParser(prog='fmjax.curate', usage=USAGE, description=DESCRIPTION)
  cli.add_config_flags(p, examples='curate_default, curate_code')
  p.add_argument('--overwrite', action='store_true', help='replace the contents of a non-empty output directory')
  p.add_argument('--dry-run', action='store_true',
                 help='print what would run (with --config.executor=slurm: the sbatch scripts) and stop')
  p.add_argument('--verbose', action='store_true', help="show datatrove's task logs on the console")
  return p


def _curate_command(argv: Sequence[str]) -> int:
  args, overrides = cli.parse(parser(), argv)   # before datatrove: --help and usage errors stay instant
  try:
    import datatrove  # noqa: F401  pylint: disable=import-outside-toplevel,unused-import
  except ImportError:
    raise cli.UsageError("fmjax.curate needs datatrove: pip install 'fmjax[curate]'") from None
  from fmjax.curate import executors, pipeline, quality, report, schema, workspace  # pylint: disable=import-outside-toplevel
  cfg = schema.resolve(cli.config_path(args.config), overrides)
  if cfg.quality.language.enabled:
    quality.check_language_model(cfg.quality.language)
  evals = workspace.eval_paths(cfg)
  if args.dry_run:
    inputs = workspace.resolve_inputs(cfg)
    stages = pipeline.build_stages(cfg, inputs, evals)
    plan = executors.dry_run_slurm(cfg, stages) if cfg.executor == 'slurm' else executors.dry_run_local(cfg, stages)
    print(f'# inputs: {len(inputs["text"])} text and {len(inputs["jsonl"])} jsonl files under {inputs["root"]}')
    print(plan)
    return 0
  if args.overwrite:
    workspace.resolve_inputs(cfg)  # refuses inputs inside OUT before anything there is deleted
  resumed = workspace.prepare(cfg, args.overwrite)
  inputs = workspace.freeze_inputs(cfg, resumed)
  stages = pipeline.build_stages(cfg, inputs, evals)
  if resumed:
    print(f'resuming the curation in {cfg.output}', flush=True)
  if cfg.executor == 'slurm':
    if executors.run_slurm(cfg, stages, args.verbose):
      print(report.summary(report.write_report(cfg)), flush=True)
    return 0
  executors.run_local(cfg, stages, args.verbose)
  print(report.summary(report.write_report(cfg)), flush=True)
  return 0


def main(argv: Sequence[str] | None = None) -> int:
  return cli.run('fmjax.curate', _curate_command, argv)

"""`python -m fmjax.bench --data`: loader tokens/s per worker count, as a table and JSON."""

import json
import os

from fmjax import bench   # the command (fmjax/bench.py)

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TINY = os.path.join(ROOT, 'tests', 'configs', 'tiny.py')


def test_bench_data_reports_tokens_per_second_per_worker_count(tmp_path, capsys):
  for i in range(20):
    (tmp_path / f'{i}.txt').write_text(f'document {i} ' + 'text ' * (10 + i))
  out = tmp_path / 'rows.json'
  argv = ['--data', '--config', TINY, '--workers', '0', '--seconds', '0.3', '--out', str(out),
          f'--config.data.files={tmp_path}/*.txt', f'--config.data.cache_dir={tmp_path}/cache']
  assert bench.main(argv) == 0
  rows = json.loads(out.read_text())
  assert [r['worker_count'] for r in rows] == [0]
  assert rows[0]['batches'] > 0 and rows[0]['tokens_per_s'] > 0
  printed = capsys.readouterr().out
  assert 'tokens_per_s' in printed and 'workers=0' in printed
  assert bench.main(['--data', '--config', TINY, '--workers', 'x']) == 2
  assert "--workers 'x' must be" in capsys.readouterr().err

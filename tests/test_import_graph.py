"""No import cycles among fmjax modules, counting imports inside functions too."""

import ast
import pathlib

import fmjax

ROOT = pathlib.Path(fmjax.__file__).parent


def _module_name(path: pathlib.Path) -> str:
  parts = ('fmjax',) + path.relative_to(ROOT).with_suffix('').parts
  return '.'.join(parts[:-1] if parts[-1] == '__init__' else parts)


def import_graph() -> dict[str, set[str]]:
  """module -> the fmjax modules it imports anywhere in its source (package parents excluded)."""
  modules = {_module_name(p): p for p in ROOT.rglob('*.py')}
  graph = {m: set() for m in modules}
  for name, path in modules.items():
    package = name if path.name == '__init__.py' else name.rpartition('.')[0]
    for node in ast.walk(ast.parse(path.read_text())):
      if isinstance(node, ast.Import):
        targets = [a.name for a in node.names]
      elif isinstance(node, ast.ImportFrom):
        base = node.module or ''
        if node.level:
          anchor = package.split('.')[:len(package.split('.')) - node.level + 1]
          base = '.'.join(anchor + ([base] if base else []))
        targets = [base] + [f'{base}.{a.name}' for a in node.names]
      else:
        continue
      for t in targets:
        if t in modules and t != name and not name.startswith(t + '.'):
          graph[name].add(t)
  return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
  """Strongly connected components of more than one module (Tarjan)."""
  index, low, stack, on_stack, out = {}, {}, [], set(), []

  def visit(v):
    index[v] = low[v] = len(index)
    stack.append(v)
    on_stack.add(v)
    for w in graph[v]:
      if w not in index:
        visit(w)
        low[v] = min(low[v], low[w])
      elif w in on_stack:
        low[v] = min(low[v], index[w])
    if low[v] == index[v]:
      component = []
      while True:
        w = stack.pop()
        on_stack.discard(w)
        component.append(w)
        if w == v:
          break
      if len(component) > 1:
        out.append(sorted(component))

  for v in sorted(graph):
    if v not in index:
      visit(v)
  return out


def test_the_checker_finds_a_planted_cycle():
  graph = {'a': {'b'}, 'b': {'c'}, 'c': {'a'}, 'd': {'a'}}
  assert cycles(graph) == [['a', 'b', 'c']]


def test_no_import_cycles():
  found = cycles(import_graph())
  assert not found, 'import cycles: ' + '; '.join(' <-> '.join(c) for c in found)

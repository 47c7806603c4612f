"""No import cycles among the project's modules, counting every import statement (function-local ones too: a
cycle closed inside a function still fails when that function runs while the other module is half initialised)."""
import ast
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "dataloading", "benchmarks")


def project_modules() -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of the project's packages (a package is its __init__.py)."""
    modules = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = list(path.relative_to(REPO).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


def imports_of(name: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, int]]:
    """(project module, line) for every import statement in `path` that names a project module."""
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                base = ".".join(anchor + ([base] if base else []))
            # `from package import module` imports the module; `from module import name` the module itself.
            targets = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in modules else base for alias in node.names]
        else:
            continue
        found += [(target, node.lineno) for target in targets if target in modules and target != name]
    return found


def find_cycles(graph: dict[str, dict[str, int]]) -> list[list[str]]:
    """One cycle (a list of modules, first = last) per strongly connected component of more than one module."""
    index, low, stack, on_stack, components = {}, {}, [], set(), []

    def connect(node: str) -> None:  # Tarjan's algorithm
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for successor in graph[node]:
            if successor not in index:
                connect(successor)
                low[node] = min(low[node], low[successor])
            elif successor in on_stack:
                low[node] = min(low[node], index[successor])
        if low[node] == index[node]:
            component = set()
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.add(member)
                if member == node:
                    break
            if len(component) > 1:
                components.append(component)

    for node in sorted(graph):
        if node not in index:
            connect(node)
    return [shortest_cycle(min(component), graph, component) for component in components]


def shortest_cycle(start: str, graph: dict[str, dict[str, int]], component: set[str]) -> list[str]:
    """The shortest way from `start` back to itself within `component` (breadth first), first = last."""
    previous, queue = {start: None}, deque([start])
    while queue:
        node = queue.popleft()
        for successor in sorted(graph[node]):
            if successor == start:
                path = [node]
                while previous[path[-1]] is not None:
                    path.append(previous[path[-1]])
                return [*reversed(path), start]
            if successor in component and successor not in previous:
                previous[successor] = node
                queue.append(successor)
    raise AssertionError(f"{start} is not on a cycle of {sorted(component)}")


def test_no_import_cycles():
    modules = project_modules()
    graph = {name: {} for name in modules}
    for name, path in modules.items():
        for target, line in imports_of(name, path, modules):
            graph[name].setdefault(target, line)
    assert "engine.plan" in graph["engine.cli"]  # a function-local import is counted
    described = []
    for cycle in find_cycles(graph):
        steps = [f"  {modules[a].relative_to(REPO)}:{graph[a][b]} imports {b}" for a, b in zip(cycle, cycle[1:])]
        described.append(" -> ".join(cycle) + "\n" + "\n".join(steps))
    assert not described, "import cycle(s) among the project's modules:\n" + "\n".join(described)


def test_the_cycle_finder_names_a_cycle():
    graph = {"a": {"b": 1}, "b": {"c": 2}, "c": {"a": 3, "d": 4}, "d": {}, "e": {"e": 5}}
    assert find_cycles(graph) == [["a", "b", "c", "a"]]

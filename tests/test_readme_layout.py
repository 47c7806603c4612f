"""The README's folder tree names every module of the packages, and nothing else."""
import re

from tiny_run import REPO

PACKAGES = ("kernels", "dataloading", "engine", "benchmarks")


def test_readme_tree_lists_exactly_the_modules():
    text = (REPO / "README.md").read_text()
    tree = text[text.index("## Layout"):].split("```")[1]
    listed, parents = set(), []
    for line in tree.strip().splitlines():
        indent = (len(line) - len(line.lstrip())) // 2
        name = line.split()[0]
        parents = parents[:indent]
        if name.endswith("/"):
            parents.append(name.rstrip("/"))
        else:
            listed.add("/".join([*parents, name]))
    actual = {str(p.relative_to(REPO)) for package in PACKAGES for p in (REPO / package).rglob("*")
              if p.suffix in (".py", ".sh") and p.name != "__init__.py" and "__pycache__" not in p.parts
              and not p.name.startswith("test_")}
    assert listed == actual, {"in the README only": sorted(listed - actual), "not in the README": sorted(actual - listed)}
    for package in PACKAGES:
        assert re.search(rf"^\| `{package}/` \|", text, re.M), f"the layout table has no row for {package}/"

"""The project installed as a user installs it (`pip install .`, not editable) works from outside the checkout: every
`seer` sub-command's --help runs from the installed copy, and the cheap ones import no benchmark or planning code."""
import json
import os
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("engine", "kernels", "dataloading", "benchmarks")
COMMANDS = [
    (), ("data",), ("data", "pack"), ("data", "tiles"), ("pretrain",), ("eval",), ("finetune",), ("export",),
    ("predict",), ("report",), ("plan",), ("bench",), ("bench", "train"), ("bench", "data"), ("bench", "kernels"),
    ("demo",),
]
# Runs the installed console script as the user's shell would, then reports where the project's modules came from.
PROBE = """
import atexit, json, runpy, sys
script, report = sys.argv[1], sys.argv[2]

def write_report():
    with open(report, "w") as out:
        json.dump({name: getattr(module, "__file__", None) for name, module in list(sys.modules.items())
                   if name.split(".")[0] in %r}, out)

atexit.register(write_report)
sys.argv = [script, *sys.argv[3:]]
runpy.run_path(script, run_name="__main__")
""" % (PACKAGES,)


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """`pip install --no-deps --target SITE` of a copy of the checkout's sources (pip builds inside its source)."""
    root = tmp_path_factory.mktemp("install")
    source, site = root / "source", root / "site"
    ignore = shutil.ignore_patterns("__pycache__", "results")
    for package in PACKAGES:
        shutil.copytree(REPO / package, source / package, ignore=ignore)
    shutil.copy(REPO / "setup.py", source / "setup.py")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                    "--no-cache-dir", "--no-compile", "--quiet", "--target", str(site), str(source)],
                   check=True, capture_output=True, text=True, timeout=120)
    elsewhere = root / "elsewhere"
    elsewhere.mkdir()
    return site, elsewhere


def run_help(site: Path, cwd: Path, command: tuple[str, ...]) -> tuple[subprocess.CompletedProcess, dict]:
    report = cwd / ("modules-" + "-".join(command or ("seer",)) + ".json")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": str(site)}
    run = subprocess.run([sys.executable, "-c", PROBE, str(site / "bin" / "seer"), str(report), *command, "--help"],
                         capture_output=True, text=True, timeout=120, cwd=cwd, env=env)
    return run, json.loads(report.read_text()) if report.exists() else {}


def test_every_help_runs_from_the_installed_copy(installed):
    site, elsewhere = installed
    assert (site / "benchmarks" / "harness.py").is_file() and (site / "engine" / "configs" / "demo.yaml").is_file()
    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(COMMANDS, pool.map(lambda c: run_help(site, elsewhere, c), COMMANDS)))
    for command, (run, modules) in results.items():
        name = " ".join(("seer", *command))
        assert run.returncode == 0, f"{name} --help failed:\n{run.stderr}"
        assert f"\nusage: {name} " in "\n" + run.stdout, run.stdout  # DeepSpeed may log a line first
        outside = {m: f for m, f in modules.items() if f is not None and not Path(f).is_relative_to(site)}
        assert modules and not outside, f"{name} --help imported modules from outside the installed copy: {outside}"
    top = results[()][0].stdout
    assert all(command[0] in top for command in COMMANDS if command)
    for module, command in (("benchmarks.train", "train"), ("benchmarks.data", "data"),
                            ("benchmarks.swav_head", "kernels")):
        assert module in results[("bench", command)][1], f"seer bench {command} --help did not load {module}"
    # The parser of one sub-command does not import the modules of the others.
    for command in ((), ("pretrain",), ("bench",), ("data", "pack")):
        heavy = [m for m in results[command][1] if m.startswith("benchmarks") or m == "engine.plan"]
        assert not heavy, f"seer {' '.join(command)} --help imported {heavy}"

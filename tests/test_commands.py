"""Every script and console command explains itself: --help exits 0 with a usage text.

The console commands are pyproject.toml's [project.scripts] (each MODULE:main, the same table as
larvess.commands.COMMANDS); scripts/*.py run as scripts (``__main__``), in this process so that
torch is imported once; the installed entry points and ``python -m larvess`` in a subprocess.
"""

from __future__ import annotations

import importlib
import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

import larvess
from larvess.__main__ import main as larvess_main
from larvess.commands import COMMANDS

ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = sorted((ROOT / "scripts").glob("*.py"))
tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())


def test_pyproject_scripts_are_the_command_table():
    scripts = PYPROJECT["project"]["scripts"]
    assert scripts == {name: f"{module}:main" for name, module in COMMANDS.items()}
    assert {"larvess-train", "larvess-shard", "larvess-eval", "larvess-predict"} <= set(scripts)


def test_version_is_pyprojects():
    assert larvess.__version__ == PYPROJECT["project"]["version"]


@pytest.mark.parametrize("name", list(COMMANDS))
def test_command_help(name, capsys):
    main = importlib.import_module(COMMANDS[name]).main
    with pytest.raises(SystemExit) as done:
        main(["--help"])
    assert done.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: {name}") and len(out.splitlines()) > 3


@pytest.mark.parametrize("script", SCRIPTS, ids=[s.name for s in SCRIPTS])
def test_script_help(script, capsys, monkeypatch):
    monkeypatch.setattr(sys, "argv", [str(script), "--help"])
    monkeypatch.setenv("OMP_NUM_THREADS", os.environ.get("OMP_NUM_THREADS", "1"))
    with pytest.raises(SystemExit) as done:
        runpy.run_path(str(script), run_name="__main__")
    assert done.value.code in (0, None)
    out = capsys.readouterr().out
    assert out.startswith("usage: ") and len(out.splitlines()) > 2


def test_scripts_of_commands_are_thin_wrappers():
    """A script and its console command run the same function (nothing copied into scripts/)."""
    for script, module in [
        ("train", "train"),
        ("eval_ade", "eval_ade"),
        ("predict", "predict"),
        ("shard_imagenet21k", "shard"),
        ("prepare_ade847", "prepare_ade847"),
    ]:
        text = (ROOT / "scripts" / f"{script}.py").read_text()
        assert f"from larvess.commands.{module} import main" in text, script
        assert len(text.splitlines()) <= 12, script


def test_python_m_larvess_lists_and_runs_commands(capsys):
    assert larvess_main([]) == 0
    out = capsys.readouterr().out
    for name in COMMANDS:
        line = next(line for line in out.splitlines() if line.strip().startswith(name + " "))
        assert len(line.split(name, 1)[1].strip()) > 10  # a one-line description
    assert larvess_main(["nope"]) == 2
    assert "unknown command 'nope'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as done:
        larvess_main(["predict", "--help"])
    assert done.value.code == 0 and capsys.readouterr().out.startswith("usage: larvess-predict")


def test_installed_entry_points_run():
    """The pip-installed console scripts exist next to this Python and answer --help."""
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    missing = [n for n in COMMANDS if not (bin_dir / n).is_file()]
    if missing:
        pytest.skip(f"not pip-installed here (missing {missing}): pip install -e .")
    proc = subprocess.run([str(bin_dir / "larvess-eval"), "--help"], capture_output=True,
                          text=True, env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and proc.stdout.startswith("usage: larvess-eval"), proc.stderr
    proc = subprocess.run([sys.executable, "-m", "larvess"], capture_output=True, text=True,
                          env=env, timeout=120)  # fmt: skip
    assert proc.returncode == 0 and all(n in proc.stdout for n in COMMANDS), proc.stderr

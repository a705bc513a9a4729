"""The mypyc-compiled hot path (setup.py, proxy/_native.py): built from the sources as they are,
and never a stale build silently standing in for an edited source."""

from __future__ import annotations

import ast
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import proxy.audit  # noqa: F401 - imported so that compiled_modules() sees the whole group
import proxy.audit_sinks  # noqa: F401
import proxy.server  # noqa: F401
import proxy.session  # noqa: F401
from proxy._native import compiled_modules, stale_sources

ROOT = Path(__file__).resolve().parents[2]


def _setup_compiled() -> list[str]:
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", "") == "COMPILED":
            return list(ast.literal_eval(node.value))
    raise AssertionError("setup.py has no COMPILED list")


def test_makefile_rebuilds_when_a_compiled_module_changes() -> None:
    make = (ROOT / "Makefile").read_text()
    listed = re.search(r"^COMPILED\s*:=\s*(.+)$", make, re.M)
    assert listed is not None
    assert listed.group(1).split() == _setup_compiled()
    assert "$(COMPILED)" in make.split("PYPROJECT_HASH :=")[1].splitlines()[0]


def test_this_process_runs_the_form_the_install_built() -> None:
    """With a build stamp every compiled module runs compiled (the suite tests what ships);
    without one (a pure-Python install) none does."""
    stamp = ROOT / "proxy" / "_native.json"
    names = [p.removesuffix(".py").replace("/", ".") for p in _setup_compiled()]
    if stamp.exists() and not stale_sources():
        assert sorted(json.loads(stamp.read_text())["sources"]) == sorted(_setup_compiled())
        assert sorted(compiled_modules()) == sorted(names)
    else:
        assert compiled_modules() == []
        for name in names:
            assert sys.modules[name].__file__.endswith(".py")


def _copy_package(dest: Path) -> None:
    for pkg in ("proxy", "rewriters"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for lib in ROOT.glob("pgveil_native__mypyc*"):
        shutil.copy2(lib, dest / lib.name)


def _import_in(root: Path) -> tuple[dict[str, str], str]:
    code = ("import json, proxy.server, proxy.session, proxy.audit, proxy.audit_sinks as s\n"
            "import sys\n"
            "print(json.dumps({n: sys.modules[n].__file__ for n in ('proxy.server', "
            "'proxy.session', 'proxy.audit', 'proxy.audit_sinks')}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def test_an_edited_source_is_loaded_instead_of_its_stale_build(tmp_path: Path) -> None:
    _copy_package(tmp_path)
    stamp = tmp_path / "proxy" / "_native.json"
    if stamp.exists():  # a compiled install: unchanged sources run compiled
        files, err = _import_in(tmp_path)
        assert all(not f.endswith(".py") for f in files.values()), files
        assert "changed since" not in err
    else:  # a pure install: pretend a build recorded the sources as they were
        sources = {p: "0" * 64 for p in _setup_compiled()}
        stamp.write_text(json.dumps({"group": "pgveil_native", "sources": sources}))
    with (tmp_path / "proxy" / "audit.py").open("a") as f:
        f.write("\n# an edit after the build\n")
    files, err = _import_in(tmp_path)
    assert all(f.endswith(".py") for f in files.values()), files  # the whole group, from source
    assert "proxy/audit.py" in err and "changed since the hot path was compiled" in err

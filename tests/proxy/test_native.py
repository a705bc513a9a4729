"""The mypyc-compiled hot path (setup.py, proxy/_native.py): built from the sources as they are,
and never a stale build silently standing in for an edited source."""

from __future__ import annotations

import importlib.machinery
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
from proxy._native import COMPILED, compiled_modules, stale_sources

ROOT = Path(__file__).resolve().parents[2]
NAMES = [rel.removesuffix(".py").replace("/", ".") for rel in COMPILED]
WARNING = "compiled hot path is out of date"


def test_makefile_rebuilds_when_a_compiled_module_changes() -> None:
    make = (ROOT / "Makefile").read_text()
    listed = re.search(r"^COMPILED\s*:=\s*(.+)$", make, re.M)
    assert listed is not None
    assert tuple(listed.group(1).split()) == COMPILED
    assert "$(COMPILED)" in make.split("PYPROJECT_HASH :=")[1].splitlines()[0]


def test_this_process_runs_the_form_the_install_built() -> None:
    """With a build record every compiled module runs compiled (the suite tests what ships);
    without compiled forms (a pure-Python install) none does."""
    stamp = ROOT / "proxy" / "_native.json"
    assert stale_sources() == []
    if stamp.exists():
        assert sorted(json.loads(stamp.read_text())["sources"]) == sorted(COMPILED)
        assert sorted(compiled_modules()) == sorted(NAMES)
    else:
        assert compiled_modules() == []
        assert all(sys.modules[name].__file__.endswith(".py") for name in NAMES)


def _copy_package(dest: Path) -> None:
    for pkg in ("proxy", "rewriters"):
        shutil.copytree(ROOT / pkg, dest / pkg, ignore=shutil.ignore_patterns("__pycache__"))
    for lib in ROOT.glob("pgveil_native__mypyc*"):
        shutil.copy2(lib, dest / lib.name)


def _import_in(root: Path) -> tuple[dict[str, str], str]:
    code = ("import json, sys, proxy.server, proxy.session, proxy.audit, proxy.audit_sinks\n"
            f"print(json.dumps({{n: sys.modules[n].__file__ for n in {NAMES!r}}}))")
    r = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True,
                       env={"PYTHONPATH": str(root), "PATH": "/usr/bin:/bin"}, timeout=60)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout), r.stderr


def _from_source(files: dict[str, str]) -> bool:
    return all(f.endswith(".py") for f in files.values())


def test_a_stale_build_is_never_used(tmp_path: Path) -> None:
    """Edited after the build, or compiled with no record of the build (a failed rebuild
    removes the record): the whole group runs from source, with a warning."""
    _copy_package(tmp_path)
    stamp = tmp_path / "proxy" / "_native.json"
    audit_py = tmp_path / "proxy" / "audit.py"
    if stamp.exists():  # a compiled install: unchanged sources run compiled
        files, err = _import_in(tmp_path)
        assert not any(f.endswith(".py") for f in files.values()), files
        assert WARNING not in err

        original = audit_py.read_bytes()
        audit_py.write_bytes(original + b"\n# an edit after the build\n")
        files, err = _import_in(tmp_path)
        assert _from_source(files), files
        assert WARNING in err and "proxy/audit.py" in err and "proxy/server.py" not in err
        audit_py.write_bytes(original)
    else:  # a pure install: stand-ins for compiled forms left by an earlier build
        suffix = importlib.machinery.EXTENSION_SUFFIXES[0]
        for rel in COMPILED:
            (tmp_path / rel).with_suffix(suffix).write_bytes(b"not a library")
    stamp.unlink(missing_ok=True)
    files, err = _import_in(tmp_path)
    assert _from_source(files), files
    assert WARNING in err and all(rel in err for rel in COMPILED)

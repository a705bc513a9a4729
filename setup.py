"""Build: the per-statement hot path compiled with mypyc, when this machine can compile.

Everything else about the package is declared in pyproject.toml. The modules in
``proxy/_native.py`` ``COMPILED`` carry each statement from the client socket to PostgreSQL and
back, with its audit record; compiled, they cost about 10 µs (a tenth to a sixth) less CPU per
masked lookup (bench/README.md). They stay ordinary Python source: mypyc compiles the same
files, type annotations and all, and the package runs unchanged without the compiled forms.

- ``PGVEIL_BUILD_PURE=1`` skips compiling (a pure-Python install).
- A compile failure (no C compiler, no Python headers) is a warning, not a failed install: the
  extensions are optional, and the package then runs as plain Python.
- ``proxy/_native.json`` records the SHA-256 of each compiled source. ``proxy/_native.py``
  (which lists the modules, ``COMPILED``) loads the Python source instead of the compiled forms
  when a source no longer matches, or when there is no record (an editable checkout edited after
  its build, or whose rebuild failed), so an edit is never silently shadowed.
"""

from __future__ import annotations

import ast
import hashlib
import json
import os
import pathlib
import sys

from setuptools import setup
from setuptools.command.build_ext import build_ext

HERE = pathlib.Path(__file__).resolve().parent
STAMP = "proxy/_native.json"
GROUP = "pgveil_native"


def _compiled() -> list[str]:
    """proxy/_native.py's COMPILED (read, not imported: the build has no dependencies)."""
    tree = ast.parse((HERE / "proxy" / "_native.py").read_text(encoding="utf-8"))
    for node in tree.body:
        target = node.target if isinstance(node, ast.AnnAssign) else (
            node.targets[0] if isinstance(node, ast.Assign) else None)
        if isinstance(target, ast.Name) and target.id == "COMPILED" and node.value is not None:
            return list(ast.literal_eval(node.value))
    raise RuntimeError("proxy/_native.py defines no COMPILED")


COMPILED = _compiled()
# The sources' hashes as mypyc reads them, before the minutes of C compilation: a source edited
# during a build must leave the build stale (proxy/_native.py then runs the source), not stamp
# the old compiled code with the new text's hash.
SOURCES = {path: hashlib.sha256((HERE / path).read_bytes()).hexdigest() for path in COMPILED}


def _stamp() -> str:
    return json.dumps({"group": GROUP, "sources": SOURCES}, indent=1, sort_keys=True) + "\n"


class BuildNative(build_ext):
    """build_ext that records which sources the compiled forms were built from."""

    def finalize_options(self) -> None:
        super().finalize_options()
        if not self.parallel:  # the group's C files compile side by side (about a third less)
            self.parallel = os.cpu_count() or 1

    def run(self) -> None:
        super().run()
        built = all(os.path.exists(self.get_ext_fullpath(ext.name)) for ext in self.extensions)
        if not built:
            return
        targets = [pathlib.Path(self.build_lib) / STAMP]
        if self.inplace:
            targets.append(HERE / STAMP)
        for target in targets:
            target.parent.mkdir(parents=True, exist_ok=True)
            target.write_text(_stamp())


def _extensions() -> list:
    # written again only by a successful compile; until then proxy/_native.py treats compiled
    # forms left from an earlier build as stale
    (HERE / STAMP).unlink(missing_ok=True)
    if os.environ.get("PGVEIL_BUILD_PURE") == "1":
        return []
    try:
        from mypyc.build import mypycify
    except ImportError:
        print("pgveil: mypyc unavailable; installing pure Python", file=sys.stderr)
        return []
    cwd = os.getcwd()
    os.chdir(HERE)
    try:
        extensions = mypycify(["--follow-imports=silent", "--ignore-missing-imports", *COMPILED],
                              opt_level="3", group_name=GROUP)
    except (Exception, SystemExit) as exc:  # noqa: BLE001 - mypyc exits on a type error
        print(f"pgveil: mypyc failed ({exc!r}, type errors above); installing pure Python",
              file=sys.stderr)
        return []
    finally:
        os.chdir(cwd)
    for ext in extensions:
        ext.optional = True  # no compiler or headers: keep the pure-Python install
    return extensions


setup(ext_modules=_extensions(), cmdclass={"build_ext": BuildNative})

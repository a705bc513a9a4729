"""The mypyc-compiled hot path (setup.py): which form of it runs, and never a stale one.

``setup.py`` compiles the modules listed in :data:`COMPILED` with mypyc and records the SHA-256
of each source it compiled in ``_native.json``. In an editable checkout the compiled forms sit
next to the sources, and Python prefers them: a source edited after the build would be silently
shadowed by the old compiled code -- a fix that seems to run but does not. So at import, if a
compiled form is present and any source differs from its record (or there is no record: a
rebuild that failed removes it), every compiled module is loaded from its source instead (mypyc
compiles the group into one library: the modules cannot be mixed), with a warning that names
the files and how to rebuild.
"""

from __future__ import annotations

import hashlib
import importlib.machinery
import importlib.util
import json
import logging
import pathlib
import sys
from collections.abc import Sequence
from types import ModuleType
from typing import Any

log = logging.getLogger("pgveil")
_HERE = pathlib.Path(__file__).resolve().parent
_STAMP = _HERE / "_native.json"

#: The per-statement hot path, compiled by setup.py (paths relative to the project root).
COMPILED: tuple[str, ...] = ("proxy/server.py", "proxy/session.py", "proxy/audit.py",
                             "proxy/audit_sinks.py", "proxy/operator.py")


class _SourceFinder:
    """A meta-path finder that loads the named modules from their ``.py`` files."""

    def __init__(self, sources: dict[str, pathlib.Path]):
        self.sources = sources

    def find_spec(self, name: str, path: Sequence[str] | None = None,
                  target: ModuleType | None = None) -> importlib.machinery.ModuleSpec | None:
        source = self.sources.get(name)
        if source is None:
            return None
        return importlib.util.spec_from_file_location(name, source)


def _recorded() -> dict[str, str]:
    try:
        stamp: Any = json.loads(_STAMP.read_text())
        return {str(k): str(v) for k, v in stamp["sources"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return {}


def _module(rel: str) -> str:
    return rel.removesuffix(".py").replace("/", ".")


def _has_compiled_form(root: pathlib.Path, rel: str) -> bool:
    base = (root / rel).with_suffix("")
    return any(base.with_name(base.name + suffix).exists()
               for suffix in importlib.machinery.EXTENSION_SUFFIXES)


def stale_sources(root: pathlib.Path = _HERE.parent) -> list[str]:
    """The compiled sources (paths relative to the project) whose compiled form does not match
    them: changed since the build, or compiled with no record of the build."""
    recorded = _recorded()
    stale = []
    for rel in COMPILED:
        if not _has_compiled_form(root, rel):
            continue
        try:
            now = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        except OSError:
            now = ""
        if recorded.get(rel) != now:
            stale.append(rel)
    return stale


def compiled_modules() -> list[str]:
    """Modules of this package that are running compiled (empty: pure Python)."""
    out = []
    for rel in COMPILED:
        module = sys.modules.get(_module(rel))
        if module is not None and not str(getattr(module, "__file__", "")).endswith(".py"):
            out.append(_module(rel))
    return out


def guard_stale_native() -> None:
    """Load every compiled module from source when any compiled form is stale (module doc)."""
    stale = stale_sources()
    if not stale or any(isinstance(f, _SourceFinder) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _SourceFinder({_module(rel): _HERE.parent / rel for rel in COMPILED}))
    log.warning("pgveil: the compiled hot path is out of date for %s (edited after the build, "
                "or the rebuild failed); running it as plain Python (slower). Rebuild with "
                "`pip install -e .` (or `make venv`).", ", ".join(stale))

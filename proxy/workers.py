"""Process model for ``pgveil serve``: one worker in-process, or N forked workers.

With ``workers: N`` (> 1) the parent forks N children that each bind the listen port with
SO_REUSEPORT, so the kernel spreads connections across them. A CancelRequest can land on any
worker; the pid pgveil hands out carries the worker index, and workers relay cancels to each
other over unix sockets in a private directory. Metrics are kept per process in prometheus'
multiprocess mode and served, summed, by the parent. SIGTERM to the parent drains every worker.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import socket
import sys
import tempfile
from pathlib import Path

from proxy.config import Config

log = logging.getLogger("pgveil")


def _install_uvloop() -> None:
    with contextlib.suppress(ImportError):
        import uvloop

        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())


def claim_port(config: Config) -> None:
    """Fail (OSError) if another process already listens on the configured address. The
    workers bind with SO_REUSEPORT so that they can share the port, and that would let a second
    pgveil (a new version started before the old one stopped, a stray manual start) share it
    silently too: both would write the same audit chain (``host-port-wN``), which then never
    verifies again. A bind without SO_REUSEPORT is refused while any socket listens there."""
    if config.listen.port == 0:
        return
    host = config.listen.host
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                       socket.SOCK_STREAM) as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is no owner
        try:
            probe.bind((host, config.listen.port))
        except OSError as exc:
            raise OSError(exc.errno, f"{exc.strerror} (is another pgveil running on this "
                                     "port?)") from None


def serve(config: Config) -> int:
    """Run until SIGTERM/SIGINT; returns the exit code."""
    claim_port(config)
    _install_uvloop()
    if config.workers <= 1:
        from proxy.runtime import run_worker

        asyncio.run(run_worker(config))
        return 0
    return _serve_many(config)


def _serve_many(config: Config) -> int:
    base = Path(tempfile.mkdtemp(prefix="pgveil-"))
    metrics_dir = base / "metrics"
    metrics_dir.mkdir()
    os.environ["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
    # validate the policy once in the parent so a broken file fails fast with its errors
    from rewriters.policy import load_policy

    load_policy(config.policy)
    children: list[int] = []
    for index in range(config.workers):
        pid = os.fork()
        if pid == 0:  # child
            code = 0
            try:
                from proxy.runtime import run_worker

                asyncio.run(run_worker(config, worker=index, cancel_dir=base,
                                       serve_metrics=False))
            except BaseException:  # noqa: BLE001 - report and exit the child only
                log.exception("worker %d failed", index)
                code = 1
            os._exit(code)
        children.append(pid)
    return asyncio.run(_parent(config, children, base))


async def _parent(config: Config, children: list[int], base: Path) -> int:
    from prometheus_client import CollectorRegistry, generate_latest, multiprocess

    from proxy.metrics import MetricsServer

    def render() -> bytes:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)

    alive = set(children)
    server = MetricsServer(None, lambda: bool(alive), render)  # type: ignore[arg-type]
    if config.metrics.enabled:
        await server.start(config.metrics.host, config.metrics.port)
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: [_kill(p, signal.SIGHUP) for p in alive])

    async def reap() -> None:
        while alive:
            await asyncio.sleep(0.5)
            for pid in list(alive):
                done, _ = os.waitpid(pid, os.WNOHANG)
                if done:
                    alive.discard(pid)
        stop.set()

    reaper = asyncio.create_task(reap())
    await stop.wait()
    for pid in list(alive):
        _kill(pid, signal.SIGTERM)
    for _ in range(300):
        if not alive:
            break
        await asyncio.sleep(0.1)
    for pid in list(alive):
        _kill(pid, signal.SIGKILL)
    reaper.cancel()
    await server.close()
    import shutil

    shutil.rmtree(base, ignore_errors=True)
    return 0


def _kill(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


__all__ = ["serve", "sys"]

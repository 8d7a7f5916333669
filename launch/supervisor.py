"""The child processes of ``difffit serve``: started, watched, restarted or stopped.

A restartable child (the worker) that exits is started again after a
back-off that doubles from RESTART_BACKOFF_S up to RESTART_BACKOFF_MAX_S and
resets once a run lasted STABLE_AFTER_S; every restart is logged with the
exit code. Any other child that exits stops everything (``run`` returns 1).
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

STOP_TIMEOUT_S = 20.0
RESTART_BACKOFF_S = 1.0
RESTART_BACKOFF_MAX_S = 30.0
STABLE_AFTER_S = 60.0


def stop_process(proc: subprocess.Popen, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
    """Terminate ``proc``, wait up to ``timeout_s``, then kill it. Returns its exit code."""
    if proc.poll() is None:
        try:
            proc.terminate()
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)
        except ProcessLookupError:
            pass
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()
    return proc.returncode


def restart_delay(quick_failures: int) -> float:
    """Seconds before restart number ``quick_failures + 1`` of a child that keeps dying."""
    return min(RESTART_BACKOFF_MAX_S, RESTART_BACKOFF_S * 2**quick_failures)


@dataclass
class Child:
    """A supervised child process; ``restart`` starts a replacement (None: not restartable)."""

    name: str
    proc: subprocess.Popen
    stop_timeout_s: float = STOP_TIMEOUT_S
    restart: Callable[[], subprocess.Popen] | None = None
    # Runs before each restart (e.g. requeue what the dead process held); errors are logged.
    before_restart: Callable[[], None] | None = None
    started_at: float = field(default_factory=time.monotonic)
    restarts: int = 0
    quick_failures: int = 0
    restart_at: float | None = None


def _say(message: str) -> None:
    print(f"difffit serve: {message}", file=sys.stderr, flush=True)


@dataclass
class Supervisor:
    """Children started in order, watched, restarted if restartable, stopped in reverse order."""

    children: list[Child] = field(default_factory=list)
    stop_event: threading.Event = field(default_factory=threading.Event)
    poll_s: float = 0.2

    def add(
        self,
        name: str,
        proc: subprocess.Popen,
        stop_timeout_s: float = STOP_TIMEOUT_S,
        restart: Callable[[], subprocess.Popen] | None = None,
        before_restart: Callable[[], None] | None = None,
    ) -> None:
        self.children.append(Child(name, proc, stop_timeout_s, restart, before_restart))

    def dead_child(self) -> Child | None:
        """The first child that has exited and will not be restarted, if any."""
        return next((c for c in self.children if c.restart is None and c.proc.poll() is not None), None)

    def run(self) -> int:
        """Block until ``stop_event`` is set (0) or a non-restartable child dies (1); stop all."""
        try:
            while not self.stop_event.wait(self.poll_s):
                for child in self.children:
                    if child.proc.poll() is None:
                        continue
                    if child.restart is None:
                        _say(
                            f"{child.name} exited unexpectedly with code {child.proc.returncode}; "
                            "stopping the others."
                        )
                        return 1
                    self._restart_when_due(child)
            return 0
        finally:
            self.stop_all()

    def _restart_when_due(self, child: Child) -> None:
        now = time.monotonic()
        if child.restart_at is None:
            # A run that lasted STABLE_AFTER_S was healthy: start the back-off over.
            if now - child.started_at >= STABLE_AFTER_S:
                child.quick_failures = 0
            delay = restart_delay(child.quick_failures)
            child.quick_failures += 1
            child.restart_at = now + delay
            _say(
                f"{child.name} exited with code {child.proc.returncode}; restarting it in {delay:g} s "
                f"(restart {child.restarts + 1})."
            )
            return
        if now < child.restart_at:
            return
        if child.before_restart is not None:
            try:
                child.before_restart()
            except Exception as exc:  # noqa: BLE001 - the restart matters more
                _say(f"before restarting {child.name}: {type(exc).__name__}: {exc}")
        stop_process(child.proc, timeout_s=0)  # closes its streams
        child.proc = child.restart()  # type: ignore[misc]
        child.started_at, child.restart_at = time.monotonic(), None
        child.restarts += 1
        _say(f"{child.name} restarted (pid {child.proc.pid}).")

    def stop_all(self) -> None:
        for child in reversed(self.children):
            stop_process(child.proc, timeout_s=child.stop_timeout_s)


def requeue_unacked(redis_url: str) -> int:
    """Put every task delivered but never acknowledged back on its queue; returns how many.

    Only for a broker whose one consumer just died (``difffit serve``'s own
    Redis): its unacked deliveries belong to nobody alive, and waiting out
    the visibility timeout (hours, for long jobs) would stall them. A fine-tune
    delivered twice anyway waits out a live owner's heartbeat.
    """
    from kombu import Connection

    with Connection(redis_url, transport_options={"visibility_timeout": 0}) as conn:
        channel = conn.default_channel
        client = channel.client
        pending = int(client.zcard(channel.unacked_index_key))
        if pending:
            channel.qos.restore_visible(num=pending + 100)
        return pending

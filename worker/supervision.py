"""What a worker does when its engine thread dies, and the test hook that kills it.

A dead engine cannot be restarted in place (the device may be in any state),
so the worker reports itself down, stops taking tasks and exits with
ENGINE_DEAD_EXIT_CODE for its supervisor (`difffit serve`, compose's
`restart:`, Kubernetes) to start a fresh one. Pending futures already failed
with EngineDead (core.engine.engine), so the warm shutdown is short: generate
tasks end with an `engine-dead` result, fine-tune tasks go back to the queue
unfinished, reserved tasks are restored to Redis when the consumer closes.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
import time
from collections.abc import Callable

from difffit.errors import EngineDead

log = logging.getLogger(__name__)

ENGINE_DEAD_EXIT_CODE = 70  # EX_SOFTWARE
# A warm shutdown waits for running tasks; one stuck in I/O must not keep a dead
# worker (holding its device and its heartbeat-less jobs) around for good.
HARD_EXIT_AFTER_S = 30.0


def handle_engine_death(error: EngineDead, publish_down: Callable[[], None] | None) -> None:
    """Report the worker down, start a warm shutdown, exit hard if it does not end."""
    log.critical("engine dead, the worker exits with %d: %s", ENGINE_DEAD_EXIT_CODE, error.message)
    from celery.worker import state

    # Read by the consumer loop: stop consuming, let running tasks end, exit with this code.
    state.should_stop = ENGINE_DEAD_EXIT_CODE
    threading.Thread(target=_exit_hard_later, args=(HARD_EXIT_AFTER_S,), daemon=True).start()
    if publish_down is not None:
        # Off this (the dying engine's) thread: a slow Redis must not delay failing the futures.
        threading.Thread(target=_publish_down, args=(publish_down,), name="difffit-down", daemon=True).start()


def _publish_down(publish_down: Callable[[], None]) -> None:
    try:
        publish_down()
    except Exception:  # noqa: BLE001 - exiting matters more than the report
        log.exception("could not publish the worker's down state")


def _exit_hard_later(after_s: float) -> None:
    time.sleep(after_s)
    log.critical("warm shutdown after the engine's death took over %.0f s; exiting now", after_s)
    logging.shutdown()
    os._exit(ENGINE_DEAD_EXIT_CODE)


def install_engine_kill_hook(engine_of: Callable[[], object | None]) -> bool:
    """TEST HOOK (DIFFFIT_TEST_HOOKS=true only): SIGUSR1 makes the engine loop raise.

    Must run on the main thread (signal handlers); replaces Celery's SIGUSR1
    traceback dump in that process. Returns whether it was installed.
    """
    if threading.current_thread() is not threading.main_thread():
        log.warning("test hook not installed: not on the main thread")
        return False

    def kill_engine(_signum, _frame) -> None:
        engine = engine_of()
        if engine is not None:
            engine.inject_fault("engine killed by the SIGUSR1 test hook")

    signal.signal(signal.SIGUSR1, kill_engine)
    log.warning("TEST HOOK enabled: SIGUSR1 kills this worker's engine thread")
    return True

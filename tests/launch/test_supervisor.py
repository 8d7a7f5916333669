"""launch.supervisor: `difffit serve` restarts its worker with back-off (issue 14)."""

from __future__ import annotations

import subprocess
import sys
import threading
import time

import redis

from launch import embedded, supervisor

SLEEPER = [sys.executable, "-c", "import time; time.sleep(60)"]


def test_restart_delays_double_up_to_the_cap():
    assert [supervisor.restart_delay(n) for n in range(7)] == [1, 2, 4, 8, 16, 30, 30]


def test_a_dead_worker_is_restarted_and_the_others_live_on(capsys, monkeypatch):
    monkeypatch.setattr(supervisor, "RESTART_BACKOFF_S", 0.05)
    sup = supervisor.Supervisor(poll_s=0.02)
    keeper = subprocess.Popen(SLEEPER)
    sup.add("keeper", keeper, stop_timeout_s=5)
    exits = iter([[sys.executable, "-c", "raise SystemExit(70)"], SLEEPER])
    requeued: list[bool] = []
    sup.add(
        "worker",
        subprocess.Popen([sys.executable, "-c", "raise SystemExit(70)"]),
        stop_timeout_s=5,
        restart=lambda: subprocess.Popen(next(exits)),
        before_restart=lambda: requeued.append(True),
    )
    worker = sup.children[1]

    def stop_once_restarted_twice():
        deadline = time.monotonic() + 30
        while worker.restarts < 2 or worker.proc.poll() is not None:
            assert time.monotonic() < deadline
            time.sleep(0.02)
        sup.stop_event.set()

    watcher = threading.Thread(target=stop_once_restarted_twice)
    watcher.start()
    assert sup.run() == 0
    watcher.join()
    assert keeper.poll() is not None and worker.proc.poll() is not None  # all stopped at the end
    assert requeued == [True, True]
    err = capsys.readouterr().err
    assert "worker exited with code 70; restarting it in 0.05 s (restart 1)" in err
    assert "worker exited with code 70; restarting it in 0.1 s (restart 2)" in err
    assert "stopping the others" not in err


def test_the_back_off_starts_over_after_a_stable_run(capsys):
    sup = supervisor.Supervisor()
    dead = subprocess.Popen([sys.executable, "-c", "raise SystemExit(137)"])
    dead.wait(30)
    sup.add("worker", dead, restart=lambda: subprocess.Popen(SLEEPER))
    child = sup.children[0]
    child.quick_failures = 5
    child.started_at = time.monotonic() - supervisor.STABLE_AFTER_S - 1
    sup._restart_when_due(child)
    assert "code 137; restarting it in 1 s" in capsys.readouterr().err
    assert child.quick_failures == 1 and child.restart_at is not None


def test_requeue_unacked_puts_a_dead_consumers_delivery_back(tmp_path):
    port = embedded.free_port()
    proc = embedded.start_redis(port, tmp_path, persistent=False)
    url = f"redis://127.0.0.1:{port}/0"
    try:
        from kombu import Connection

        with Connection(url) as conn:
            conn.SimpleQueue("jobs").put({"job": 1})
        # a consumer takes the message and dies without acking it (no clean close)
        code = (
            "import os, sys\n"
            "from kombu import Connection\n"
            "q = Connection(sys.argv[1]).SimpleQueue('jobs')\n"
            "q.get(timeout=10)\n"
            "os._exit(0)\n"
        )
        subprocess.run([sys.executable, "-c", code, url], check=True, timeout=60)
        client = redis.Redis.from_url(url)
        assert client.llen("jobs") == 0 and client.zcard("unacked_index") == 1
        assert supervisor.requeue_unacked(url) == 1
        assert client.llen("jobs") == 1 and client.zcard("unacked_index") == 0
        assert supervisor.requeue_unacked(url) == 0
        client.close()
    finally:
        embedded.stop_process(proc, timeout_s=5)

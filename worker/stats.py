"""Publishes the engine's statistics to Redis so the API can export and check them.

The API never talks to workers directly: each worker writes a
:class:`difffit.contract.WorkerStats` JSON under its own key with a short TTL;
a key that is present is a live worker.
"""

from __future__ import annotations

import contextlib
import logging
import threading

import redis

from difffit.contract import WORKER_STATS_INTERVAL_S, WORKER_STATS_KEY, AdapterSpec, WorkerStats

log = logging.getLogger(__name__)
DOWN_RECORD_TTL_S = 60


class StatsPublisher:
    """A daemon thread writing the runtime's stats every few seconds."""

    def __init__(self, redis_url: str, hostname: str, runtime, queues: list[str]):
        self.client = redis.Redis.from_url(redis_url, socket_timeout=2, socket_connect_timeout=2)
        self.key = WORKER_STATS_KEY.format(hostname)
        self.hostname, self.runtime, self.queues = hostname, runtime, queues
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="difffit-stats", daemon=True)

        self._spec: AdapterSpec | None = None

    def adapter_spec(self) -> AdapterSpec:
        """What an adapter file for this base must hold (for imports on the API side)."""
        if self._spec is None:
            model, base = self.runtime.engine.model, self.runtime.base
            self._spec = AdapterSpec(
                layers={name: int(layer.bias_bank.shape[1]) for name, layer in model.layers.items()},
                gamma_layers=[name for name, layer in model.layers.items() if layer.gamma_placeable],
                hidden_size=int(model.hidden_size),
                max_classes=int(model.most_classes),
                resolution=int(base.resolution),
                resolution_unit=int(base.vae_scale * base.transformer.config.patch_size),
            )
        return self._spec

    def snapshot(self) -> WorkerStats:
        engine, base = self.runtime.engine, self.runtime.base
        return WorkerStats(
            hostname=self.hostname,
            queues=self.queues,
            base_model=base.model_id,
            base_hash=base.content_hash,
            class_names=base.class_names,
            adapter_spec=self.adapter_spec(),
            resolution=base.resolution,
            **engine.stats(),
        )

    def publish(self) -> None:
        stats = self.snapshot()
        # A dead engine's record outlives its process a while: /readyz names the worker
        # until a restarted one (same hostname) replaces it.
        ttl = int(3 * WORKER_STATS_INTERVAL_S) if stats.engine_alive else DOWN_RECORD_TTL_S
        self.client.set(self.key, stats.model_dump_json(), ex=ttl)

    def start(self) -> StatsPublisher:
        self._thread.start()
        return self

    def stop(self, forget: bool = True) -> None:
        self._stop.set()
        if forget:
            with contextlib.suppress(redis.RedisError):
                self.client.delete(self.key)

    def _loop(self) -> None:
        while not self._stop.is_set():
            try:
                self.publish()
            except redis.RedisError as exc:  # Redis restarting: try again next tick
                log.warning("could not publish worker stats: %s", exc)
            except Exception:  # a bug here must not make a live worker look dead for good
                log.exception("could not build the worker stats")
            self._stop.wait(WORKER_STATS_INTERVAL_S)

"""Celery tasks. Results cross the broker as JSON: ok + result, or a domain error."""

from __future__ import annotations

import logging
import time

from celery import shared_task
from celery.exceptions import Reject

from difffit.contract import FINETUNE_TASK, GENERATE_TASK, FinetuneTask, GenerateTask
from difffit.errors import DiffFitError, EngineDead
from difffit.logging_setup import log_context

log = logging.getLogger(__name__)

#: Seconds before a fine-tune given back (this worker's cap taken) is offered again.
FINETUNE_REQUEUE_S = 5


@shared_task(name=GENERATE_TASK)
def generate(payload: dict) -> dict:
    """Sample images for one request; returns {"ok": True, "result": GenerateResult}."""
    from worker.celery_app import get_runtime

    try:
        task = GenerateTask.model_validate(payload)
        with log_context(task_id=task.request_id):
            result = get_runtime().generate(task)
        return {"ok": True, "result": result.model_dump()}
    except DiffFitError as exc:
        return {"ok": False, "error": exc.to_dict()}
    except Exception as exc:  # noqa: BLE001 - the client gets a clear error, the log the trace
        log.exception("generate failed")
        return {"ok": False, "error": {"code": "internal", "message": f"{type(exc).__name__}: {exc}"}}


@shared_task(name=FINETUNE_TASK, bind=True, max_retries=None)
def finetune(self, payload: dict) -> dict:
    """Run a fine-tuning job; its outcome lives in the registry, not in the result.

    At this worker's cap of concurrent fine-tunes the message is given back
    (Celery's retry: a copy requeued after FINETUNE_REQUEUE_S, this one acked)
    before the job is read, so its thread goes back to generate tasks.
    """
    from worker.celery_app import get_finetune_slots, get_runtime

    task = FinetuneTask.model_validate(payload)
    with log_context(job_id=task.job_id):
        runtime = get_runtime()
        slots = get_finetune_slots() if runtime.engine.dead is None else None
        if slots is not None and not slots.try_acquire():
            log.info("fine-tune cap (%d) taken; job %s requeued", slots.cap, task.job_id)
            raise self.retry(countdown=FINETUNE_REQUEUE_S)
        try:
            if runtime.engine.dead is not None:
                time.sleep(1.0)  # taken while this worker stops consuming: don't spin it through here
                raise runtime.engine.death_error()
            log.info("fine-tune job started")
            runtime.finetune(task.job_id)
        except EngineDead as exc:
            # Back to the queue, unacknowledged work for the next live worker; this
            # process is shutting down and takes nothing new (worker.celery_app).
            log.warning("engine dead; fine-tune job %s goes back to the queue: %s", task.job_id, exc)
            raise Reject(str(exc), requeue=True) from exc
        finally:
            if slots is not None:
                slots.release()
        log.info("fine-tune job ended")
    return {"ok": True, "job_id": task.job_id}

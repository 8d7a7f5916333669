"""Celery tasks. Results cross the broker as JSON: ok + result, or a domain error."""

from __future__ import annotations

import logging

from celery import shared_task

from difffit.contract import FINETUNE_TASK, GENERATE_TASK, FinetuneTask, GenerateTask
from difffit.errors import DiffFitError
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
    slots = get_finetune_slots()
    if not slots.try_acquire():
        log.info("fine-tune cap (%d) taken; job %s requeued", slots.cap, task.job_id)
        raise self.retry(countdown=FINETUNE_REQUEUE_S)
    try:
        with log_context(job_id=task.job_id):
            log.info("fine-tune job started")
            get_runtime().finetune(task.job_id)
            log.info("fine-tune job ended")
    finally:
        slots.release()
    return {"ok": True, "job_id": task.job_id}

"""`/api/jobs`: one view over the queue and the history, as the 1.58 frontend reads them."""

from __future__ import annotations

from typing import Callable

from .prompt_queue import QueueItem

JOB_STATUSES = ("pending", "in_progress", "completed", "failed", "cancelled")
PREVIEWABLE_MEDIA = ("images", "video", "audio", "3d")


def _workflow_id(extra_data: dict) -> str | None:
    pnginfo = extra_data.get("extra_pnginfo")
    workflow = pnginfo.get("workflow") if isinstance(pnginfo, dict) else None
    return workflow.get("id") if isinstance(workflow, dict) else None


def _outputs_summary(outputs: dict) -> tuple[int, int, dict | None]:
    """(number of output items, how many are previewable, the one to preview: an 'output' file first)."""
    count = previewable = 0
    preview = fallback = None
    for node_id, node_outputs in outputs.items():
        if not isinstance(node_outputs, dict):
            continue
        for media_type, items in node_outputs.items():
            if media_type == "animated" or not isinstance(items, list):
                continue
            for entry in items:
                count += 1
                if media_type not in PREVIEWABLE_MEDIA or not isinstance(entry, dict):
                    continue
                previewable += 1
                candidate = {**entry, "nodeId": node_id, "mediaType": media_type}
                if entry.get("type") == "output" and preview is None:
                    preview = candidate
                elif fallback is None:
                    fallback = candidate
    return count, previewable, preview or fallback


def queued_job(item: QueueItem, status: str) -> dict:
    job = {"id": item.prompt_id, "status": status, "priority": item.number,
           "create_time": item.extra_data.get("create_time", 0), "outputs_count": 0,
           "previewable_outputs_count": 0}
    workflow_id = _workflow_id(item.extra_data)
    if workflow_id is not None:
        job["workflow_id"] = workflow_id
    return job


def finished_job(prompt_id: str, record: dict, with_details: bool = False) -> dict:
    number, _, prompt, extra_data, _ = record["prompt"]
    status_info = record.get("status") or {}
    start = end = error = None
    interrupted = False
    for event, data in status_info.get("messages", []):
        if event == "execution_start":
            start = data.get("timestamp")
        elif event in ("execution_success", "execution_error", "execution_interrupted"):
            end = data.get("timestamp")
            error = data if event == "execution_error" else error
            interrupted = interrupted or event == "execution_interrupted"
    if status_info.get("status_str") == "success":
        status = "completed"
    else:
        status = "cancelled" if interrupted else "failed"
    count, previewable, preview = _outputs_summary(record.get("outputs", {}))
    job = {"id": prompt_id, "status": status, "priority": number,
           "create_time": extra_data.get("create_time", 0), "execution_start_time": start,
           "execution_end_time": end, "outputs_count": count, "previewable_outputs_count": previewable}
    optional = {"execution_error": error, "preview_output": preview, "workflow_id": _workflow_id(extra_data)}
    job.update({key: value for key, value in optional.items() if value is not None})
    if with_details:
        job.update(outputs=record.get("outputs", {}), execution_status=status_info,
                   workflow={"prompt": prompt, "extra_data": extra_data})
    return job


def _job_sort_key(sort_by: str) -> Callable[[dict], float]:
    if sort_by == "execution_duration":
        def duration(job: dict) -> float:
            start, end = job.get("execution_start_time"), job.get("execution_end_time")
            return end - start if start and end else 0
        return duration
    return lambda job: job.get("create_time") or 0


class JobList:
    """`GET /api/jobs` listings. A history record never changes once written, so its job summary is made
    once and reused while the record stays in history (the frontend asks again on every queue change)."""

    def __init__(self) -> None:
        self._finished: dict[str, tuple[dict, dict]] = {}  # prompt_id -> (record, its summary)

    def finished_jobs(self, history: dict[str, dict]) -> list[dict]:
        known, self._finished = self._finished, {}
        for prompt_id, record in history.items():
            entry = known.get(prompt_id)
            if entry is None or entry[0] is not record:
                entry = (record, finished_job(prompt_id, record))
            self._finished[prompt_id] = entry
        return [job for _, job in self._finished.values()]

    def list(self, running: list[QueueItem], pending: list[QueueItem], history: dict[str, dict],
             statuses: list[str], workflow_id: str | None, sort_by: str, sort_order: str) -> list[dict]:
        """Every job of the given statuses (and workflow, when named), sorted; the caller pages."""
        jobs = [queued_job(item, "in_progress") for item in running]
        jobs += [queued_job(item, "pending") for item in pending]
        jobs += self.finished_jobs(history)
        jobs = [job for job in jobs if job["status"] in statuses
                and (workflow_id is None or job.get("workflow_id") == workflow_id)]
        jobs.sort(key=_job_sort_key(sort_by), reverse=sort_order == "desc")
        return jobs


def find_job(job_id: str, running: list[QueueItem], pending: list[QueueItem], history: dict[str, dict]) -> dict | None:
    """One job with its details when finished, or None."""
    if job_id in history:
        return finished_job(job_id, history[job_id], with_details=True)
    for items, status in ((running, "in_progress"), (pending, "pending")):
        for item in items:
            if item.prompt_id == job_id:
                return queued_job(item, status)
    return None

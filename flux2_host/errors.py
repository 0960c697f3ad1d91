"""ComfyUI's error object, which prompt validation (no web server needed: `flux2 run` uses it too) and every
JSON refusal of the server share."""

from __future__ import annotations


def error_body(error_type: str, message: str, details: str | None = None, extra_info: dict | None = None) -> dict:
    """What prompt validation reports (per prompt and per node input), what /prompt answers and what every
    other refusal answers too. `details` defaults to the message."""
    return {"type": error_type, "message": message, "details": message if details is None else details,
            "extra_info": extra_info if extra_info is not None else {}}

"""Training data sources -> one list of items (target image, caption, control images), bad items reported.

Accepted sources (several datasets per run):
- musubi-tuner's dataset TOML: `[general]` defaults and `[[datasets]]` entries with `image_directory` (images
  with same-name caption files) or `image_jsonl_file` (`{"image_path", "caption", "control_path"|"control_path_0"..}`
  per line), `caption_extension`, `resolution` (int or [w, h]), `batch_size`, `num_repeats`, `enable_bucket`,
  `bucket_no_upscale`, `control_directory` (`name_0.png`, `name_1.png`... or `name.png` are the references of
  `name.*`), `cache_directory`; `metadata_file` reads a DiffSynth metadata file inside a musubi entry.
- DiffSynth-Studio metadata: `metadata.csv` / `.json` / `.jsonl` with `image`, `prompt` and an optional
  `edit_image` (a path or a list), paths relative to the metadata file's folder.
- A folder of images with same-name caption files.

Nothing here decodes pixels: `buckets.open_image_size` checks each image when the run is prepared, and items
that fail (unreadable, missing caption, too small) are skipped with a report instead of ending the run.
"""

from __future__ import annotations

import csv
import json
import logging
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import Flux2Error

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


@dataclass(frozen=True)
class ImageItem:
    image: Path
    caption: str
    controls: tuple[Path, ...] = ()


@dataclass
class DatasetSpec:
    """One `[[datasets]]` entry after `[general]` defaults are applied."""

    items: list[ImageItem]
    resolution: tuple[int, int] = (1024, 1024)  # (width, height): the bucket area
    batch_size: int = 1
    num_repeats: int = 1
    enable_bucket: bool = True
    bucket_no_upscale: bool = False
    cache_directory: str = ""
    source: str = ""  # where it was read from, for messages and metadata


@dataclass
class DataReport:
    """Items skipped while reading or preparing the data, with why."""

    skipped: list[tuple[str, str]] = field(default_factory=list)

    def skip(self, what: str, why: str) -> None:
        log.warning("skipped %s: %s", what, why)
        self.skipped.append((what, why))


def _resolution(value: Any, where: str) -> tuple[int, int]:
    if isinstance(value, int):
        return value, value
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(isinstance(v, int) for v in value):
        return int(value[0]), int(value[1])
    raise Flux2Error(f"{where}: resolution: expected an integer or [width, height], found {value!r}")


def _controls_in(directory: Path | None, stem: str) -> tuple[Path, ...]:
    """musubi's rule: `stem_0.png, stem_1.png, ...` (or a single `stem.*`) in the control directory."""
    if directory is None:
        return ()
    numbered = []
    for index in range(64):
        found = [directory / f"{stem}_{index}{ext}" for ext in IMAGE_EXTENSIONS if (directory / f"{stem}_{index}{ext}").exists()]
        if not found:
            break
        numbered.append(found[0])
    if numbered:
        return tuple(numbered)
    single = [directory / f"{stem}{ext}" for ext in IMAGE_EXTENSIONS if (directory / f"{stem}{ext}").exists()]
    return tuple(single[:1])


def read_image_directory(directory: Path, caption_extension: str, control_directory: Path | None,
                         report: DataReport) -> list[ImageItem]:
    if not directory.is_dir():
        raise Flux2Error(f"image_directory: expected a folder, found nothing at {directory}")
    items = []
    for image in sorted(p for p in directory.iterdir() if p.suffix.lower() in IMAGE_EXTENSIONS):
        caption_file = image.with_suffix(caption_extension)
        try:
            caption = caption_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as error:
            report.skip(str(image), f"no readable caption file {caption_file.name} ({error.__class__.__name__})")
            continue
        items.append(ImageItem(image, caption, _controls_in(control_directory, image.stem)))
    return items


def _record_item(record: Any, base: Path, where: str, image_key: str, caption_key: str,
                 report: DataReport) -> ImageItem | None:
    if not isinstance(record, dict) or image_key not in record:
        report.skip(where, f"expected an object with {image_key!r} and {caption_key!r}, found {record!r:.120}")
        return None
    caption = record.get(caption_key)
    if not isinstance(caption, str):
        report.skip(where, f"missing caption {caption_key!r}")
        return None
    controls: list[str] = []
    for key in ("edit_image", "control_path"):
        value = record.get(key)
        if isinstance(value, str) and value:
            controls.append(value)
        elif isinstance(value, list):
            controls.extend(str(v) for v in value)
    index = 0
    while f"control_path_{index}" in record:
        controls.append(str(record[f"control_path_{index}"]))
        index += 1
    return ImageItem(base / str(record[image_key]), caption.strip(), tuple(base / c for c in controls))


def read_metadata_file(path: Path, report: DataReport) -> list[ImageItem]:
    """DiffSynth's metadata.csv / .json / .jsonl (image, prompt, edit_image), or musubi's image JSONL
    (image_path, caption, control_path...)."""
    base = path.parent
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise Flux2Error(f"{path}: cannot read the dataset metadata: {error}") from None
    records: list[tuple[str, Any]] = []
    if path.suffix == ".csv":
        for row, record in enumerate(csv.DictReader(text.splitlines()), start=2):
            edit = record.get("edit_image") or ""
            if edit.startswith("["):
                record["edit_image"] = json.loads(edit)
            records.append((f"{path}:{row}", record))
    elif path.suffix == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as error:
            raise Flux2Error(f"{path}: expected a JSON list of records, cannot parse: {error}") from None
        records = [(f"{path}[{i}]", r) for i, r in enumerate(data if isinstance(data, list) else [])]
    elif path.suffix == ".jsonl":
        for line_no, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                records.append((f"{path}:{line_no}", json.loads(line)))
            except json.JSONDecodeError as error:
                report.skip(f"{path}:{line_no}", f"not JSON: {error}")
    else:
        raise Flux2Error(f"{path}: expected a .csv, .json or .jsonl metadata file")
    items = []
    for where, record in records:
        musubi = isinstance(record, dict) and "image_path" in record
        item = _record_item(record, base, where, "image_path" if musubi else "image",
                            "caption" if musubi else "prompt", report)
        if item is not None:
            items.append(item)
    return items


def read_dataset_toml(path: Path, defaults: dict[str, Any], report: DataReport) -> list[DatasetSpec]:
    """musubi-tuner's dataset config; relative paths resolve against the TOML's folder."""
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise Flux2Error(f"{path}: cannot read the dataset config: {error}") from None
    entries = data.get("datasets")
    if not isinstance(entries, list) or not entries:
        raise Flux2Error(f"{path}: expected at least one [[datasets]] table, found none")
    general = {**defaults, **data.get("general", {})}
    base = path.parent
    specs = []
    for index, entry in enumerate(entries):
        where = f"{path} [[datasets]] #{index + 1}"
        options = {**general, **entry}
        control_directory = base / options["control_directory"] if options.get("control_directory") else None
        if "image_directory" in options:
            items = read_image_directory(base / options["image_directory"], options.get("caption_extension", ".txt"),
                                         control_directory, report)
        elif "image_jsonl_file" in options or "metadata_file" in options:
            items = read_metadata_file(base / options.get("image_jsonl_file", options.get("metadata_file")), report)
        else:
            raise Flux2Error(f"{where}: expected image_directory, image_jsonl_file or metadata_file")
        cache = options.get("cache_directory", "")
        specs.append(DatasetSpec(
            items=items, resolution=_resolution(options.get("resolution", 1024), where),
            batch_size=int(options.get("batch_size", 1)), num_repeats=int(options.get("num_repeats", 1)),
            enable_bucket=bool(options.get("enable_bucket", True)),
            bucket_no_upscale=bool(options.get("bucket_no_upscale", False)),
            cache_directory=str(base / cache) if cache else "", source=where))
    return specs


def read_datasets(source: str | Path, resolution: int = 1024, caption_extension: str = ".txt",
                  report: DataReport | None = None) -> list[DatasetSpec]:
    """Any supported source -> dataset specs (the TOML's own settings win over `resolution`/`caption_extension`)."""
    path = Path(source)
    report = report if report is not None else DataReport()
    defaults = {"resolution": resolution, "caption_extension": caption_extension}
    if path.is_dir():
        specs = [DatasetSpec(read_image_directory(path, caption_extension, None, report),
                             resolution=(resolution, resolution), source=str(path))]
    elif path.suffix == ".toml":
        specs = read_dataset_toml(path, defaults, report)
    elif path.suffix in (".csv", ".json", ".jsonl"):
        specs = [DatasetSpec(read_metadata_file(path, report), resolution=(resolution, resolution), source=str(path))]
    else:
        raise Flux2Error(f"dataset_config: expected a dataset .toml, a metadata .csv/.json/.jsonl or an image "
                         f"folder, found {path}")
    if not any(spec.items for spec in specs):
        raise Flux2Error(f"{path}: no usable training images found ({len(report.skipped)} skipped)")
    return specs

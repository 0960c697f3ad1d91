"""Model, input, output, temp and user folders, with the API of ComfyUI's `folder_paths` module.

Node packs written for ComfyUI `import folder_paths` and call these functions by name, so the names,
arguments and return shapes follow ComfyUI; `install_as_folder_paths()` makes this module answer that
import. State is module-level for the same reason: packs read `folder_paths.models_dir` and mutate
`folder_paths.folder_names_and_paths` directly.

A combo list of models is the sorted union, over every search root of a folder kind, of the relative
paths of files with a model extension. A model *folder* (Hugging Face or diffusers layout) is listed as
one entry, its relative folder path, and never entered.
"""

from __future__ import annotations

import mimetypes
import os
import sys
import tempfile
import time
from collections.abc import Collection, Iterable

import yaml

supported_pt_extensions: set[str] = {".ckpt", ".pt", ".pt2", ".bin", ".pth", ".safetensors", ".pkl", ".sft"}

# The kinds ComfyUI knows, with their folders under models/ (first one is where new files go).
_DEFAULT_MODEL_FOLDERS: dict[str, tuple[list[str], Collection[str]]] = {
    "checkpoints": (["checkpoints"], supported_pt_extensions),
    "configs": (["configs"], {".yaml"}),
    "loras": (["loras"], supported_pt_extensions),
    "vae": (["vae"], supported_pt_extensions),
    "text_encoders": (["text_encoders", "clip"], supported_pt_extensions),
    # GGUF DiTs load from UNETLoader too; "unet_gguf" is the list ComfyUI-GGUF's UnetLoaderGGUF declares.
    "diffusion_models": (["diffusion_models", "unet"], supported_pt_extensions | {".gguf"}),
    "unet_gguf": (["diffusion_models", "unet"], {".gguf"}),
    "clip_vision": (["clip_vision"], supported_pt_extensions),
    "style_models": (["style_models"], supported_pt_extensions),
    "embeddings": (["embeddings"], supported_pt_extensions),
    "diffusers": (["diffusers"], {"folder"}),
    "vae_approx": (["vae_approx"], supported_pt_extensions),
    "controlnet": (["controlnet", "t2i_adapter"], supported_pt_extensions),
    "gligen": (["gligen"], supported_pt_extensions),
    "upscale_models": (["upscale_models"], supported_pt_extensions),
    "latent_upscale_models": (["latent_upscale_models"], supported_pt_extensions),
    "hypernetworks": (["hypernetworks"], supported_pt_extensions),
    "photomaker": (["photomaker"], supported_pt_extensions),
    "classifiers": (["classifiers"], {""}),
    "model_patches": (["model_patches"], supported_pt_extensions),
    "audio_encoders": (["audio_encoders"], supported_pt_extensions),
}

# Old kind names that workflows and packs still use.
_LEGACY_NAMES = {"unet": "diffusion_models", "clip": "text_encoders"}

# A folder holding one of these is a whole model in Hugging Face / diffusers layout.
_MODEL_FOLDER_MARKERS = ("config.json", "model_index.json")

base_path: str = os.getcwd()
models_dir: str = os.path.join(base_path, "models")
output_directory: str = os.path.join(base_path, "output")
input_directory: str = os.path.join(base_path, "input")
temp_directory: str = os.path.join(base_path, "temp")
user_directory: str = os.path.join(base_path, "user")

# Some packs clear this after downloading a model; we never cache listings, so it stays empty.
filename_list_cache: dict = {}


# Folders of node packs (os.pathsep-separated) for runs that cannot pass --custom-nodes-dir, e.g. under a tool
# that starts `flux2 run` itself.
CUSTOM_NODES_ENV = "FLUX2_CUSTOM_NODES_DIR"


def custom_nodes_from_environment() -> list[str]:
    return [path for path in os.environ.get(CUSTOM_NODES_ENV, "").split(os.pathsep) if path.strip()]


def _default_folder_table(root: str, custom_nodes: Iterable[str] = ()) -> dict[str, tuple[list[str], Collection[str]]]:
    table = {
        kind: ([os.path.join(root, sub) for sub in subs], extensions)
        for kind, (subs, extensions) in _DEFAULT_MODEL_FOLDERS.items()
    }
    # Node packs: the folders given, else those in $FLUX2_CUSTOM_NODES_DIR, else custom_nodes/ next to models/ (as
    # in a ComfyUI checkout).
    custom_roots = [os.path.abspath(path) for path in list(custom_nodes) or custom_nodes_from_environment()]
    table["custom_nodes"] = (custom_roots or [os.path.join(os.path.dirname(root), "custom_nodes")], set())
    return table


folder_names_and_paths: dict[str, tuple[list[str], Collection[str]]] = _default_folder_table(models_dir)


def configure(
    models: str | None = None,
    input_dir: str | None = None,
    output_dir: str | None = None,
    temp_dir: str | None = None,
    user_dir: str | None = None,
    extra_model_paths: Iterable[str] = (),
    custom_nodes: Iterable[str] = (),
) -> None:
    """Point every folder at its place (defaults: ./models, ./input, ./output, ./temp, ./user, node packs in
    $FLUX2_CUSTOM_NODES_DIR or custom_nodes/ next to models/), add the search roots of each
    extra_model_paths.yaml, then create the input/output/temp folders."""
    global models_dir, output_directory, input_directory, temp_directory, user_directory
    models_dir = os.path.abspath(models or os.path.join(base_path, "models"))
    folder_names_and_paths.clear()
    folder_names_and_paths.update(_default_folder_table(models_dir, custom_nodes))
    input_directory = os.path.abspath(input_dir or os.path.join(base_path, "input"))
    output_directory = os.path.abspath(output_dir or os.path.join(base_path, "output"))
    temp_directory = os.path.abspath(temp_dir or os.path.join(base_path, "temp"))
    user_directory = os.path.abspath(user_dir or os.path.join(base_path, "user"))
    for config in extra_model_paths:
        load_extra_model_paths(config)
    # The user folder is the server's business; a headless run should not leave one behind.
    for directory in (input_directory, output_directory, temp_directory):
        os.makedirs(directory, exist_ok=True)


def load_extra_model_paths(config_path: str) -> None:
    """Add the search roots an extra_model_paths.yaml names.

    Each top-level section may give `base_path` (relative to the yaml's folder) and `is_default` (put its
    roots first), then `kind: path` entries; a value may hold several paths, one per line. Relative paths
    resolve against base_path, or the yaml's folder when there is none.
    """
    yaml_dir = os.path.dirname(os.path.abspath(config_path))
    with open(config_path, encoding="utf-8") as f:
        try:
            config = yaml.safe_load(f) or {}
        except yaml.YAMLError as exc:
            raise ValueError(f"{config_path}: not valid YAML ({exc})") from None
    if not isinstance(config, dict):
        raise ValueError(f"{config_path}: expected sections of 'folder: path' entries, found {type(config).__name__}")
    for section in config.values():
        if not isinstance(section, dict):
            continue
        section = dict(section)
        section_base = section.pop("base_path", None)
        is_default = bool(section.pop("is_default", False))
        section_root = os.path.join(yaml_dir, _expand(str(section_base))) if section_base else yaml_dir
        for kind, value in section.items():
            if not isinstance(value, str):
                continue  # e.g. download_model_base flags that are not search roots
            roots = [os.path.normpath(os.path.join(section_root, _expand(line.strip())))
                     for line in value.splitlines() if line.strip()]
            # Default roots are each put first, so add them last-to-first to keep the yaml's order.
            for root in reversed(roots) if is_default else roots:
                add_model_folder_path(kind, root, is_default)


def _expand(path: str) -> str:
    return os.path.expandvars(os.path.expanduser(path))


def install_as_folder_paths() -> None:
    """Answer `import folder_paths` with this module, so ComfyUI node packs run in our host."""
    sys.modules["folder_paths"] = sys.modules[__name__]


# --- input / output / temp / user --------------------------------------------------------------


def set_output_directory(output_dir: str) -> None:
    global output_directory
    output_directory = output_dir


def set_temp_directory(temp_dir: str) -> None:
    global temp_directory
    temp_directory = temp_dir


def set_input_directory(input_dir: str) -> None:
    global input_directory
    input_directory = input_dir


def set_user_directory(user_dir: str) -> None:
    global user_directory
    user_directory = user_dir


def get_output_directory() -> str:
    return output_directory


def get_temp_directory() -> str:
    return temp_directory


def get_input_directory() -> str:
    return input_directory


def get_user_directory() -> str:
    return user_directory


def get_public_user_directory(user: str = "default") -> str:
    """The folder of one user's data (settings, saved workflows): user/<name>."""
    return os.path.join(user_directory, user)


def get_directory_by_type(type_name: str) -> str | None:
    """The folder behind a `type` of /view and /upload; only these three are reachable over HTTP."""
    return {"output": output_directory, "input": input_directory, "temp": temp_directory}.get(type_name)


def annotated_filepath(name: str) -> tuple[str, str | None]:
    """Split 'file.png [output]' into the name and the folder its annotation names (None if none)."""
    for annotation in ("output", "input", "temp"):
        suffix = f"[{annotation}]"
        if name.endswith(suffix):
            return name[: -len(suffix)].rstrip(), get_directory_by_type(annotation)
    return name, None


def get_annotated_filepath(name: str, default_dir: str | None = None) -> str:
    name, directory = annotated_filepath(name)
    return os.path.join(directory or default_dir or input_directory, name)


def exists_annotated_filepath(name: str) -> bool:
    return os.path.exists(get_annotated_filepath(name))


def filter_files_content_types(files: list[str], content_types: Collection[str]) -> list[str]:
    """Keep the files whose MIME major type (image, video, audio...) is one of content_types."""
    kept = []
    for file in files:
        mime, _ = mimetypes.guess_type(file, strict=False)
        if file.lower().endswith(".webp"):
            mime = "image/webp"  # not in every platform's MIME table
        if mime and mime.split("/")[0] in content_types:
            kept.append(file)
    return kept


def get_input_subfolders() -> list[str]:
    """Every folder below input/, as relative paths with forward slashes."""
    found = []
    for root, dirs, _ in os.walk(input_directory):
        for d in dirs:
            found.append(os.path.relpath(os.path.join(root, d), input_directory).replace(os.sep, "/"))
    return sorted(found)


# --- model folders ------------------------------------------------------------------------------


def map_legacy(folder_name: str) -> str:
    return _LEGACY_NAMES.get(folder_name, folder_name)


def add_model_folder_path(folder_name: str, full_folder_path: str, is_default: bool = False) -> None:
    """Add a search root for a kind of model; `is_default` puts it first (where lookups look first)."""
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        folder_names_and_paths[folder_name] = ([], set())
    roots = folder_names_and_paths[folder_name][0]
    if full_folder_path in roots:
        roots.remove(full_folder_path)
    if is_default:
        roots.insert(0, full_folder_path)
    else:
        roots.append(full_folder_path)


def get_folder_paths(folder_name: str) -> list[str]:
    return list(folder_names_and_paths[map_legacy(folder_name)][0])


def is_model_folder(path: str) -> bool:
    """Whether a directory is one whole model in Hugging Face or diffusers layout."""
    try:
        names = os.listdir(path)
    except OSError:
        return False
    return any(
        name in _MODEL_FOLDER_MARKERS
        or name.endswith(".safetensors.index.json")
        or (name.startswith("diffusion_pytorch_model") and name.endswith(".safetensors"))
        for name in names
    )


def _lists_model_folders(extensions: Collection[str]) -> bool:
    return ".safetensors" in extensions or "folder" in extensions


def recursive_search(directory: str, excluded_dir_names: Collection[str] = (".git",),
                     model_folders_as_entries: bool = False) -> tuple[list[str], dict[str, float]]:
    """Relative paths of the files below `directory` and the mtime of every folder visited.

    With `model_folders_as_entries`, a model folder is reported as one entry and not entered.
    """
    if not os.path.isdir(directory):
        return [], {}
    files: list[str] = []
    folder_mtimes: dict[str, float] = {}
    for root, dirs, names in os.walk(directory, followlinks=True):
        folder_mtimes[root] = os.path.getmtime(root)
        kept_dirs = []
        for d in dirs:
            if d in excluded_dir_names:
                continue
            full = os.path.join(root, d)
            if model_folders_as_entries and is_model_folder(full):
                files.append(os.path.relpath(full, directory))
            else:
                kept_dirs.append(d)
        dirs[:] = kept_dirs
        files.extend(os.path.relpath(os.path.join(root, name), directory) for name in names)
    return files, folder_mtimes


def _has_extension(name: str, extensions: Collection[str]) -> bool:
    return not extensions or os.path.splitext(name)[-1].lower() in extensions


def filter_files_extensions(files: Collection[str], extensions: Collection[str]) -> list[str]:
    """The files whose extension is in `extensions` (all files when it is empty), sorted."""
    return sorted(f for f in files if _has_extension(f, extensions))


def list_model_entries(folder_name: str) -> list[tuple[str, int]]:
    """Every (combo entry, index of the search root holding it) of a kind of model, in root order."""
    roots, extensions = folder_names_and_paths[map_legacy(folder_name)]
    with_folders = _lists_model_folders(extensions)
    entries = []
    for index, root in enumerate(roots):
        files, _ = recursive_search(root, model_folders_as_entries=with_folders)
        for rel in sorted(files):
            # Directories only come back when model folders are wanted.
            if os.path.isdir(os.path.join(root, rel)) or _has_extension(rel, extensions):
                entries.append((rel.replace(os.sep, "/"), index))
    return entries


def get_filename_list(folder_name: str) -> list[str]:
    """The combo list of a kind of model: sorted, '/'-separated, unique over all its search roots."""
    return sorted({name for name, _ in list_model_entries(folder_name)})


def get_full_path(folder_name: str, filename: str) -> str | None:
    """Where a combo entry lives: the first search root holding it, or None.

    The name is made relative first, so '../x' or '/etc/x' cannot leave the roots.
    """
    folder_name = map_legacy(folder_name)
    if folder_name not in folder_names_and_paths:
        return None
    roots, extensions = folder_names_and_paths[folder_name]
    relative = os.path.relpath(os.path.join(os.sep, _with_os_separators(filename)), os.sep)
    for root in roots:
        full = os.path.join(root, relative)
        if os.path.isfile(full):
            return full
        if os.path.isdir(full) and _lists_model_folders(extensions) and is_model_folder(full):
            return full
    return None


def _with_os_separators(name: str) -> str:
    # Workflows saved on Windows name files with backslashes; elsewhere '\\' is a legal file-name character,
    # but no combo lists one (entries use '/'), so it is read as a separator.
    return name.replace("\\", "/") if os.sep == "/" else name


def match_listed_name(name: str, entries: Collection[str]) -> str | None:
    """The combo entry a model name saved on another system means: the entry equal to it with '/' for '\\',
    else the one entry equal to that ignoring case (Windows file names are case-insensitive); None if none."""
    slashed = name.replace("\\", "/")
    if slashed in entries:
        return slashed
    folded = [entry for entry in entries if isinstance(entry, str) and entry.casefold() == slashed.casefold()]
    return folded[0] if len(folded) == 1 else None


def get_full_path_or_raise(folder_name: str, filename: str) -> str:
    full = get_full_path(folder_name, filename)
    if full is None:
        roots = get_folder_paths(folder_name) if map_legacy(folder_name) in folder_names_and_paths else []
        raise FileNotFoundError(f"Model in folder '{folder_name}' with filename '{filename}' not found "
                                f"(searched: {', '.join(roots) or 'no such folder kind'}).")
    return full


# --- paths and writes that stay inside a folder ---------------------------------------------------------


def is_inside(root: str, path: str) -> bool:
    """Whether `path` is `root` or below it (after resolving '..'); a NUL byte is never a path."""
    if "\0" in root or "\0" in path:  # os calls would raise ValueError on it
        return False
    root, path = os.path.abspath(root), os.path.abspath(path)
    try:
        return os.path.commonpath((root, path)) == root
    except ValueError:  # different drives on Windows
        return False


def write_atomically(path: str, data: bytes) -> None:
    """Write through a temp file in the same folder and rename over, so a crash never leaves half a file."""
    directory = os.path.dirname(path)
    os.makedirs(directory, exist_ok=True)
    fd, temp_path = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        # mkstemp makes the file private; keep a replaced file's mode, or the usual one for a new file.
        os.chmod(temp_path, os.stat(path).st_mode & 0o777 if os.path.exists(path) else 0o644)
        os.replace(temp_path, path)
    except BaseException:
        os.unlink(temp_path)
        raise


# --- saving -------------------------------------------------------------------------------------


def _expand_prefix_variables(prefix: str, width: int, height: int) -> str:
    now = time.localtime()
    values = {
        "width": width, "height": height, "year": now.tm_year, "month": f"{now.tm_mon:02}",
        "day": f"{now.tm_mday:02}", "hour": f"{now.tm_hour:02}", "minute": f"{now.tm_min:02}",
        "second": f"{now.tm_sec:02}",
    }
    for name, value in values.items():
        prefix = prefix.replace(f"%{name}%", str(value))
    return prefix


def get_save_image_path(filename_prefix: str, output_dir: str, image_width: int = 0,
                        image_height: int = 0) -> tuple[str, str, int, str, str]:
    """Where the next image of a prefix goes: (full_output_folder, filename, counter, subfolder, prefix).

    The counter continues after the highest existing `{filename}_{NNNNN}_` in that folder. A prefix that
    would leave output_dir is refused.
    """
    if "%" in filename_prefix:
        filename_prefix = _expand_prefix_variables(filename_prefix, image_width, image_height)
    subfolder = os.path.dirname(os.path.normpath(filename_prefix))
    filename = os.path.basename(os.path.normpath(filename_prefix))
    output_dir = os.path.abspath(output_dir)
    full_output_folder = os.path.abspath(os.path.join(output_dir, subfolder))
    if not is_inside(output_dir, full_output_folder):
        raise ValueError(f"Saving outside the output folder is not allowed: prefix {filename_prefix!r} "
                         f"points at {full_output_folder}, outside {output_dir}")
    os.makedirs(full_output_folder, exist_ok=True)
    counter = 1
    stem = os.path.normcase(filename) + "_"
    for existing in os.listdir(full_output_folder):
        if not os.path.normcase(existing).startswith(stem):
            continue
        digits = existing[len(stem):].split("_")[0]
        if digits.isdigit():
            counter = max(counter, int(digits) + 1)
    return full_output_folder, filename, counter, subfolder, filename_prefix


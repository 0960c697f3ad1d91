"""A prompt killed after its SaveImage wrote but before its result was recorded runs again after the restart
and writes the same file, not a second one (issue 11: "every accepted prompt completes exactly once").

The kill is simulated in-process where it matters: the queue's `finish` dies as a killed process would,
after SaveImage has written its files. A second queue on the same database then restores and runs it.
"""

from __future__ import annotations

import pytest
from PIL import Image

from flux2_host import folders
from flux2_host.persistence import PromptStore
from flux2_host.prompt_queue import PromptQueue, PromptWorker, QueueItem
from flux2_host.executor import PromptExecutor
from flux2_host.run import build_registry
from test_redis_workers import redis_url  # noqa: F401  (a redis-server on loopback, as the scale-out tests start)


class Killed(BaseException):
    """What a kill looks like from inside: no `except Exception` handler runs."""


class SilentHub:
    """The WebSocket hub, with no clients connected."""

    def send(self, event: str, data: dict, sid: str | None = None) -> None:
        pass

    def send_preview(self, *args) -> None:
        pass


def saving_prompt(color: int) -> dict:
    return {"1": {"class_type": "EmptyImage", "inputs": {"width": 16, "height": 8, "batch_size": 2, "color": color}},
            "2": {"class_type": "SaveImage", "inputs": {"images": ["1", 0], "filename_prefix": "again/fox"}}}


@pytest.fixture
def output_dir(tmp_path):
    folders.configure(models=str(tmp_path / "models"), input_dir=str(tmp_path / "in"),
                      output_dir=str(tmp_path / "out"), temp_dir=str(tmp_path / "tmp"), user_dir=str(tmp_path / "user"))
    return tmp_path / "out"


def run_next(queue: PromptQueue, executor: PromptExecutor) -> QueueItem:
    item, _ = queue.wait_for_work()
    PromptWorker(queue, executor, SilentHub())._execute(item)
    return item


def saved_files(output_dir) -> list[str]:
    return sorted(path.name for path in (output_dir / "again").iterdir())


def test_a_prompt_killed_after_saving_writes_the_same_files_when_it_runs_again(tmp_path, output_dir):
    database = str(tmp_path / "user" / "queue.sqlite3")
    executor = PromptExecutor(build_registry())
    store = PromptStore(database)
    queue = PromptQueue(on_change=lambda remaining: None, store=store)
    queue.put_new(QueueItem(1, "earlier", saving_prompt(0x000000), {}, ["2"]))
    run_next(queue, executor)
    assert saved_files(output_dir) == ["fox_00001_.png", "fox_00002_.png"]

    queue.put_new(QueueItem(2, "killed", saving_prompt(0xFF0000), {}, ["2"]))

    def killed_before_recording(item, record):
        raise Killed("SIGKILL between SaveImage's write and the prompt's record")

    queue.finish = killed_before_recording
    with pytest.raises(Killed):
        run_next(queue, executor)
    assert saved_files(output_dir) == ["fox_00001_.png", "fox_00002_.png", "fox_00003_.png", "fox_00004_.png"]
    store.close()

    restarted = PromptQueue(on_change=lambda remaining: None, store=PromptStore(database))
    assert restarted.restore("requeue") == (1, 1)
    item = run_next(restarted, PromptExecutor(build_registry()))
    assert item.prompt_id == "killed"
    # The same two names, written again (whole: each through a temp file and a rename), and no third image.
    assert saved_files(output_dir) == ["fox_00001_.png", "fox_00002_.png", "fox_00003_.png", "fox_00004_.png"]
    record = restarted.history_item("killed")
    assert [image["filename"] for image in record["outputs"]["2"]["images"]] == ["fox_00003_.png", "fox_00004_.png"]
    with Image.open(output_dir / "again" / "fox_00004_.png") as image:
        assert image.getpixel((0, 0)) == (255, 0, 0)

    # Once recorded, the prompt never runs again: its names are dropped, and later prompts count on.
    assert restarted._store.saved_outputs("killed").recorded("2") == {}
    restarted.put_new(QueueItem(3, "later", saving_prompt(0x00FF00), {}, ["2"]))
    run_next(restarted, PromptExecutor(build_registry()))
    assert saved_files(output_dir)[-2:] == ["fox_00005_.png", "fox_00006_.png"]


def test_without_a_record_save_image_names_files_as_before(output_dir):
    """`flux2 run` and direct calls install no record: every call takes the next counter."""
    from flux2_host.core_nodes.images import SaveImage
    import torch

    for _ in range(2):
        SaveImage().save_images(torch.rand(1, 8, 8, 3), filename_prefix="fox", unique_id="2")
    assert sorted(path.name for path in output_dir.iterdir()) == ["fox_00001_.png", "fox_00002_.png"]


def test_save_image_cuts_pixels_to_8_bits_as_comfyui_does(output_dir):
    """ComfyUI's SaveImage truncates 255 * x; rounding made 44 % of a demo image's values one level brighter than
    the PNG real ComfyUI 0.12.1 saved for the same workflow (scripts/check_in_comfyui.sh)."""
    import torch

    from flux2_host.core_nodes.images import SaveImage

    levels = torch.tensor([0.0, 0.4, 0.6, 0.999, 127.5, 254.6]) / 255  # fractions of an 8-bit level
    image = levels.view(1, 1, 6, 1).expand(1, 1, 6, 3).contiguous()
    SaveImage().save_images(image, filename_prefix="levels")
    with Image.open(output_dir / "levels_00001_.png") as saved:
        assert [saved.getpixel((x, 0))[0] for x in range(6)] == [0, 0, 0, 0, 127, 254]


def test_a_redis_worker_that_takes_a_prompt_over_writes_the_names_the_first_chose(output_dir, redis_url):
    """Scale-out: the worker that dies after saving and the one that runs the prompt again share the output
    folder and the Redis record, so the second writes the first one's names."""
    import torch

    from flux2_host import saved_outputs
    from flux2_host.core_nodes.images import SaveImage
    from flux2_host.redis_queue import RedisKeys, RedisSavedOutputs

    def one_worker_runs_it() -> list[str]:
        with saved_outputs.recording(RedisSavedOutputs(RedisKeys(redis_url), "prompt-1")):
            result = SaveImage().save_images(torch.rand(2, 8, 8, 3), filename_prefix="again/fox", unique_id="9")
        return [image["filename"] for image in result["ui"]["images"]]

    first, second = one_worker_runs_it(), one_worker_runs_it()
    assert first == second == ["fox_00001_.png", "fox_00002_.png"]
    assert saved_files(output_dir) == first

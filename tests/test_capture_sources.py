"""Frame sources: folder replays in name order (once or looping), video files by interval, live streams."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from capture.sources import (
    FolderReplay,
    LiveCamera,
    SourceNotFound,
    VideoFileReplay,
    decode_image_file,
    open_source,
)
from shared.config import CameraSettings

SERIES = "UFPR04/Cloudy"
CLIP = "video/aerial_crop_14spaces/parking_crop.mp4"


@pytest.fixture
def frames(tmp_path: Path, pklot_dir: Path) -> tuple[Path, list[str]]:
    """Three real frames copied in reverse order, plus a broken one and a non-image file."""
    folder = tmp_path / "frames"
    folder.mkdir()
    names = sorted(path.name for path in (pklot_dir / SERIES).glob("*.jpg"))[:3]
    for name in reversed(names):
        shutil.copy(pklot_dir / SERIES / name, folder / name)
    (folder / "2013-01-16_07_52_00.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (folder / "README.txt").write_text("not a frame", encoding="utf-8")
    return folder, names


def _drain(source: FolderReplay, reads: int) -> list[str | None]:
    """The source names of `reads` reads."""
    return [frame.source_name if frame else None for frame in (source.read() for _ in range(reads))]


def test_a_once_replay_gives_each_good_frame_in_name_order_then_ends(frames: tuple[Path, list[str]]) -> None:
    folder, names = frames
    replay = FolderReplay(folder, loop=False)

    assert _drain(replay, 4) == [*names, None]
    assert replay.ended
    assert replay.read() is None


def test_a_looping_replay_starts_again_after_the_last_frame(frames: tuple[Path, list[str]]) -> None:
    folder, names = frames
    replay = FolderReplay(folder, loop=True)

    assert _drain(replay, 7) == [*names, *names, names[0]]
    assert not replay.ended


def test_a_looping_replay_of_an_empty_folder_waits_without_spinning(tmp_path: Path) -> None:
    replay = FolderReplay(tmp_path, loop=True)

    assert replay.read() is None
    assert not replay.ended


@pytest.mark.parametrize("content", [b"", b"\xff\xd8\xff\xe0\x00\x10JFIF", b"GIF89a garbage"])
def test_broken_image_files_decode_to_none(tmp_path: Path, content: bytes) -> None:
    path = tmp_path / "broken.jpg"
    path.write_bytes(content)

    assert decode_image_file(path) is None


def test_a_truncated_real_frame_is_refused(tmp_path: Path, pklot_dir: Path) -> None:
    whole = sorted((pklot_dir / SERIES).glob("*.jpg"))[0].read_bytes()
    path = tmp_path / "cut.jpg"
    path.write_bytes(whole[: len(whole) * 2 // 3])

    assert decode_image_file(path) is None


def test_a_video_file_advances_one_interval_of_video_time_per_read(pklot_dir: Path) -> None:
    clip = pklot_dir.parent / CLIP
    replay = VideoFileReplay(clip, interval_s=5.0, loop=False)
    try:
        sizes = []
        while (frame := replay.read()) is not None:
            sizes.append((frame.width, frame.height))
    finally:
        replay.close()

    assert sizes == [(380, 452)] * 6
    assert replay.ended


def test_a_live_stream_gives_the_newest_frame_and_none_once_it_stops(pklot_dir: Path) -> None:
    camera = CameraSettings(id="drone", source=str(pklot_dir.parent / CLIP), width=380, height=452)
    live = LiveCamera(camera.source, camera, read_timeout_s=30.0)
    try:
        first = live.read()
        later = [live.read() for _ in range(2000)]
    finally:
        live.close()

    assert first is not None and (first.width, first.height) == (380, 452)
    assert later[-1] is None
    assert not live.ended


def test_open_source_picks_the_kind_from_the_source_text(
    frames: tuple[Path, list[str]], pklot_dir: Path
) -> None:
    folder, _ = frames
    clip = pklot_dir.parent / CLIP

    replay = open_source(CameraSettings(id="a", source=str(folder)), 1.0, loop=False)
    video = open_source(CameraSettings(id="b", source=str(clip)), 1.0, loop=False)
    video.close()

    assert isinstance(replay, FolderReplay) and isinstance(video, VideoFileReplay)
    with pytest.raises(SourceNotFound, match="camera c"):
        open_source(CameraSettings(id="c", source=str(folder / "missing")), 1.0, loop=False)

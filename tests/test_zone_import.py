"""Zone import: PKLot XML, Ultralytics JSON and mask images become parking_zones YAML that loads back."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import pytest
import yaml

from detect.occupancy import ZoneScaleError, scale_zones
from shared.config import load_settings
from shared.zone_import import ZoneImportError, drawn_size, import_zones, zone_file_yaml, zones_yaml

UFPR05 = "UFPR05/Rainy/2013-03-19_06_30_00"
PUCPR_CRLF = "PUCPR/Sunny/2012-09-13_07_07_50"
UNLABELLED_SPACE = "PUCPR/Rainy/2012-10-26_07_39_28"
REPO_DIR = Path(__file__).resolve().parents[1]
FISHEYE_JSON = "video/ultralytics_parking_json/mrabdon_fisheye_cctv/bounding_boxes.json"
AERIAL_JSON = "video/ultralytics_parking_json/nguyenhoanghuy34_aerial/bounding_boxes.json"
MASK = "video/aerial_crop_14spaces/mask_crop.png"
# (file, format, zones, width and height of the frame they were drawn on)
OTHER_TOOLS = [
    (FISHEYE_JSON, "ultralytics", 11, 1080, 600),
    (AERIAL_JSON, "ultralytics", 135, 1920, 1200),
    (MASK, "mask", 14, 380, 452),
    (f"pklot/{UFPR05}.xml", "pklot", 40, 1280, 720),
]


def _manifest_spaces(pklot_dir: Path, frame: str) -> int:
    """The number of spaces the data manifest lists for a frame."""
    with (pklot_dir / "manifest.csv").open(encoding="utf-8") as handle:
        return next(int(row["n_spaces"]) for row in csv.DictReader(handle) if row["file"] == frame)


def _load_back(tmp_path: Path, text: str) -> list[dict[str, object]]:
    """Write the YAML, read it with load_settings, and return camera 0's zones as plain dicts."""
    path = tmp_path / "zones.yaml"
    path.write_text(text, encoding="utf-8")
    settings = load_settings(path, data_dir=tmp_path / "data")
    return [zone.model_dump(exclude_none=True) for zone in settings.cameras[0].parking_zones]


def _expected(zones: list[dict[str, object]]) -> list[dict[str, object]]:
    """Imported entries as load_settings holds them: ids as strings, coordinates as floats."""
    return [
        {**zone, "id": str(zone["id"]),
         "coordinates": [[float(x), float(y)] for x, y in zone["coordinates"]]}  # type: ignore[attr-defined]
        for zone in zones
    ]


def _rewrite_space(source: Path, target: Path, space_id: str, points: list[tuple[int, int]]) -> None:
    """Copy a PKLot XML with one space's contour replaced."""
    tree = ET.parse(source)
    space = next(space for space in tree.getroot().iter("space") if space.get("id") == space_id)
    contour = space.find("contour")
    assert contour is not None
    for point in list(contour):
        contour.remove(point)
    for x, y in points:
        ET.SubElement(contour, "point", x=str(x), y=str(y))
    tree.write(target)


def test_a_pklot_file_imports_every_space_and_round_trips_through_load_settings(
    tmp_path: Path, pklot_dir: Path
) -> None:
    zones = import_zones(pklot_dir / f"{UFPR05}.xml", "pklot")

    assert len(zones) == _manifest_spaces(pklot_dir, UFPR05)
    assert zones[0]["id"] == 1 and zones[0]["space_id"] == 1 and zones[0]["name"] == "P1"
    assert all(len(zone["coordinates"]) >= 3 for zone in zones)
    camera = {"id": "ufpr05", "source": str(pklot_dir / "UFPR05/Rainy"), "width": 1280, "height": 720}
    text = zones_yaml(zones, camera)
    assert _load_back(tmp_path, text) == _expected(zones)
    settings = load_settings(tmp_path / "zones.yaml", data_dir=tmp_path / "data")
    assert (settings.cameras[0].id, settings.cameras[0].width) == ("ufpr05", 1280)


def test_capital_point_tags_and_windows_line_endings_read_the_same(tmp_path: Path, pklot_dir: Path) -> None:
    original = pklot_dir / f"{PUCPR_CRLF}.xml"
    assert b"\r\n" in original.read_bytes()
    capitalised = tmp_path / "capital.xml"
    capitalised.write_bytes(original.read_bytes().replace(b"<point ", b"<Point "))
    assert b"<Point " in capitalised.read_bytes()

    zones = import_zones(capitalised, "pklot")

    assert zones == import_zones(original, "pklot")
    assert len(zones) == _manifest_spaces(pklot_dir, PUCPR_CRLF)
    assert _load_back(tmp_path, zones_yaml(zones)) == _expected(zones)


def test_spaces_without_an_occupied_label_are_still_zones(pklot_dir: Path) -> None:
    zones = import_zones(pklot_dir / f"{UNLABELLED_SPACE}.xml", "pklot")

    assert len(zones) == _manifest_spaces(pklot_dir, UNLABELLED_SPACE)


def test_a_self_intersecting_space_is_refused_naming_it(tmp_path: Path, pklot_dir: Path) -> None:
    broken = tmp_path / "bowtie.xml"
    _rewrite_space(pklot_dir / f"{UFPR05}.xml", broken, "7", [(0, 0), (100, 100), (100, 0), (0, 100)])

    with pytest.raises(ZoneImportError, match=r"zone 7: polygon intersects itself"):
        import_zones(broken, "pklot")


@pytest.mark.parametrize(
    ("points", "reason"),
    [([(10, 10), (20, 20), (30, 30)], "zero area"), ([(10, 10), (20, 20)], "at least 3 points")],
)
def test_a_degenerate_space_is_refused_naming_it(
    tmp_path: Path, pklot_dir: Path, points: list[tuple[int, int]], reason: str
) -> None:
    broken = tmp_path / "flat.xml"
    _rewrite_space(pklot_dir / f"{UFPR05}.xml", broken, "12", points)

    with pytest.raises(ZoneImportError, match=rf"zone 12: .*{reason}"):
        import_zones(broken, "pklot")


def test_a_repeated_space_id_is_refused(tmp_path: Path, pklot_dir: Path) -> None:
    text = (pklot_dir / f"{UFPR05}.xml").read_text(encoding="utf-8")
    repeated = tmp_path / "repeated.xml"
    repeated.write_text(text.replace('<space id="3"', '<space id="2"', 1), encoding="utf-8")

    with pytest.raises(ZoneImportError, match="zone 2: duplicate zone id"):
        import_zones(repeated, "pklot")


def test_a_file_that_is_not_pklot_xml_is_refused_naming_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "notes.xml"
    bad.write_text("<parking><space id=", encoding="utf-8")

    with pytest.raises(ZoneImportError, match="notes.xml"):
        import_zones(bad, "pklot")


def test_an_unknown_format_is_refused(tmp_path: Path, pklot_dir: Path) -> None:
    with pytest.raises(ZoneImportError, match="unknown zone format 'cvat'"):
        import_zones(pklot_dir / f"{UFPR05}.xml", "cvat")


@pytest.mark.parametrize(("relative", "fmt", "count", "width", "height"), OTHER_TOOLS)
def test_zone_files_import_with_the_size_of_the_frame_they_were_drawn_on(
    tmp_path: Path, pklot_dir: Path, relative: str, fmt: str, count: int, width: int, height: int
) -> None:
    path = pklot_dir.parent / relative
    zones = import_zones(path, fmt)

    assert len(zones) == count
    assert [zone["id"] for zone in zones] == list(range(1, count + 1))
    assert _load_back(tmp_path, zone_file_yaml(path, fmt)) == _expected(zones)
    camera = load_settings(tmp_path / "zones.yaml", data_dir=tmp_path / "data").cameras[0]
    assert (camera.width, camera.height) == (width, height)
    assert all(0 <= x <= width and 0 <= y <= height for zone in zones for x, y in zone["coordinates"])


@pytest.mark.parametrize(("relative", "fmt", "count", "width", "height"), OTHER_TOOLS[:3])
def test_parkmon_zones_import_prints_the_zones_and_their_frame_size(
    tmp_path: Path, pklot_dir: Path, relative: str, fmt: str, count: int, width: int, height: int
) -> None:
    command = ["zones", "import", str(pklot_dir.parent / relative), "--format", fmt]
    result = subprocess.run(
        [str(REPO_DIR / ".venv/bin/python"), "-m", "shared.cli", *command],
        cwd=REPO_DIR, capture_output=True, text=True, timeout=60,
    )

    assert result.returncode == 0, result.stderr
    document = yaml.safe_load(result.stdout)
    assert document["camera"] == {"width": width, "height": height}
    assert len(document["parking_zones"]) == count


def test_imported_mask_zones_scale_to_a_larger_frame_and_refuse_another_shape(
    tmp_path: Path, pklot_dir: Path
) -> None:
    text = zone_file_yaml(pklot_dir.parent / MASK, "mask").replace("camera:\n", "camera:\n  id: aerial\n")
    (tmp_path / "zones.yaml").write_text(text, encoding="utf-8")
    camera = load_settings(tmp_path / "zones.yaml", data_dir=tmp_path / "data").cameras[0]

    drawn = scale_zones(camera, 380, 452)
    doubled = scale_zones(camera, 760, 904)

    for small, large in zip(drawn, doubled, strict=True):
        assert large.polygon.area == pytest.approx(4 * small.polygon.area)
    with pytest.raises(ZoneScaleError, match="camera 'aerial'.*640x480.*380x452"):
        scale_zones(camera, 640, 480)


def test_a_json_without_its_frame_says_the_size_is_unknown(tmp_path: Path, pklot_dir: Path) -> None:
    lone = tmp_path / "zones.json"
    shutil.copyfile(pklot_dir.parent / FISHEYE_JSON, lone)

    text = zone_file_yaml(lone, "ultralytics")

    assert drawn_size(lone, "ultralytics") is None
    assert text.startswith("# 11 zones from zones.json; no frame image beside it")
    assert "camera:" not in text


def test_a_self_intersecting_ultralytics_zone_is_refused_naming_it(tmp_path: Path, pklot_dir: Path) -> None:
    zones = json.loads((pklot_dir.parent / FISHEYE_JSON).read_text(encoding="utf-8"))
    zones[4]["points"] = [[0, 0], [100, 100], [100, 0], [0, 100]]
    broken = tmp_path / "bowtie.json"
    broken.write_text(json.dumps(zones), encoding="utf-8")

    with pytest.raises(ZoneImportError, match=r"bowtie.json: zone 5: polygon intersects itself"):
        import_zones(broken, "ultralytics")

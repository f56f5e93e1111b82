"""The occupancy rule on hand-made boxes and polygons: ground contact, one space per vehicle, clipping."""

from __future__ import annotations

import pytest
from shapely.geometry import Polygon

from detect.occupancy import SpaceShape, ZoneScaleError, decide_occupancy, scale_zones, zones_region
from detect.tiling import Vehicle, merge_vehicles
from shared.config import CameraSettings, DetectionSettings
from shared.zones import Zone

SETTINGS = DetectionSettings(model="unused.pt")


def space(zone_id: str, x1: float, y1: float, x2: float, y2: float) -> SpaceShape:
    """An axis-aligned space."""
    return SpaceShape(zone_id, Polygon([(x1, y1), (x2, y1), (x2, y2), (x1, y2)]))


def occupied(decisions: list) -> set[str]:
    """Ids of the zones decided occupied."""
    return {decision.zone_id for decision in decisions if decision.occupied}


def test_one_car_over_two_overlapping_spaces_occupies_only_the_better_one() -> None:
    # Neighbouring spaces share a 10 px strip (17 % of each), as PKLot's do.
    left, right = space("left", 0, 0, 60, 100), space("right", 50, 0, 110, 100)
    # Its ground area covers 71 % of one and 43 % of the other: enough for either alone.
    car = Vehicle((10, 10, 80, 100), 0.8, 2)

    decisions = decide_occupancy([left, right], [car], SETTINGS)

    assert occupied(decisions) == {"left"}


def test_two_cars_over_two_overlapping_spaces_occupy_both() -> None:
    left, right = space("left", 0, 0, 60, 100), space("right", 50, 0, 110, 100)
    cars = [Vehicle((5, 10, 62, 100), 0.8, 2), Vehicle((52, 5, 108, 98), 0.7, 2)]

    assert occupied(decide_occupancy([left, right], cars, SETTINGS)) == {"left", "right"}


def test_car_and_truck_boxes_on_one_vehicle_count_once() -> None:
    left, right = space("left", 0, 0, 60, 100), space("right", 50, 0, 110, 100)
    car = Vehicle((20, 10, 80, 100), 0.6, 2)
    truck = Vehicle((22, 8, 83, 100), 0.5, 7)

    merged = merge_vehicles([car, truck], SETTINGS.merge_iou, SETTINGS.merge_containment)
    decisions = decide_occupancy([left, right], merged, SETTINGS)

    assert merged == [car]
    assert len(occupied(decisions)) == 1


def test_a_fragment_inside_a_whole_box_is_the_same_vehicle() -> None:
    whole = Vehicle((100, 100, 200, 180), 0.9, 2)
    front_half = Vehicle((100, 100, 150, 180), 0.4, 2)

    assert merge_vehicles([front_half, whole], 0.5, 0.8) == [whole]


def test_ground_contact_decides_between_a_space_and_the_one_behind_it() -> None:
    # Elevated view: the car's roof reaches up over the space behind; its wheels stand in the front one.
    behind, front = space("behind", 0, 0, 60, 50), space("front", 0, 50, 60, 100)
    tall_car = Vehicle((2, 10, 58, 98), 0.9, 2)

    assert occupied(decide_occupancy([behind, front], [tall_car], SETTINGS)) == {"front"}


def test_a_sliver_cut_off_by_the_frame_edge_does_not_fill_a_space() -> None:
    corner = space("corner", 1180, 620, 1280, 720)
    sliver = Vehicle((1250, 600, 1280, 720), 0.9, 2, clipped=True)
    whole_small_car = Vehicle((1250, 600, 1280, 720), 0.9, 2, clipped=False)

    assert occupied(decide_occupancy([corner], [sliver], SETTINGS)) == set()
    # The same box, if it were a whole (small) vehicle, would stand in the space.
    assert occupied(decide_occupancy([corner], [whole_small_car], SETTINGS)) == {"corner"}


def test_a_clipped_box_covering_most_of_a_space_still_occupies_it() -> None:
    corner = space("corner", 1180, 620, 1280, 720)
    car_leaving_frame = Vehicle((1175, 600, 1280, 720), 0.9, 2, clipped=True)

    assert occupied(decide_occupancy([corner], [car_leaving_frame], SETTINGS)) == {"corner"}


def test_a_car_driving_past_on_the_lane_occupies_nothing() -> None:
    spaces = [space(str(index), index * 60, 0, index * 60 + 60, 100) for index in range(3)]
    on_lane = Vehicle((40, 80, 140, 160), 0.9, 2)

    assert occupied(decide_occupancy(spaces, [on_lane], SETTINGS)) == set()


def test_confidence_is_high_for_a_clear_car_and_for_an_untouched_space() -> None:
    spaces = [space("taken", 0, 0, 60, 100), space("free", 200, 0, 260, 100)]
    car = Vehicle((2, 5, 58, 98), 0.9, 2)

    decisions = {decision.zone_id: decision for decision in decide_occupancy(spaces, [car], SETTINGS)}

    assert decisions["taken"].occupied and decisions["taken"].confidence == pytest.approx(0.95)
    assert not decisions["free"].occupied and decisions["free"].confidence == 1.0


def test_confidence_is_near_a_coin_toss_for_a_faint_detection() -> None:
    car = Vehicle((2, 5, 58, 98), 0.12, 2)

    [decision] = decide_occupancy([space("taken", 0, 0, 60, 100)], [car], SETTINGS)

    assert decision.occupied and 0.5 <= decision.confidence < 0.6


def test_a_space_a_neighbouring_car_leans_into_is_free_with_less_confidence() -> None:
    left, right = space("left", 0, 0, 60, 100), space("right", 50, 0, 110, 100)
    car = Vehicle((10, 10, 80, 100), 0.8, 2)

    decisions = {decision.zone_id: decision for decision in decide_occupancy([left, right], [car], SETTINGS)}

    assert not decisions["right"].occupied
    assert 0.5 <= decisions["right"].confidence < 0.75 < decisions["left"].confidence


def test_zones_scale_with_the_frame_size() -> None:
    camera = CameraSettings(
        id="cam", width=1280, height=720,
        parking_zones=[Zone(id="1", coordinates=[[100, 200], [300, 200], [300, 400], [100, 400]])],
    )

    [half] = scale_zones(camera, 640, 360)

    assert half.polygon.bounds == (50.0, 100.0, 150.0, 200.0)


def test_a_frame_of_another_aspect_ratio_is_refused_with_the_camera_named() -> None:
    camera = CameraSettings(
        id="gate", width=1280, height=720,
        parking_zones=[Zone(id="1", coordinates=[[100, 200], [300, 200], [300, 400]])],
    )

    with pytest.raises(ZoneScaleError, match="camera 'gate'.*640x480.*1280x720"):
        scale_zones(camera, 640, 480)


def test_zones_region_leaves_room_for_vehicles_at_its_rim() -> None:
    region = zones_region([space("a", 100, 100, 140, 160), space("b", 300, 120, 340, 180)])

    assert region == (70.0, 70.0, 370.0, 210.0)
    assert zones_region([]) is None


def test_a_small_stray_box_inside_a_large_space_does_not_fill_it() -> None:
    bay = space("bay", 0, 0, 200, 300)
    stray = Vehicle((90, 200, 110, 230), 0.6, 3)

    assert occupied(decide_occupancy([bay], [stray], SETTINGS)) == set()

"""Tile geometry for sliced inference: coverage, overlap and fragments cut by a tile edge."""

from __future__ import annotations

from detect.tiling import Tile, cut_by_frame, cut_by_tile, tile_grid


def test_tiles_cover_the_region_with_overlapping_neighbours() -> None:
    tiles = tile_grid((10, 150, 1240, 603), 1280, 720, 448, 0.2)

    assert len(tiles) == 3
    assert {(tile.y1, tile.y2) for tile in tiles} == {(150, 603)}
    assert tiles[0].x1 == 10 and tiles[-1].x2 == 1240
    for left, right in zip(tiles, tiles[1:], strict=False):
        assert left.x2 - right.x1 >= 0.2 * 448 - 1
    assert len({(tile.x2 - tile.x1, tile.y2 - tile.y1) for tile in tiles}) == 1


def test_a_region_a_little_longer_than_a_tile_gets_one_longer_tile_not_two() -> None:
    tiles = tile_grid((0, 0, 300, 480), 1280, 720, 448, 0.2)

    assert tiles == [Tile(0, 0, 300, 480)]


def test_the_region_is_clamped_to_the_frame() -> None:
    tiles = tile_grid((-50, -50, 2000, 900), 1280, 720, 448, 0.2)

    assert min(tile.x1 for tile in tiles) == 0 and max(tile.x2 for tile in tiles) == 1280
    assert min(tile.y1 for tile in tiles) == 0 and max(tile.y2 for tile in tiles) == 720
    assert tile_grid((1300, 0, 1400, 100), 1280, 720, 448, 0.2) == []


def test_a_box_touching_an_inner_tile_edge_is_a_fragment() -> None:
    tile = Tile(400, 100, 800, 500)

    assert cut_by_tile((700, 200, 799.5, 260), tile, 1280, 720)
    assert cut_by_tile((400.5, 200, 450, 260), tile, 1280, 720)
    assert not cut_by_tile((600, 200, 700, 260), tile, 1280, 720)


def test_a_tile_edge_on_the_frame_edge_cuts_nothing() -> None:
    tile = Tile(0, 0, 400, 400)

    assert not cut_by_tile((0, 0, 50, 50), tile, 400, 400)


def test_boxes_at_the_frame_edge_are_marked_clipped() -> None:
    assert cut_by_frame((1200, 600, 1280, 700), 1280, 720)
    assert cut_by_frame((0.5, 300, 80, 360), 1280, 720)
    assert not cut_by_frame((100, 100, 200, 200), 1280, 720)

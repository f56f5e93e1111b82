"""Temporal smoothing: doubtful flickers are held, sure or persistent changes are taken."""

from __future__ import annotations

from detect.smoothing import Observation, SmoothingRule, smoothed_state

RULE = SmoothingRule(window=3, sure_confidence=0.75, max_gap_s=60.0)


def observations(*items: tuple[float, bool, float]) -> list[Observation]:
    """Observations from (at, occupied, confidence) triples."""
    return [Observation(at, occupied, confidence) for at, occupied, confidence in items]


def test_the_first_observation_sets_the_state() -> None:
    assert smoothed_state(None, observations((0, True, 0.55)), RULE) is True


def test_a_doubtful_single_flicker_is_held() -> None:
    history = observations((0, False, 1.0), (5, False, 1.0), (10, True, 0.6))

    assert smoothed_state(False, history, RULE) is False


def test_a_doubtful_change_seen_in_window_snapshots_is_taken() -> None:
    history = observations((0, False, 1.0), (5, True, 0.6), (10, True, 0.65), (15, True, 0.55))

    assert smoothed_state(False, history, RULE) is True


def test_a_sure_change_is_taken_at_once() -> None:
    history = observations((0, True, 0.9), (5, True, 0.9), (10, False, 0.95))

    assert smoothed_state(True, history, RULE) is False


def test_history_older_than_the_gap_is_ignored() -> None:
    # Snapshots five minutes apart: a car may have come and gone in between, so nothing is held.
    history = observations((0, False, 1.0), (300, False, 1.0), (600, True, 0.6))

    assert smoothed_state(False, history, RULE) is True


def test_smoothing_off_follows_every_frame() -> None:
    history = observations((0, False, 1.0), (5, True, 0.55))

    assert smoothed_state(False, history, SmoothingRule(1, 0.75, 60.0)) is True

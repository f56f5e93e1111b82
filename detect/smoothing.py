"""Temporal smoothing: a zone's state changes on a sure observation or one that persists."""

from __future__ import annotations

from dataclasses import dataclass

from shared.config import ProcessingSettings


@dataclass(frozen=True)
class Observation:
    """One frame's decision for one zone, at the snapshot's capture time (unix s)."""

    at: float
    occupied: bool
    confidence: float


@dataclass(frozen=True)
class SmoothingRule:
    """How much history a state change needs before it is believed."""

    window: int
    sure_confidence: float
    max_gap_s: float


def smoothing_rule(processing: ProcessingSettings) -> SmoothingRule:
    """The smoothing rule the settings ask for; a window of 1 (no smoothing) when it is off."""
    window = processing.smoothing_window if processing.temporal_smoothing else 1
    return SmoothingRule(window, processing.smoothing_sure_confidence, processing.smoothing_max_gap_s)


def _recent_run(history: list[Observation], max_gap_s: float) -> list[Observation]:
    """The newest observations with no gap longer than max_gap_s between neighbours, oldest first."""
    run = [history[-1]]
    for earlier in reversed(history[:-1]):
        if run[0].at - earlier.at > max_gap_s:
            break
        run.insert(0, earlier)
    return run


def smoothed_state(current: bool | None, history: list[Observation], rule: SmoothingRule) -> bool:
    """The zone's state after the newest observation (last in `history`, oldest first).

    A change is taken at once when the observation is sure, when there is no state yet, or when the
    history is too sparse to say anything (snapshots further apart than max_gap_s: a car can come and
    go in between). Otherwise it must be seen in `window` consecutive snapshots.
    """
    newest = history[-1]
    if current is None or newest.occupied == current or rule.window <= 1:
        return newest.occupied
    if newest.confidence >= rule.sure_confidence:
        return newest.occupied
    run = _recent_run(history, rule.max_gap_s)
    if len(run) == 1:
        return newest.occupied
    last = run[-rule.window:]
    if len(last) == rule.window and all(item.occupied == newest.occupied for item in last):
        return newest.occupied
    return current

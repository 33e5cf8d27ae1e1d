"""The champion policy, as pure functions (the registry applies them; tests table them).

A version's metrics live in its tags as `metric.<name>` = repr(float) (an exact round trip).
`ranking` = [(metric, higher_is_better), ...]: the task's main metric, then its tie-breaker.
Two values closer than TOLERANCE (relative) are a tie: identical runs differ in the last
bits of a loss, and a champion must not change on noise.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence

log = logging.getLogger(__name__)

TOLERANCE = 1e-6  # relative: |a - b| <= TOLERANCE * max(|a|, |b|) is a tie


def metrics_of(tags: Mapping[str, str]) -> dict[str, float]:
    return {k.removeprefix("metric."): float(v) for k, v in tags.items() if k.startswith("metric.")}


def beats(new: Mapping[str, float], champion_tags: Mapping[str, str], ranking: Sequence[tuple[str, bool]], *,
          where: str = "champion", tolerance: float = TOLERANCE) -> bool:
    """Does a version with metrics `new` beat the champion whose tags are `champion_tags`?

    The first metric that differs by more than `tolerance` decides; a full tie keeps the
    champion. A champion lacking a metric (the spec changed) loses on the main metric and
    keeps its place on a tie-breaker.
    """
    for i, (metric, higher) in enumerate(ranking):
        old = champion_tags.get(f"metric.{metric}")
        if old is None:
            log.warning("%s has no %s", where, metric)
            return i == 0
        a, b = float(new[metric]), float(old)
        if abs(a - b) > tolerance * max(abs(a), abs(b)):
            return a > b if higher else a < b
    return False


def pick_champion(champion: tuple[int, Mapping[str, str]] | None,
                  contenders: Sequence[tuple[int, Mapping[str, str]]],
                  ranking: Sequence[tuple[str, bool]], *, tolerance: float = TOLERANCE) -> int | None:
    """The version that should hold `champion`: the current one, unless a contender (a
    version registered after it, taken in version order) beats it, each winner becoming the
    one to beat. Versions are (number, tags); contenders lacking a ranked metric cannot win.

    The result depends only on the set of versions, not on which process looks: so every
    registration can (re)compute it after writing and converge on the same champion.
    """
    best = champion
    for version, tags in sorted(contenders, key=lambda c: c[0]):
        new = metrics_of(tags)
        if any(metric not in new for metric, _ in ranking):
            continue
        if best is None or beats(new, best[1], ranking, where=f"v{best[0]}", tolerance=tolerance):
            best = (version, tags)
    return None if best is None else best[0]

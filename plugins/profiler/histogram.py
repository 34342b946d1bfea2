"""A fixed-size log-bucket latency histogram (HDR/DDSketch style).

Why our own: recording must cost well under a microsecond and never allocate,
because the `profiler` plugin records every request. `hdrh` records integers
(so seconds must be scaled and the range fixed in units) and its pure-Python
``record_value`` costs several times ours; `ddsketch` grows its stores
dynamically. This one is a list of ~1,000 ints and one ``math.log`` per value.

Buckets are geometric with ratio ``gamma = (1 + a) / (1 - a)`` from `lowest`
(10 us) to `highest` (1 hour). A value is reported as its bucket's
midpoint ``2 * gamma**i / (gamma + 1)``, so every percentile inside the range
is within relative error `a` (1% by default) of a value that was recorded at
that rank. Values below `lowest` land in an underflow bucket (reported as
`lowest` at most), values above `highest` in an overflow bucket (reported as
the exact maximum seen). Memory and time per record are constant.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from math import ceil, log

__all__ = ["LogHistogram"]

LOWEST = 10e-6  # 10 microseconds
HIGHEST = 3600.0  # one hour
RELATIVE_ERROR = 0.01
_SPLITS: dict[tuple[float, float, int, tuple[float, ...]], tuple[int, ...]] = {}


class LogHistogram:
    """Counts of values (seconds) in geometric buckets; mergeable; O(1) record."""

    __slots__ = (
        "_inv_log_gamma",
        "_log_lowest",
        "_top",
        "count",
        "counts",
        "gamma",
        "highest",
        "lowest",
        "max",
        "min",
        "relative_error",
        "sum",
    )

    def __init__(
        self,
        lowest: float = LOWEST,
        highest: float = HIGHEST,
        relative_error: float = RELATIVE_ERROR,
    ) -> None:
        if not 0 < lowest < highest:
            raise ValueError(f"expected 0 < lowest < highest, got {lowest!r}, {highest!r}")
        if not 0 < relative_error < 1:
            raise ValueError(f"relative_error: expected 0 < a < 1, got {relative_error!r}")
        self.lowest = lowest
        self.highest = highest
        self.relative_error = relative_error
        self.gamma = (1 + relative_error) / (1 - relative_error)
        self._inv_log_gamma = 1.0 / log(self.gamma)
        self._log_lowest = log(lowest)
        # Bucket 0 is the underflow (< lowest); 1..top-1 geometric; top is the overflow.
        self._top = ceil((log(highest) - self._log_lowest) * self._inv_log_gamma) + 1
        self.counts = [0] * (self._top + 1)
        self.count = 0
        self.sum = 0.0
        self.min = 0.0
        self.max = 0.0

    def record(self, value: float) -> None:
        """Add one value in seconds (negative values and NaN count as 0)."""
        if value >= self.lowest:
            top = self._top
            if value < self.highest:
                i = int((log(value) - self._log_lowest) * self._inv_log_gamma) + 1
                self.counts[i if i < top else top] += 1
            else:
                self.counts[top] += 1
        else:
            if not value >= 0:  # negative or NaN
                value = 0.0
            self.counts[0] += 1
        if self.count == 0 or value < self.min:
            self.min = value
        if value > self.max:
            self.max = value
        self.count += 1
        self.sum += value

    def record_many(self, values: Iterable[float]) -> None:
        for value in values:
            self.record(value)

    def merge(self, other: LogHistogram) -> None:
        """Add `other`'s counts (it must have the same bucket layout)."""
        if other._top != self._top or other.lowest != self.lowest or other.gamma != self.gamma:
            raise ValueError("cannot merge histograms with different bucket layouts")
        if not other.count:
            return
        counts = self.counts
        for i, n in enumerate(other.counts):
            if n:
                counts[i] += n
        self.min = other.min if not self.count else min(self.min, other.min)
        self.max = max(self.max, other.max)
        self.count += other.count
        self.sum += other.sum

    def reset(self) -> None:
        self.counts = [0] * (self._top + 1)
        self.count = 0
        self.sum = 0.0
        self.min = 0.0
        self.max = 0.0

    def upper_bound(self, index: int) -> float:
        """The largest value bucket `index` may hold."""
        if index <= 0:
            return self.lowest
        if index >= self._top:
            return float("inf")
        return self.lowest * self.gamma**index

    def _value(self, index: int) -> float:
        if index <= 0:
            return min(self.max, self.lowest)
        if index >= self._top:
            return self.max
        # Bucket i holds [lowest * g**(i-1), lowest * g**i); its midpoint by relative error.
        value = self.lowest * 2 * self.gamma**index / (self.gamma + 1)
        return min(max(value, self.min), self.max)

    def percentile(self, q: float) -> float:
        """The value at percentile `q` (0..100); 0.0 when empty."""
        if not self.count:
            return 0.0
        rank = q / 100.0 * self.count
        seen = 0
        for i, n in enumerate(self.counts):
            if n:
                seen += n
                if seen >= rank and seen > 0:
                    return self._value(i)
        return self.max

    def percentiles(self, qs: Sequence[float]) -> list[float]:
        """Several percentiles in one pass over the buckets (`qs` ascending)."""
        out: list[float] = []
        if not self.count:
            return [0.0] * len(qs)
        ranks = [max(q / 100.0 * self.count, 1e-9) for q in qs]
        seen = 0
        j = 0
        for i, n in enumerate(self.counts):
            if not n:
                continue
            seen += n
            while j < len(ranks) and seen >= ranks[j]:
                out.append(self._value(i))
                j += 1
            if j == len(ranks):
                break
        while len(out) < len(qs):
            out.append(self.max)
        return out

    def count_le(self, bounds: Sequence[float]) -> list[int]:
        """Cumulative counts at each bound (ascending), as Prometheus `le` buckets.

        A value within the relative error of a bound may be counted on either side of it.
        """
        counts = self.counts
        out: list[int] = []
        seen = 0
        start = 0
        for end in self._splits(tuple(bounds)):
            if end > start:
                seen += sum(counts[start:end])  # one C-level sum per bucket, not a loop
                start = end
            out.append(seen)
        return out

    def _splits(self, bounds: tuple[float, ...]) -> tuple[int, ...]:
        """For each bound, the first bucket index past it: the same for every histogram
        of this layout, so computed once per layout and bounds (a scrape reads
        thousands of series with one set of bounds)."""
        key = (self.lowest, self.gamma, self._top, bounds)
        splits = _SPLITS.get(key)
        if splits is None:
            found = []
            i = 0
            top = self._top
            for bound in bounds:
                while i <= top and self.upper_bound(i) <= bound * (1 + 1e-12):
                    i += 1
                found.append(i)
            splits = tuple(found)
            if len(_SPLITS) < 64:  # a handful of layouts and bucket sets in any process
                _SPLITS[key] = splits
        return splits

    @property
    def mean(self) -> float:
        return self.sum / self.count if self.count else 0.0

"""AIM's randomised measurement times, and what they buy.

A monitor that measured its subject on a fixed period would let an attacker who learned the
period restore the hypervisor just before each measurement and tamper again just after. So each
monitor waits a random interval, uniform in ``[mean * (1 - jitter), mean * (1 + jitter)]``,
between measurements (:func:`next_delay`), the first drawn from the equilibrium residual
(:func:`first_delay`) so that the process is stationary from the start.

The rest of the module answers, in closed form, how well that works. The measurements of one
monitor form a stationary renewal process (the attacker does not know its phase) with
instantaneous measurements; monitors are independent of each other:

- :func:`detection_probability`: the chance that a change lasting ``d`` seconds is seen at all;
- :func:`detection_latency_quantile`: how long a permanent change goes unseen, as a quantile.

Pure functions over a :class:`Schedule`; the random source is passed in, never owned here.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from smig.errors import ConfigError


@dataclass(frozen=True)
class Schedule:
    """How often a monitor measures: intervals uniform in ``[min_interval_s, max_interval_s]``.

    ``jitter`` is the half-width of that range as a fraction of ``mean_interval_s``: 0 measures on
    a fixed period, 0.5 draws from ``[0.5 * mean, 1.5 * mean]``. It stays below 1 so that the
    shortest interval is positive and a monitor never measures twice at once.

    Raises :class:`~smig.errors.ConfigError` if ``mean_interval_s`` is not a positive finite number
    or ``jitter`` is outside ``[0, 1)``.
    """

    mean_interval_s: float = 1.0
    jitter: float = 0.5

    def __post_init__(self) -> None:
        if not (math.isfinite(self.mean_interval_s) and self.mean_interval_s > 0):
            raise ConfigError(
                f"mean measurement interval must be a positive number of seconds, not {self.mean_interval_s}"
            )
        if not 0 <= self.jitter < 1:
            raise ConfigError(f"measurement jitter must be in [0, 1), not {self.jitter}")

    @property
    def min_interval_s(self) -> float:
        """The shortest wait between two measurements."""
        return self.mean_interval_s * (1 - self.jitter)

    @property
    def max_interval_s(self) -> float:
        """The longest wait between two measurements: a change lasting this long is always seen."""
        return self.mean_interval_s * (1 + self.jitter)


def next_delay(schedule: Schedule, rng: random.Random) -> float:
    """Draw the wait before a monitor's next measurement, in seconds.

    The random source is injected: tests pass a seeded :class:`random.Random`, while the service
    passes a :class:`random.SystemRandom` (the operating system's CSPRNG) so that an attacker who
    sees past measurement times, or the code, still cannot predict the next one. A seeded
    Mersenne Twister would not do there: its state can be recovered from its outputs.
    """
    return rng.uniform(schedule.min_interval_s, schedule.max_interval_s)


def first_delay(schedule: Schedule, rng: random.Random) -> float:
    """Draw the wait before a monitor's *first* measurement, in seconds.

    Drawn from the schedule's equilibrium residual (the wait a stationary process leaves from a
    random moment: density ``(1 - F(r)) / mean``), not from the interval itself. A monitor then
    measures from its start as unpredictably as it does later: the moment it started tells an
    attacker nothing about when it measures. Inverse transform of the residual's CDF, which is
    :func:`detection_probability` for one monitor.
    """
    a, b, m = schedule.min_interval_s, schedule.max_interval_s, schedule.mean_interval_s
    target = rng.random() * m  # the CDF times the mean: r below a, r - (r - a)^2 / 2(b - a) above
    if target <= a or b == a:
        return min(target, b)
    width = b - a
    return a + width * (1 - math.sqrt(max(0.0, 1 - 2 * (target - a) / width)))


def _single(duration_s: float, schedule: Schedule) -> float:
    # P(a stationary renewal process has a point in a window of length d) is the CDF of its
    # residual life: (1/m) * integral_0^d (1 - F(x)) dx. For F uniform on [a, b] the integrand is
    # 1 up to a and falls linearly to 0 at b, which gives the three pieces below.
    a, b, m = schedule.min_interval_s, schedule.max_interval_s, schedule.mean_interval_s
    if duration_s <= a:
        return duration_s / m
    if duration_s >= b:
        return 1.0
    # Here a < d < b, so b > a and the division is safe.
    covered = duration_s - (duration_s - a) ** 2 / (2 * (b - a))
    return min(1.0, covered / m)


def _check_monitors(monitors: int) -> None:
    if monitors < 0:
        raise ConfigError(f"the number of monitors cannot be negative, not {monitors}")


def detection_probability(duration_s: float, schedule: Schedule, monitors: int = 1) -> float:
    """The probability that a change lasting ``duration_s`` seconds is measured at least once.

    The change starts at a time independent of the schedule (the attacker cannot see it), and
    each of ``monitors`` independent monitors runs ``schedule``. One monitor catches it with
    probability ``d / mean`` while ``d`` is at most the shortest interval, then with a quadratic
    that reaches 1 at the longest interval; ``monitors`` of them with ``1 - (1 - p) ** monitors``.
    With zero monitors nothing is ever seen: the probability is 0.

    Raises :class:`~smig.errors.ConfigError` if ``duration_s`` is negative or not a number, or if
    ``monitors`` is negative.
    """
    if not duration_s >= 0:  # also refuses NaN
        raise ConfigError(f"a change cannot last a negative or undefined time: {duration_s}")
    _check_monitors(monitors)
    missed_by_one = 1.0 - _single(duration_s, schedule)
    return 1.0 - missed_by_one**monitors


def detection_latency_quantile(q: float, schedule: Schedule, monitors: int = 1) -> float:
    """The ``q``-quantile of the time from a permanent change to its first measurement, in seconds.

    The wait is the residual life of each monitor's renewal process, and with several monitors
    the least of their independent residuals. Its CDF at ``t`` is the probability that a window
    of length ``t`` holds a measurement, i.e. :func:`detection_probability` of ``t``; the quantile
    is the smallest ``t`` where that CDF reaches ``q``, found by bisection. It never exceeds the
    schedule's longest interval; with zero monitors it is infinite for any ``q > 0``.

    Raises :class:`~smig.errors.ConfigError` if ``q`` is outside ``[0, 1]`` or ``monitors`` is
    negative.
    """
    if not 0 <= q <= 1:  # also refuses NaN
        raise ConfigError(f"a quantile must be in [0, 1], not {q}")
    _check_monitors(monitors)
    if q == 0:
        return 0.0
    if monitors == 0:
        return math.inf
    # The CDF is continuous, and strictly increasing on [0, max interval] where it reaches 1, so
    # bisection on that bracket converges to the one crossing of q.
    lo, hi = 0.0, schedule.max_interval_s
    while True:
        mid = (lo + hi) / 2
        if mid in (lo, hi):  # the bracket is down to adjacent floats
            return hi
        if detection_probability(mid, schedule, monitors) >= q:
            hi = mid
        else:
            lo = mid

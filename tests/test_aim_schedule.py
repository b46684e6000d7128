"""AIM's random measurement times: the schedule, its draws, and the closed-form odds of catching a
change, checked against simulated monitors."""

from __future__ import annotations

import math
import random
from bisect import bisect_left

import pytest

from smig.aim.schedule import (
    Schedule,
    detection_latency_quantile,
    detection_probability,
    first_delay,
    next_delay,
)
from smig.errors import ConfigError

DEFAULT = Schedule()  # intervals uniform in [0.5, 1.5] s
WIDE = Schedule(mean_interval_s=2.0, jitter=0.9)  # [0.2, 3.8] s: a long quadratic piece

# Monte-Carlo: each simulated monitor measures for HORIZON_S; windows are dropped uniformly after
# WARMUP_S, by which time a renewal process with these intervals has forgotten its start. With
# ~10^5 measurements per monitor, the realisation's own deviation from the stationary process is a
# small fraction of the binomial sigma of WINDOWS samples, so 4 binomial sigmas is the tolerance
# (a false alarm about once in 16,000 runs per check -- and the seeds are fixed anyway).
HORIZON_S = 200_000.0
WARMUP_S = 100.0
WINDOWS = 20_000
SIGMAS = 4.0


def measurements(schedule: Schedule, seed: int) -> list[float]:
    """One monitor's measurement times over the horizon, as the service's loop would take them."""
    rng = random.Random(seed)
    times: list[float] = []
    t = 0.0
    while t < HORIZON_S:
        t += next_delay(schedule, rng)
        times.append(t)
    return times


def first_after(times: list[float], t: float) -> float:
    return times[bisect_left(times, t)]


def change_times(schedule: Schedule, seed: int) -> list[float]:
    """When the attacker strikes: independent of every monitor's schedule."""
    rng = random.Random(seed)
    return [rng.uniform(WARMUP_S, HORIZON_S - 2 * schedule.max_interval_s) for _ in range(WINDOWS)]


def within_binomial(observed: float, p: float, n: int) -> bool:
    return abs(observed - p) <= SIGMAS * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def monitors() -> dict[Schedule, list[list[float]]]:
    return {s: [measurements(s, seed) for seed in (11, 12)] for s in (DEFAULT, WIDE)}


def test_a_schedule_that_cannot_work_is_refused() -> None:
    for mean in (0.0, -1.0, math.nan, math.inf):
        with pytest.raises(ConfigError, match="mean measurement interval"):
            Schedule(mean_interval_s=mean)
    for jitter in (-0.1, 1.0, 1.5, math.nan):
        with pytest.raises(ConfigError, match="jitter"):
            Schedule(jitter=jitter)
    assert (Schedule(jitter=0.0).min_interval_s, Schedule(jitter=0.0).max_interval_s) == (1.0, 1.0)


def test_bad_questions_are_refused() -> None:
    with pytest.raises(ConfigError, match="negative"):
        detection_probability(-1.0, DEFAULT)
    with pytest.raises(ConfigError, match="negative"):
        detection_probability(math.nan, DEFAULT)
    with pytest.raises(ConfigError, match="monitors"):
        detection_probability(1.0, DEFAULT, monitors=-1)
    for q in (-0.01, 1.01, math.nan):
        with pytest.raises(ConfigError, match="quantile"):
            detection_latency_quantile(q, DEFAULT)


def test_delays_stay_in_bounds_and_average_to_the_mean() -> None:
    rng = random.Random(1)
    draws = [next_delay(WIDE, rng) for _ in range(20_000)]
    assert all(WIDE.min_interval_s <= d <= WIDE.max_interval_s for d in draws)
    # Uniform on [a, b] has standard deviation (b - a) / sqrt(12).
    sigma_of_mean = (WIDE.max_interval_s - WIDE.min_interval_s) / math.sqrt(12 * len(draws))
    assert abs(sum(draws) / len(draws) - WIDE.mean_interval_s) <= SIGMAS * sigma_of_mean


def test_without_jitter_the_monitor_keeps_a_fixed_period() -> None:
    fixed = Schedule(mean_interval_s=3.0, jitter=0.0)
    assert {next_delay(fixed, random.Random(seed)) for seed in range(10)} == {3.0}


def test_detection_probability_has_the_shape_of_the_closed_form() -> None:
    for s in (DEFAULT, WIDE, Schedule(mean_interval_s=3.0, jitter=0.0)):
        assert detection_probability(0.0, s) == 0.0
        assert detection_probability(s.max_interval_s, s) == 1.0
        assert detection_probability(10 * s.max_interval_s, s, monitors=3) == 1.0
        # Below the shortest interval, at most one measurement fits in the window: p = d / mean.
        for d in (0.1 * s.min_interval_s, 0.5 * s.min_interval_s, s.min_interval_s):
            assert detection_probability(d, s) == pytest.approx(d / s.mean_interval_s)
        grid = [s.max_interval_s * i / 400 for i in range(401)]
        one = [detection_probability(d, s) for d in grid]
        two = [detection_probability(d, s, monitors=2) for d in grid]
        assert one == sorted(one) and two == sorted(two), "longer changes are never harder to catch"
        assert all(b > a for a, b in zip(one, two, strict=True) if 0 < a < 1), "a second monitor helps"


def test_detection_probability_matches_a_hand_computed_point() -> None:
    # DEFAULT, d = 1: (1/m) * (d - (d - a)^2 / (2 (b - a))) = 1 - 0.25 / 2.
    assert detection_probability(1.0, DEFAULT) == pytest.approx(0.875)
    assert detection_probability(1.0, DEFAULT, monitors=2) == pytest.approx(1 - 0.125**2)


def test_nobody_watching_sees_nothing() -> None:
    assert detection_probability(100.0, DEFAULT, monitors=0) == 0.0
    assert detection_latency_quantile(0.5, DEFAULT, monitors=0) == math.inf


@pytest.mark.parametrize("schedule", [DEFAULT, WIDE], ids=["default", "wide"])
@pytest.mark.parametrize("k", [1, 2])
def test_simulated_monitors_catch_transient_changes_as_often_as_predicted(
    monitors: dict[Schedule, list[list[float]]], schedule: Schedule, k: int
) -> None:
    watching = monitors[schedule][:k]
    starts = change_times(schedule, seed=100 + k)
    a, b = schedule.min_interval_s, schedule.max_interval_s
    for d in (0.5 * a, a + 0.25 * (b - a), a + 0.75 * (b - a), 1.05 * b):
        caught = sum(any(first_after(times, t) <= t + d for times in watching) for t in starts)
        p = detection_probability(d, schedule, monitors=k)
        assert within_binomial(caught / WINDOWS, p, WINDOWS), f"d={d}: caught {caught / WINDOWS:.4f}, predicted {p:.4f}"


@pytest.mark.parametrize("schedule", [DEFAULT, WIDE], ids=["default", "wide"])
@pytest.mark.parametrize("k", [1, 2])
def test_simulated_detection_latency_matches_its_quantiles(
    monitors: dict[Schedule, list[list[float]]], schedule: Schedule, k: int
) -> None:
    watching = monitors[schedule][:k]
    starts = change_times(schedule, seed=200 + k)
    latencies = [min(first_after(times, t) - t for times in watching) for t in starts]
    assert max(latencies) <= schedule.max_interval_s
    for q in (0.5, 0.99):
        predicted = detection_latency_quantile(q, schedule, monitors=k)
        # Compared through the empirical CDF at the predicted quantile, which is binomial.
        below = sum(latency <= predicted for latency in latencies) / WINDOWS
        assert within_binomial(below, q, WINDOWS), f"q={q}: {below:.4f} of changes seen by {predicted:.4f} s"


def test_latency_quantile_inverts_the_detection_probability() -> None:
    for s in (DEFAULT, WIDE):
        for k in (1, 2, 3):
            assert detection_latency_quantile(0.0, s, monitors=k) == 0.0
            assert detection_latency_quantile(1.0, s, monitors=k) <= s.max_interval_s
            for q in (1e-6, 0.1, 0.5, 0.9, 0.999):
                t = detection_latency_quantile(q, s, monitors=k)
                assert detection_probability(t, s, monitors=k) == pytest.approx(q, abs=1e-12)
    # One monitor, below the shortest interval: the quantile is q * mean, exactly d / m inverted.
    assert detection_latency_quantile(0.25, DEFAULT) == pytest.approx(0.25)
    # Two monitors reach the median sooner than one.
    assert detection_latency_quantile(0.5, DEFAULT, monitors=2) < detection_latency_quantile(0.5, DEFAULT)


def test_the_first_wait_is_the_equilibrium_residual_so_a_fresh_monitor_is_already_stationary() -> None:
    rng = random.Random(5)
    for schedule in (DEFAULT, WIDE, Schedule(mean_interval_s=2.0, jitter=0.0)):
        draws = sorted(first_delay(schedule, rng) for _ in range(WINDOWS))
        assert all(0.0 <= d <= schedule.max_interval_s for d in draws)
        # Its CDF is the chance one monitor catches a change of that length: the stationary residual.
        for t in (0.1, 0.4, 0.8, 1.0, 1.3, 1.7):
            t *= schedule.mean_interval_s
            observed = bisect_left(draws, t) / len(draws)
            assert within_binomial(observed, detection_probability(t, schedule), len(draws)), (schedule, t)
    # Not the interval itself: a fresh monitor may measure long before the shortest interval.
    assert min(first_delay(DEFAULT, random.Random(s)) for s in range(200)) < DEFAULT.min_interval_s / 4

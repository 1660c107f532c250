"""The streaming benchmark's parts that need no server: what the recompute sends, the
phases, the compute ratios and the CPU reading they rest on."""

from __future__ import annotations

import os
import time

import pytest

from dynemb.bench.sessions import (
    PAST,
    RECOMPUTE,
    SESSION,
    WITHIN,
    Rate,
    phase_plans,
    ratio_target,
    ratios,
    recompute_window,
)
from dynemb.dims import DIMS
from dynemb.processes import cpu_seconds, tree_cpu_seconds
from dynemb_client import Event

L = DIMS.max_events


def test_the_recompute_sends_the_history_so_far_then_the_newest_l():
    events = [Event(1_700_000_000 + i, f"e{i}") for i in range(L + 20)]
    assert recompute_window(events, 9) == events[:10]
    assert recompute_window(events, L + 5) == events[6 : L + 6]
    assert len(recompute_window(events, L + 19)) == L
    plans = phase_plans(25, L + 30, hold=10, block=25)  # every event of a stream is sent
    within = {plans[WITHIN].event(u, j) for u in range(25) for j in range(plans[WITHIN].steps)}
    past = {plans[PAST].event(u, j) for u in range(25) for j in range(plans[PAST].steps)}
    assert (min(within), max(within), min(past), max(past)) == (10, L - 1, L, L + 29)


def test_past_the_window_the_users_are_spread_over_the_rewindow_cycle():
    """Each past-phase session starts at another point of its cycle, every one of the B
    points is taken as often, and every user streams as many events, a full cycle at
    least; so a run cut short meets re-windows as often as a long one."""
    from dynemb.sessions.state import window_after

    block, users = 25, 100
    plans = phase_plans(users, L + 50, hold=10, block=block)
    within, past = plans[WITHIN], plans[PAST]
    assert within.starts == (10,) * users and within.steps == L - 10
    assert past.steps == 50 - block + 1
    assert all(past.event(u, past.steps - 1) < L + 50 for u in range(users))
    held = [window_after(0, start, L, block) for start in past.starts]
    assert sorted(set(held)) == list(range(L - block + 1, L + 1))
    assert {held.count(n) for n in set(held)} == {users // block}

    def rewindows(u: int, steps: int) -> int:
        n, count = held[u], 0
        for _ in range(steps):
            after = window_after(n, 1, L, block)
            count += after <= n
            n = after
        return count

    for steps in (1, 5, 12):  # the share of events that re-window: 1 in B, however many
        share = sum(rewindows(u, steps) for u in range(users)) / (users * steps)
        assert share == pytest.approx(1 / block)
    with pytest.raises(ValueError, match="at least B"):
        phase_plans(users, L + 10, hold=10, block=block)


def test_ratios_compare_compute_per_event_and_throughput():
    inproc = {RECOMPUTE: Rate(RECOMPUTE, 100, 0.5), SESSION: Rate(SESSION, 100, 0.04)}
    served = [
        Rate(RECOMPUTE, 200, 2.0, concurrency=8, server_cpu_s=1.6),
        Rate(SESSION, 500, 2.0, concurrency=8, server_cpu_s=0.5),
        Rate(RECOMPUTE, 320, 1.0, concurrency=1, users_per_call=32, server_cpu_s=1.6),
        Rate(SESSION, 320, 1.0, concurrency=1, users_per_call=32, server_cpu_s=0.1),
    ]
    got = ratios(inproc, served)
    assert got["inprocess_compute"] == pytest.approx(12.5)  # 5 ms vs 0.4 ms an event
    assert got["served_server_compute_c8"] == pytest.approx(8.0)  # 8 ms vs 1 ms
    assert got["served_events_per_s_c8"] == pytest.approx(2.5)
    assert got["served_server_compute_c1x32"] == pytest.approx(16.0)
    assert Rate(SESSION, 0, 1.0, concurrency=1, server_cpu_s=1.0).cpu_ms_per_event is None


def test_cpu_seconds_follow_work_done():
    before, mine = cpu_seconds(os.getpid()), time.process_time()
    deadline = time.process_time() + 0.3
    while time.process_time() < deadline:
        sum(range(1000))
    assert cpu_seconds(os.getpid()) - before >= 0.2
    assert tree_cpu_seconds(os.getpid()) >= cpu_seconds(os.getpid())
    assert time.process_time() - mine >= 0.29
    assert cpu_seconds(2**22 + 12345) == 0.0  # no such process


def test_within_the_window_a_session_is_also_set_against_a_full_window_recompute():
    from dynemb.bench.sessions import PhaseResult, against_full_window

    within = PhaseResult(
        WITHIN,
        "the whole history so far",
        [Rate(RECOMPUTE, 100, 0.3), Rate(SESSION, 100, 0.04)],
        [Rate(SESSION, 100, 1.0, concurrency=1, users_per_call=32, server_cpu_s=0.05)],
        {},
    )
    past = PhaseResult(
        PAST,
        "the newest L events",
        [Rate(RECOMPUTE, 100, 0.5), Rate(SESSION, 100, 0.05)],
        [Rate(RECOMPUTE, 100, 1.0, concurrency=1, users_per_call=32, server_cpu_s=0.6)],
        {},
    )
    got = against_full_window(within, past)
    assert got["inprocess_compute_vs_full_l"] == pytest.approx(12.5)  # 5 ms vs 0.4 ms
    assert got["served_server_compute_vs_full_l_c1x32"] == pytest.approx(12.0)


def test_a_ratio_is_judged_on_its_exact_value_not_as_printed():
    assert ratio_target(PAST, "inprocess_compute", 9.9976).endswith("**missed**")
    assert f"{9.9976:.2f}" == "10.00"
    assert ratio_target(PAST, "inprocess_compute", 10.0).endswith(": met")
    assert ratio_target(WITHIN, "inprocess_compute_vs_full_l", 12.4).endswith(": met")
    assert "no target" in ratio_target(PAST, "served_events_per_s_c1", 2.0)
    assert "shorter than L" in ratio_target(WITHIN, "inprocess_compute", 7.3)

"""Replica i listens on every base port + i * 100; ports that would collide across
replicas, or run past 65535, are refused before anything starts."""

from __future__ import annotations

import pytest

from dynemb.cluster import RestartBudget, stepped_configs
from dynemb.server import ServerConfig


def test_replica_ports_step_and_collisions_are_refused() -> None:
    base = ServerConfig(grpc_port=9001, http_port=9000, metrics_port=9002)
    configs = stepped_configs(base, 3)
    assert [c.grpc_port for c in configs] == [9001, 9101, 9201]
    assert len({p for c in configs for p in (c.grpc_port, c.http_port, c.metrics_port)}) == 9
    with pytest.raises(ValueError, match="collide"):  # replica 1's gRPC = replica 0's HTTP
        stepped_configs(ServerConfig(grpc_port=9001, http_port=9101, metrics_port=9002), 2)
    with pytest.raises(ValueError, match="65535"):
        stepped_configs(ServerConfig(grpc_port=65401, http_port=65400, metrics_port=65402), 3)
    with pytest.raises(ValueError):
        stepped_configs(base, 0)
    # One replica takes any three distinct ports, however far apart (free ports are).
    one = stepped_configs(ServerConfig(grpc_port=44361, http_port=55973, metrics_port=59873), 1)
    assert one[0].grpc_port == 44361


def test_a_server_is_restarted_until_it_crash_loops() -> None:
    budget = RestartBudget(limit=3, window_s=60.0)
    assert budget.allows(0.0) and budget.allows(10.0)
    assert not budget.allows(20.0)  # the third exit within a minute: a crash loop
    fresh = RestartBudget(limit=3, window_s=60.0)
    # exits further apart than the window never add up
    assert all(fresh.allows(t) for t in (0.0, 61.0, 122.0, 183.0, 244.0))
    spaced = RestartBudget(limit=3, window_s=60.0)
    assert spaced.allows(0.0) and spaced.allows(50.0) and spaced.allows(100.0)
    assert not spaced.allows(105.0)  # 50, 100, 105 within 60 s

"""Test servers get ports the kernel will not hand to an outgoing connection meanwhile."""

from __future__ import annotations

import socket

from resilient_tasks.testing import PORTS_BELOW_EPHEMERAL, _ephemeral_floor, free_port


def test_free_ports_come_from_below_the_ephemeral_range_and_bind() -> None:
    floor = min(_ephemeral_floor(), PORTS_BELOW_EPHEMERAL[1])
    ports = [free_port() for _ in range(30)]
    if floor - PORTS_BELOW_EPHEMERAL[0] >= 1000:  # room below the range (Linux's default)
        assert all(PORTS_BELOW_EPHEMERAL[0] <= port < floor for port in ports), ports
    assert len(set(ports)) > 1, "ports are drawn, not fixed"
    for port in ports[:5]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", port))

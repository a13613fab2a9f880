"""The descriptor arithmetic: raising the soft limit, and the connection ceiling under it."""

from __future__ import annotations

import resource

import attrs
import pytest

from mtlsgate.app import fdlimit
from mtlsgate.app import service
from mtlsgate.config.model import Config, Limits


class FakeLimits:
    def __init__(self, soft: int, hard: int, refuse: bool = False) -> None:
        self.value = (soft, hard)
        self.refuse = refuse

    def get(self, which: int) -> tuple[int, int]:
        assert which == resource.RLIMIT_NOFILE
        return self.value

    def set(self, which: int, value: tuple[int, int]) -> None:
        if self.refuse:
            raise ValueError("not allowed")
        self.value = value


@pytest.mark.parametrize(
    "soft, hard, refuse, expected",
    [
        (1024, 4096, False, (1024, 4096)),
        (4096, 4096, False, (4096, 4096)),
        (1024, resource.RLIM_INFINITY, False, (1024, fdlimit.UNLIMITED_TARGET)),
        (1024, 4096, True, (1024, 1024)),  # the system said no: keep the soft limit
    ],
)
def test_the_soft_limit_is_raised_to_the_hard_one(soft, hard, refuse, expected):
    limits = FakeLimits(soft, hard, refuse)
    assert fdlimit.raise_soft_limit(limits.get, limits.set) == expected
    assert limits.value == (expected[1] if not refuse else soft, hard)


@pytest.mark.parametrize("nofile, ceiling", [(1024, 480), (256, 96), (65536, 32736), (64, 1), (10, 1)])
def test_the_ceiling_leaves_a_reserve_and_a_descriptor_per_upstream_connection(nofile, ceiling):
    assert fdlimit.connection_ceiling(nofile) == ceiling
    assert ceiling * fdlimit.PER_CONNECTION + fdlimit.RESERVED <= max(nofile, fdlimit.RESERVED + fdlimit.PER_CONNECTION)


def test_max_connections_is_clamped_only_when_the_descriptors_fall_short(monkeypatch):
    config = Config(limits=Limits(max_connections=10000))
    monkeypatch.setattr(fdlimit, "raise_soft_limit", lambda: (1024, 1024))
    assert service.fit_to_descriptors(config).limits.max_connections == 480
    monkeypatch.setattr(fdlimit, "raise_soft_limit", lambda: (1024, 65536))
    assert service.fit_to_descriptors(config) is config
    small = attrs.evolve(config, limits=Limits(max_connections=100))
    monkeypatch.setattr(fdlimit, "raise_soft_limit", lambda: (1024, 1024))
    assert service.fit_to_descriptors(small) is small

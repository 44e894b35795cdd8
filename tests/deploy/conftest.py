"""Fixtures for the deployment tests: one private systemd 252 with the shipped units installed.

The ``deploy/`` units are installed with only their paths adjusted for the test (see
``deploy_support`` for the layout inside the namespaces).

Needs root and cgroup2; elsewhere these tests skip with that reason. Set
``ADMIN_OPS_REQUIRE_SYSTEMD=1`` (CI should) to turn such a skip into a failure.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest

from tests.deploy.deploy_support import (
    BOT_UNIT,
    DeployTree,
    Polkit,
    ShippedUnit,
    build_deploy_tree,
    skip_or_fail,
    start_polkit,
    start_system_bus,
)
from tests.deploy.systemd_harness import (
    PrivateSystemd,
    start_private_systemd,
    unavailable_reason,
)


@pytest.fixture(scope="session")
def private_systemd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrivateSystemd]:
    """A private systemd 252, PID 1 of new namespaces in a sub-cgroup of its own."""
    reason = unavailable_reason()
    if reason:
        skip_or_fail(reason)
    harness = start_private_systemd(tmp_path_factory.mktemp("systemd"))
    try:
        yield harness
    finally:
        harness.stop()


@pytest.fixture
def systemctl_env(
    private_systemd: PrivateSystemd, monkeypatch: pytest.MonkeyPatch
) -> PrivateSystemd:
    """The private systemd, with ``OPS_SYSTEMCTL`` pointing our code at it."""
    monkeypatch.setenv("OPS_SYSTEMCTL", str(private_systemd.systemctl_wrapper))
    return private_systemd


@pytest.fixture(scope="session")
def deploy_tree(private_systemd: PrivateSystemd) -> DeployTree:
    """The /srv test tree, with the shipped units (adjusted) installed in the manager."""
    return build_deploy_tree(private_systemd)


@pytest.fixture(scope="session")
def system_bus(deploy_tree: DeployTree) -> PrivateSystemd:
    """The private systemd with a D-Bus system bus (``systemctl start --wait`` needs one)."""
    start_system_bus(deploy_tree.systemd)
    return deploy_tree.systemd


@pytest.fixture
def shipped_unit(
    deploy_tree: DeployTree, system_bus: PrivateSystemd
) -> Iterator[Callable[[str], ShippedUnit]]:
    """Make ``ShippedUnit``s; each is stopped and loses its test drop-ins after the test."""
    made: list[ShippedUnit] = []

    def make(name: str) -> ShippedUnit:
        unit = ShippedUnit(deploy_tree, name)
        made.append(unit)
        return unit

    try:
        yield make
    finally:
        for unit in made:
            unit.reset()


@pytest.fixture
def bot_unit(shipped_unit: Callable[[str], ShippedUnit]) -> ShippedUnit:
    """The shipped bot unit (see ``shipped_unit``)."""
    return shipped_unit(BOT_UNIT)


@pytest.fixture(scope="session")
def polkit(system_bus: PrivateSystemd) -> Polkit:
    """Run polkitd on the system bus with deploy/polkit/50-admin-ops.rules installed."""
    return start_polkit(system_bus)

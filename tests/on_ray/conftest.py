"""One three-node Ray cluster on 127.0.0.1 for every test in this package (starting one takes ~20 s on
two cores): the batch tests run first, the load test after them on the same nodes. Every process the
cluster starts is recorded and ended by pid; Ray is never stopped by process name."""

from __future__ import annotations

import pytest

from broker.batch.localcluster import alive


@pytest.fixture(scope="package")
def ray_extra():
    """Skip, saying how to install it, where the ray extra is not installed (README command 2)."""
    return pytest.importorskip("ray", reason="needs the ray extra: pip install -e '.[ray]'")


@pytest.fixture(scope="package")
def cluster(ray_extra):
    from broker.batch.localcluster import LocalCluster

    with LocalCluster(nodes=3, loopback=True) as local:  # every pid it starts recorded, ended by pid
        yield local
    assert not any(alive(pid) for pid in local.pids)

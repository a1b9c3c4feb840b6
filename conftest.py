"""Fixtures for end-to-end tests (real kube-apiserver + etcd, sshd, brokers), loaded lazily,
and the check that the suite leaves nothing of its own running."""

pytest_plugins = [
    "tests.plugins.leftovers",
    "tests.e2e.plugins.controlplane",
    "tests.e2e.plugins.vms",
    "tests.e2e.plugins.brokers",
    "tests.e2e.plugins.fleet",
    "tests.e2e.plugins.node",
    "tests.e2e.plugins.cluster",
]

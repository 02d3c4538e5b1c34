"""Live migration to another host: the destination's QEMU and back end run on a second host
reached by SSH, and the migration stream crosses the network between the hosts over TCP.

The second host is a network namespace joined to this one by a veth pair, with its own sshd
(lab.netns); the lab and the disk image are on the filesystem both see, the shared storage of a
real deployment. The guest boots here with our vhost-user-blk back end, runs the live I/O agent
(read-heavy: the device fills guest buffers all the time) and moves by precopy to the other
host, where lab.remote starts QEMU and the back end, and back. As in test_migration, a migration
counts as good only if QEMU completed it, the destination runs, the source is in postmigrate,
both back ends logged no trouble, the guest kept doing I/O on its new side (on the other host
reached through its SSH forward on that host's address), and every buffer and block verified,
in the guest and in the image.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from fixtures.migration import JobFactory, assert_good, landed, stale_held, start_io, verify
from images import ImageInfo
from lab import netns
from lab.migration_job import PRECOPY, read_heavy
from lab.qemu.machine import Machine
from lab.remote import RemoteHost

pytestmark = [
    pytest.mark.migration,
    pytest.mark.boot,
    pytest.mark.skipif(netns.unavailable() is not None, reason=f"no second host: {netns.unavailable()}"),
]

TCP_PRECOPY = dataclasses.replace(PRECOPY, transport="tcp")
CONNECT_SECONDS = 10.0
READ_HEAVY = read_heavy(0x4057)


@pytest.fixture
def other_host(lab_image: ImageInfo, test_dir: Path) -> Iterator[RemoteHost]:
    """A second host (a network namespace with its sshd), root logged in with the lab's key.
    Tests request it before migration_job: the job stops its side there through this
    connection, so it must be torn down first (pytest tears down in reverse order)."""
    with (
        netns.namespace_host(lab_image.key, test_dir / "sshd.log") as namespace,
        RemoteHost.connect(netns.SSH_PORT, lab_image.key, CONNECT_SECONDS, host=namespace.address) as host,
    ):
        yield host


def migrate_uris(machine: Machine) -> list[str]:
    """The URIs `machine` was told to migrate to (its QMP transcript, kept on this host)."""
    sent = [json.loads(line)["msg"] for line in machine.config.path("qmp.jsonl").read_text().splitlines()]
    return [msg["arguments"]["uri"] for msg in sent if isinstance(msg, dict) and msg.get("execute") == "migrate"]


def test_precopy_to_another_host_and_back(other_host: RemoteHost, migration_job: JobFactory) -> None:
    """There and back under one agent's I/O: on the other host every buffer the guest held at
    the landing verifies again and the guest's I/O goes on; back here, every block verifies."""
    job = migration_job()
    here = job.current
    liveio = start_io(job, READ_HEAVY)
    there = job.hop(TCP_PRECOPY, liveio, "precopy to another host over tcp", host=other_host)
    landed(job, liveio, there)
    assert_good(there, "precopy")
    assert there.result.dirty_sync_count >= 2, there.result.summary()  # a loaded host may converge early
    assert job.current.host is other_host
    assert job.ssh.where.startswith(f"root@{other_host.address}:")
    [uri] = migrate_uris(here.machine)
    assert uri.startswith(f"tcp:{other_host.address}:")

    away = job.current
    back = job.hop(TCP_PRECOPY, liveio, "precopy back from the other host over tcp")
    report = verify(job, liveio, back)
    assert_good(back, "precopy")
    assert job.current.host is None
    [uri] = migrate_uris(away.machine)
    assert uri.startswith(f"tcp:{other_host.local_address}:")
    assert report is not None and report.reads > 2 * READ_HEAVY.slots and report.writes > 0


@pytest.mark.slow
def test_no_dirty_log_is_detected_across_hosts(other_host: RemoteHost, migration_job: JobFactory) -> None:
    """With the device's buffer writes left out of the dirty log (on both hosts' back ends),
    buffers filled during precopy land stale, there and back: the verification must catch it
    after each hop."""
    job = migration_job(faults=("no-dirty-log",))
    liveio = start_io(job, READ_HEAVY)
    stale_before = 0
    for host, way in ((other_host, "to"), (None, "back from")):
        hop = job.hop(TCP_PRECOPY, liveio, f"precopy with --fault no-dirty-log {way} another host", host=host)
        stale = stale_held(job, liveio, hop)
        assert stale > stale_before, f"{way} another host: no new stale buffers: {hop.result.summary()}"
        stale_before = stale

"""Leases: a worker holds a run by its claim (results.Store.claim: one atomic conditional UPDATE with an owner
token) and keeps it by a heartbeat. A lease that is not renewed expires, and the run is claimable again as a new
attempt: that is how a dead worker, a vanished node or a worker cut off from the database is noticed, on any node,
without asking Slurm (whose accounting is often disabled). On the worker's own host a dead pid expires its lease at
once (results.Store.expire_leases_of_dead), so kill -9 then re-run resumes immediately.
"""

from __future__ import annotations

import os
import signal
import socket
import sys
import threading

from results import Claim, Store

from .launch import pid_alive

DEFAULT_LEASE_S = 300.0  # a run whose worker has not renewed its claim for this long is taken to be dead


def lease_seconds() -> float:
    """``$REPBENCH_LEASE_S`` (tests shorten it), else 300 s; the heartbeat renews every third of it."""
    return float(os.environ.get("REPBENCH_LEASE_S", DEFAULT_LEASE_S))


def expire_dead_local(store: Store) -> list[int]:
    """Expire the leases of this host's workers that are gone."""
    return store.expire_leases_of_dead(socket.gethostname(), pid_alive)


class Heartbeat:
    """Renews a claim every ``lease_s / 3`` seconds in a thread with its own connection. When the claim is lost
    (another worker took the run after the lease expired) or cannot be renewed before it expires (the database is
    unreachable), the worker is told to stop: SIGTERM to this process, which checkpoints at the next step (the
    next attempt resumes from there) and whose later writes the store refuses (results.LeaseLost)."""

    def __init__(self, url: str, claim: Claim, lease_s: float | None = None):
        self.url, self.claim = url, claim
        self.lease_s = lease_seconds() if lease_s is None else lease_s
        self.lost: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="repbench heartbeat", daemon=True)

    def __enter__(self) -> "Heartbeat":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join(timeout=30)

    def _beat(self) -> None:
        import time
        store, deadline = None, time.monotonic() + self.lease_s
        try:
            while not self._stop.wait(self.lease_s / 3):
                try:
                    store = store or Store(self.url, migrate=False)
                    if not store.renew(self.claim, self.lease_s):
                        self._give_up("the run was taken by another worker after this one's lease expired")
                        return
                    deadline = time.monotonic() + self.lease_s
                except Exception as e:  # noqa: BLE001 - the database may come back before the lease runs out
                    if time.monotonic() > deadline:
                        self._give_up(f"the database has been unreachable for longer than the lease ({e})")
                        return
        finally:
            if store is not None:
                store.close()

    def _give_up(self, why: str) -> None:
        self.lost = why
        print(f"repbench worker {os.getpid()}: stopping: {why}", file=sys.stderr, flush=True)
        os.kill(os.getpid(), signal.SIGTERM)

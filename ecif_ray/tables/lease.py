"""``lease.json``: one driver at a time on a run directory.

Why: two drivers on one directory would both schedule every pending shard. The tables would stay
right (each shard's files are deterministic and written atomically), but the work doubles, the
manifest ends up with whichever driver finished last, and one driver's cleanup of temp files
could delete the other's writes in flight. So the driver holds a lease for the whole run: a small
JSON file at the run root naming its owner (host, pid, pid namespace, run id, a random token),
when it was taken, and a heartbeat that a daemon thread renews every ``HEARTBEAT_S`` seconds.

A second driver finds the file and refuses (:class:`LeaseHeld`, naming the owner and the
heartbeat's age) while the owner looks alive: its heartbeat is younger than ``STALE_AFTER_S`` and,
when it runs on this host (same hostname and pid namespace), its pid still exists. Otherwise the
owner was killed: the lease is taken over, with a logged warning. On this host a killed driver is
seen at once, so rerunning right after a crash resumes; from another host it takes the stale
timeout.

Every change of the file is conditional on what was read, so two drivers racing for a lease cannot
both win:

* local paths: create = a complete temp file hard-linked into place (``link`` fails if the name
  exists, also on NFS); take over, heartbeat and release = compare with what was read, then an
  atomic rename (or unlink), under an exclusive ``flock`` of the hidden ``.lease.json.lock``;
* S3: create = ``PutObject`` with ``If-None-Match: *``; take over and heartbeat = ``PutObject``
  with ``If-Match: <ETag read>`` (conditional writes, AWS S3 since 2024, and MinIO, moto);
* other fsspec filesystems: best effort, a check, an atomic write, and a read-back after
  ``SETTLE_S`` (two drivers starting within that window could both proceed).

Ages are measured against this machine's clock: hosts whose clocks differ by a good part of
``STALE_AFTER_S`` could take over a live lease (or wait longer for a dead one).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import posixpath
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict, dataclass, replace
from datetime import UTC, datetime
from typing import Any

from ecif_ray.tables.store import LEASE, LEASE_GUARD, RunStore, temp_name

HEARTBEAT_S = 15.0
STALE_AFTER_S = 60.0
SETTLE_S = 1.0
log = logging.getLogger(__name__)


class LeaseHeld(ValueError):
    """Another driver holds the run directory's lease (a refusal, like a bad config)."""


class LeaseConflict(Exception):
    """The lease file is no longer what was read: another driver changed it meanwhile."""


# -- who holds it ------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Owner:
    """The content of ``lease.json``."""

    host: str
    pid: int
    pid_ns: str | None  # two processes are on one machine only if host and pid namespace match
    run_id: str
    token: str
    acquired_at: str  # ISO 8601, UTC
    heartbeat_at: str

    @classmethod
    def this_process(cls, run_id: str) -> Owner:
        stamp = _stamp()
        return cls(host=socket.gethostname(), pid=os.getpid(), pid_ns=_pid_namespace(), run_id=run_id,
                   token=uuid.uuid4().hex, acquired_at=stamp, heartbeat_at=stamp)

    @classmethod
    def parse(cls, data: bytes) -> Owner | None:
        """None for a file that is not a lease (torn by a non-atomic filesystem, or edited by hand)."""
        try:
            owner = cls(**json.loads(data))
            owner.age()  # the heartbeat must be a timestamp
            return owner
        except (ValueError, TypeError, AttributeError):
            return None

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=2, sort_keys=True).encode()

    def beat(self) -> Owner:
        return replace(self, heartbeat_at=_stamp())

    def age(self) -> float:
        """Seconds since the last heartbeat, by this machine's clock."""
        return time.time() - datetime.fromisoformat(self.heartbeat_at).timestamp()

    def on_this_machine(self) -> bool:
        return self.host == socket.gethostname() and self.pid_ns == _pid_namespace()

    def who(self) -> str:
        return f"pid {self.pid} on host {self.host} (run {self.run_id})"

    def describe(self) -> str:
        return f"{self.who()}, heartbeat {self.age():.0f} s ago"


def _stamp() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _pid_namespace() -> str | None:
    try:
        return os.readlink("/proc/self/ns/pid")
    except OSError:
        return None


def _pid_alive(pid: int) -> bool:
    """Whether a process of this machine still runs (a zombie is dead: it only waits to be reaped)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X")
    except (OSError, IndexError):
        return True


def why_dead(owner: Owner | None, stale_after_s: float) -> str | None:
    """Why the holder of a lease can be taken over; None while it looks alive."""
    if owner is None:
        return "the lease file is unreadable"
    if owner.age() > stale_after_s:
        return f"its heartbeat is {owner.age():.0f} s old (stale after {stale_after_s:.0f} s)"
    if owner.on_this_machine() and not _pid_alive(owner.pid):
        return "that process is gone"
    return None


# -- the file, on each kind of filesystem --------------------------------------------------------------

class Slot:
    """``lease.json`` on any fsspec filesystem: read with a version, create, swap if unchanged.
    Best effort here (check, write, read back after ``settle_s``); subclasses make it atomic."""

    def __init__(self, store: RunStore, settle_s: float = SETTLE_S):
        self.store, self.fs, self.path, self.settle_s = store, store.fs, store.path(LEASE), settle_s

    def read(self) -> tuple[bytes, Any] | None:
        """The content and a version to make a later swap conditional on; None if there is no lease."""
        data = self.store.get(LEASE)
        return None if data is None else (data, data)

    def create(self, data: bytes) -> Any:
        """Write a new lease; FileExistsError if there is one."""
        if self.store.exists(LEASE):
            raise FileExistsError(self.path)
        return self._write_and_check(data)

    def swap(self, data: bytes, version: Any) -> Any:
        """Replace the lease if it is still ``version`` (else LeaseConflict); returns the new version."""
        found = self.read()
        if found is None or found[1] != version:
            raise LeaseConflict(self.path)
        return self._write_and_check(data)

    def renew(self, data: bytes, version: Any) -> Any:
        """The heartbeat: like swap (the one version it expects is the one it wrote last)."""
        return self.swap(data, version)

    def delete(self, version: Any) -> None:
        """Remove the lease if it is still ``version``."""
        found = self.read()
        if found is not None and found[1] == version:
            self.fs.rm_file(self.path)

    def _write_and_check(self, data: bytes) -> Any:
        self.store.put(LEASE, data)
        time.sleep(self.settle_s)  # a racer's write lands within this window; the last one wins
        found = self.read()
        if found is None or found[0] != data:
            raise LeaseConflict(self.path)
        return found[1]


class LocalSlot(Slot):
    """On a local (or NFS) path. Creating is a hard link of a complete file (atomic, and it fails if
    the name exists); every change of an existing lease (take over, heartbeat, release) is a check
    and then an atomic rename or unlink, made under an exclusive ``flock`` of ``LEASE_GUARD`` so
    that no two interleave. The kernel drops a killed process's flock: a dead driver never blocks."""

    def create(self, data: bytes) -> Any:
        parent = posixpath.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        temp = posixpath.join(parent, temp_name(LEASE))
        with open(temp, "wb") as f:
            f.write(data)
        try:
            os.link(temp, self.path)  # FileExistsError if a lease exists; never a partial file
        except FileExistsError:
            raise
        except OSError:  # no hard links here: an exclusive create (readers may see it half written)
            with open(self.path, "xb") as f:
                f.write(data)
        finally:
            os.unlink(temp)
        return data

    def swap(self, data: bytes, version: Any) -> Any:
        with self._guard():
            found = self.read()
            if found is None or found[1] != version:
                raise LeaseConflict(self.path)
            self.store.put(LEASE, data)  # a temp file renamed over the lease: never absent, never partial
        return data

    def delete(self, version: Any) -> None:
        with self._guard():
            found = self.read()
            if found is not None and found[1] == version:
                os.unlink(self.path)

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        try:
            import fcntl
        except ImportError:  # not POSIX: unguarded, two takeovers racing could both win
            yield
            return
        fd = os.open(posixpath.join(posixpath.dirname(self.path), LEASE_GUARD), os.O_RDWR | os.O_CREAT, 0o644)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
            except OSError as exc:  # a filesystem without locks: unguarded, as above
                log.debug("no flock on %s: %s", self.path, exc)
            yield
        finally:
            os.close(fd)  # and with it the lock


class S3Slot(Slot):
    """On S3: conditional PutObject (``If-None-Match``, ``If-Match`` on the ETag)."""

    def read(self) -> tuple[bytes, Any] | None:
        self.fs.invalidate_cache(self.path)
        try:
            etag = self.fs.info(self.path)["ETag"]  # first: content changed after it fails a later If-Match
            return self.fs.cat_file(self.path), etag
        except FileNotFoundError:
            return None

    def create(self, data: bytes) -> Any:
        return self.fs.pipe_file(self.path, data, mode="create")["ETag"]  # FileExistsError if there is one

    def swap(self, data: bytes, version: Any) -> Any:
        try:
            return self.fs.pipe_file(self.path, data, IfMatch=version)["ETag"]
        except FileNotFoundError as exc:
            raise LeaseConflict(self.path) from exc
        except OSError as exc:
            if _precondition_failed(exc):
                raise LeaseConflict(self.path) from exc
            raise


def _precondition_failed(exc: OSError) -> bool:
    """s3fs turns a 412 PreconditionFailed (the ETag changed) into a plain OSError; its cause says so."""
    response = getattr(exc.__cause__, "response", None) or {}
    return response.get("Error", {}).get("Code") == "PreconditionFailed" or "pre-condition" in str(exc).lower()


def slot_for(store: RunStore) -> Slot:
    if store.local:
        return LocalSlot(store)
    protocols = store.fs.protocol if isinstance(store.fs.protocol, tuple) else (store.fs.protocol,)
    return S3Slot(store) if {"s3", "s3a"} & set(protocols) else Slot(store)


# -- the lease ---------------------------------------------------------------------------------------

class RunLease:
    """Held by one driver for one run; a daemon thread renews the heartbeat until :meth:`release`."""

    def __init__(self, slot: Slot, owner: Owner, version: Any, heartbeat_s: float = HEARTBEAT_S):
        self.slot, self.owner, self.version, self.heartbeat_s = slot, owner, version, heartbeat_s
        self.lost = False  # set when another driver took the lease over (this one stalled too long)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._beat, name="ecif-ray-lease", daemon=True)

    @classmethod
    def acquire(cls, store: RunStore, run_id: str, *, stale_after_s: float = STALE_AFTER_S,
                heartbeat_s: float = HEARTBEAT_S, slot: Slot | None = None, attempts: int = 5) -> RunLease:
        """Take the lease, or take over a dead owner's; LeaseHeld while a live driver holds it."""
        slot = slot or slot_for(store)
        for _ in range(attempts):
            owner = Owner.this_process(run_id)
            with contextlib.suppress(FileExistsError, LeaseConflict):
                return cls(slot, owner, slot.create(owner.to_bytes()), heartbeat_s).start()
            with contextlib.suppress(LeaseConflict):
                version = _take_over(store, slot, owner, stale_after_s)
                if version is not None:
                    return cls(slot, owner, version, heartbeat_s).start()
        raise LeaseHeld(f"out: {store.url}: could not take the run directory's lease ({LEASE}): other drivers "
                        "keep changing it")

    def start(self) -> RunLease:
        self._thread.start()
        return self

    def renew(self) -> None:
        """Write a new heartbeat; LeaseConflict (and ``lost``) if the lease is no longer ours."""
        with self._lock:
            owner = self.owner.beat()
            try:
                self.version = self.slot.renew(owner.to_bytes(), self.version)
            except LeaseConflict:
                self.lost = True
                raise
            self.owner = owner

    def release(self) -> None:
        """Stop the heartbeat and delete the lease, unless another driver has taken it over."""
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join()
        with self._lock:
            if self.lost:
                return
            try:
                self.slot.delete(self.version)
            except OSError as exc:  # never hide the run's own outcome; the lease just goes stale
                log.warning("out: %s: could not remove the lease (%s); the next driver takes it over once its "
                            "heartbeat is stale", self.slot.store.url, exc)

    def __enter__(self) -> RunLease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            try:
                self.renew()
            except LeaseConflict:
                log.error("out: %s: another driver took over this run's lease; two drivers may now be "
                          "running on it", self.slot.store.url)
                return
            except Exception as exc:  # a storage hiccup: the next beat tries again
                log.warning("out: %s: could not renew the lease: %s", self.slot.store.url, exc)


def _take_over(store: RunStore, slot: Slot, owner: Owner, stale_after_s: float) -> Any | None:
    """Replace a dead owner's lease with ``owner``'s (its new version); None if there is no lease now
    (try creating again); LeaseHeld if the owner lives; LeaseConflict if the lease changed meanwhile."""
    found = slot.read()
    if found is None:
        return None
    current = Owner.parse(found[0])
    if current is None:  # maybe a lease being written where writes are not atomic: look again
        time.sleep(slot.settle_s)
        if slot.read() != found:
            raise LeaseConflict(slot.path)
    reason = why_dead(current, stale_after_s)
    if reason is None:
        assert current is not None
        raise LeaseHeld(f"out: {store.url} is in use by another driver: {current.describe()}; wait for it to "
                        f"finish, or, if it is gone, rerun once its heartbeat is {stale_after_s:.0f} s old")
    version = slot.swap(owner.to_bytes(), found[1])
    previous = current.who() if current else "an unreadable lease"
    log.warning("out: %s: took over the lease of %s: %s", store.url, previous, reason)
    return version

"""One writer at a time: a lease object at the store's root.

A build holds the lease from before it trims or writes anything until it ends. A second build
into the same store, from this machine or another, is refused naming the holder (host, pid,
since when), or waits for it when asked. The holder renews the lease from a heartbeat thread;
a lease whose holder is gone is taken over, and the build says so: on the same host when its
pid no longer runs, elsewhere when it has not been renewed within its time to live.

The lease is one object, created with an exclusive write where the backend has one (local
files: O_EXCL; S3: If-None-Match) and read back to confirm the holder's token either way.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from typing import Callable

from zarr.abc.store import Store
from zarr.core.buffer import default_buffer_prototype
from zarr.core.sync import sync
from zarr.storage import FsspecStore

from embedcache.errors import StoreError
from embedcache.location import Location, describe_io_error, io_errors

LEASE_KEY = "_writer_lease.json"
DEFAULT_TTL_S = 120.0  # a lease not renewed for this long, by a holder on another host, counts as dead


class LeaseHeld(StoreError):
    """Another live build holds the store's writer lease."""


@dataclass(frozen=True)
class LeaseInfo:
    host: str
    pid: int
    token: str
    since: str  # ISO time the lease was taken
    renewed: float  # unix time of the last renewal
    ttl_s: float

    def describe(self) -> str:
        return f"host {self.host}, pid {self.pid}, since {self.since}"

    def is_dead(self, now: float) -> str | None:
        """Why this holder counts as gone, or None while it may still be writing."""
        if self.host == socket.gethostname():
            if not _pid_alive(self.pid):
                return f"its process {self.pid} on this host is gone"
            return None
        if now - self.renewed > self.ttl_s:
            return f"it was last renewed {now - self.renewed:.0f} s ago (time to live {self.ttl_s:.0f} s)"
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


def _now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


async def _read(store: Store, key: str) -> bytes | None:
    buf = await store.get(key, prototype=default_buffer_prototype())
    return None if buf is None else buf.to_bytes()


async def _create_exclusive(store: Store, key: str, data: bytes) -> bool:
    """Write `key` only if absent; True when this call created it."""
    buf = default_buffer_prototype().buffer.from_bytes(data)
    if isinstance(store, FsspecStore) and store.fs.protocol and "s3" in store.fs.protocol:
        path = f"{store.path}/{key}"
        try:
            await store.fs._pipe_file(path, data, mode="create")
            return True
        except FileExistsError:
            return False
        except Exception as e:  # a backend without conditional writes: fall back to read-back below
            if "PreconditionFailed" in repr(e) or "412" in repr(e):
                return False
    if await store.exists(key):
        return False
    await store.set_if_not_exists(key, buf)
    return True


class WriterLease:
    """The writer lease of one store. Use as a context manager around everything a build writes."""

    def __init__(self, store: Store, where: str, *, ttl_s: float = DEFAULT_TTL_S, wait: bool = False,
                 log: Callable[[str], None] = print, poll_s: float = 2.0):
        self.store, self.where = store, where
        self.ttl_s, self.wait, self.log, self.poll_s = ttl_s, wait, log, poll_s
        self.info: LeaseInfo | None = None
        self.lost: str | None = None  # set by the heartbeat when another writer took the lease over
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # -- acquire / release --------------------------------------------------------------------
    def acquire(self) -> "WriterLease":
        try:
            return self._acquire()
        except io_errors() as e:  # unreachable endpoint, no credentials, missing bucket: one line
            raise StoreError(describe_io_error(Location.of(self.where), e)) from e

    def _acquire(self) -> "WriterLease":
        waited = False
        while True:
            current = self._current()
            if current is not None:
                why_dead = current.is_dead(time.time())
                if why_dead is None:
                    if not self.wait:
                        raise LeaseHeld(
                            f"store {self.where!r} is being written by another build ({current.describe()}); "
                            f"wait for it, or pass --wait to queue behind it"
                        )
                    if not waited:
                        self.log(f"waiting for the build writing {self.where!r} ({current.describe()}) to finish")
                        waited = True
                    time.sleep(self.poll_s)
                    continue
                self.log(f"taking over the writer lease of {self.where!r} from {current.describe()}: {why_dead}")
                sync(self.store.delete(LEASE_KEY))
            mine = LeaseInfo(socket.gethostname(), os.getpid(), uuid.uuid4().hex, _now_iso(), time.time(), self.ttl_s)
            if sync(_create_exclusive(self.store, LEASE_KEY, self._encode(mine))):
                confirmed = self._current()
                if confirmed is not None and confirmed.token == mine.token:
                    self.info = mine
                    break
            # somebody else got it between our look and our write: look again
        self._thread = threading.Thread(target=self._heartbeat, name="embedcache-lease", daemon=True)
        self._thread.start()
        return self

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.info is not None and self.lost is None:
            current = self._current()
            if current is not None and current.token == self.info.token:
                sync(self.store.delete(LEASE_KEY))
        self.info = None

    def __enter__(self) -> "WriterLease":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def check(self) -> None:
        """Raise if the lease was lost (taken over as dead): this build must not write on."""
        if self.lost is not None:
            raise StoreError(f"lost the writer lease of {self.where!r}: {self.lost}; stopped writing")

    # -- internals ----------------------------------------------------------------------------
    @staticmethod
    def _encode(info: LeaseInfo) -> bytes:
        return json.dumps(asdict(info)).encode()

    def _current(self) -> LeaseInfo | None:
        raw = sync(_read(self.store, LEASE_KEY))
        if raw is None:
            return None
        try:
            return LeaseInfo(**json.loads(raw))
        except (ValueError, TypeError) as e:
            # An unreadable lease names nobody: treat it as left by a dead writer, after its TTL.
            self.log(f"the writer lease of {self.where!r} is unreadable ({e}); treating it as stale")
            return LeaseInfo("unknown", -1, "", "unknown", 0.0, 0.0)

    def _heartbeat(self) -> None:
        interval = max(self.ttl_s / 4, 0.05)
        while not self._stop.wait(interval):
            assert self.info is not None
            try:
                current = self._current()
                if current is None or current.token != self.info.token:
                    self.lost = f"now held by {current.describe()}" if current else "the lease object was removed"
                    return
                renewed = LeaseInfo(**{**asdict(self.info), "renewed": time.time()})
                sync(self.store.set(LEASE_KEY, default_buffer_prototype().buffer.from_bytes(self._encode(renewed))))
                self.info = renewed
            except Exception as e:  # a transient store error: try again next beat; the TTL is long
                self.log(f"could not renew the writer lease of {self.where!r}: {e}")

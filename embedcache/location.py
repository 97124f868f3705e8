"""Where a store lives: a local path or a URL, opened through zarr's own store layer.

`open_location("s3://bucket/x.zarr", {"endpoint_url": ...})` returns a zarr `Store`:
`LocalStore` for paths and `file://` URLs (for reading, on Linux, `MappedLocalStore`: the same files,
byte ranges served from the page cache in place), `FsspecStore` for everything fsspec knows
(`memory://`, `s3://`, `gs://`, `az://`, ...). Credentials and endpoints come from
`storage_options` (`--storage-option KEY=VALUE`) or from each filesystem's standard
environment (for S3: `AWS_ENDPOINT_URL`, `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, ...).
Cloud filesystems are optional extras; a missing one is named in the error.

`memory://` stores live in the memory of the process that opened them: no other process (a Dask
worker, the next command) sees them, so `Location.process_local` lets a build warn, or refuse
workers. A local store may hold only regular files: `check_local_files` refuses symlinks and FIFOs,
sockets or devices, each kind once, counted, with the first few named.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from zarr.abc.store import Store
from zarr.storage import FsspecStore, LocalStore

from embedcache.errors import StoreError
from embedcache.mapped_store import MappedLocalStore, can_map, file_kind, link_target

# URL scheme -> (the package fsspec needs, the extra of this project that installs it)
CLOUD_EXTRAS = {
    "s3": ("s3fs", "s3"),
    "s3a": ("s3fs", "s3"),
    "gs": ("gcsfs", "gcs"),
    "gcs": ("gcsfs", "gcs"),
    "az": ("adlfs", "azure"),
    "abfs": ("adlfs", "azure"),
    "abfss": ("adlfs", "azure"),
}

# fsspec filesystems whose files live in the memory of the process that wrote them
PROCESS_LOCAL_SCHEMES = ("memory",)
LISTED = 5  # faults of one kind named in a message; the rest are counted


@dataclass(frozen=True)
class Location:
    """A store's address as the user gave it, and the options its filesystem needs."""

    url: str  # a local path or a URL
    storage_options: tuple[tuple[str, Any], ...] = ()  # frozen form of the options dict

    @classmethod
    def of(cls, url: str | Path, storage_options: dict[str, Any] | None = None) -> "Location":
        return cls(str(url), tuple(sorted((storage_options or {}).items())))

    @property
    def scheme(self) -> str:
        return self.url.split("://", 1)[0].lower() if "://" in self.url else ""

    @property
    def is_local(self) -> bool:
        return self.scheme in ("", "file")

    @property
    def process_local(self) -> bool:
        """Held in this process's memory (fsspec's `memory://`): no other process sees it, and it is gone at exit."""
        return self.scheme in PROCESS_LOCAL_SCHEMES

    @property
    def local_path(self) -> Path:
        return Path(self.url.split("://", 1)[1] if self.scheme == "file" else self.url).expanduser()

    @property
    def options(self) -> dict[str, Any]:
        return dict(self.storage_options)

    def __str__(self) -> str:
        return self.url


def is_url(path: str | Path) -> bool:
    """True for a URL (s3://..., file://...), False for a plain local path."""
    return "://" in str(path)


def parse_storage_options(items: list[str] | None) -> dict[str, Any]:
    """`KEY=VALUE` pairs -> options; values are JSON when they parse (true, 3, {"a": 1}), else strings.

    A dotted key sets a nested option: `client_kwargs.region_name=eu-west-1`.
    """
    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise StoreError(f"--storage-option {item!r} is not KEY=VALUE (e.g. endpoint_url=http://127.0.0.1:9000)")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target = options
        *parents, leaf = key.split(".")
        for p in parents:
            target = target.setdefault(p, {})
            if not isinstance(target, dict):
                raise StoreError(f"--storage-option {item!r}: {p!r} is set both as a value and as a group")
        target[leaf] = value
    return options


def open_location(location: Location, *, read_only: bool) -> Store:
    """The zarr store at `location`; errors name the location and, for a missing filesystem, the extra."""
    if location.is_local:
        if location.options:
            raise StoreError(f"--storage-option is for remote stores; {location.url!r} is a local path")
        path = location.local_path
        if read_only and not path.exists():
            raise StoreError(f"no embedcache store at {location.url!r} (the path does not exist)")
        if read_only and can_map():  # reads served from the page cache in place (embedcache.mapped_store)
            return MappedLocalStore(path)
        return LocalStore(path, read_only=read_only)
    package, extra = CLOUD_EXTRAS.get(location.scheme, (None, None))
    try:
        return FsspecStore.from_url(location.url, storage_options=location.options, read_only=read_only)
    except ImportError as e:
        hint = f"pip install 'embedcache[{extra}]' (installs {package})" if extra else f"install the fsspec filesystem for {location.scheme}://"
        raise StoreError(f"cannot open {location.url!r}: {hint}") from e
    except (ValueError, TypeError) as e:  # unknown protocol, or an option its filesystem does not take
        raise StoreError(f"cannot open {location.url!r}: {e}") from e


def why_absent(location: Location, store: Store) -> str:
    """Why nothing is at `location`: for object stores, say when the bucket itself is missing."""
    if location.is_local or not isinstance(store, FsspecStore):
        return "no zarr.json"
    from zarr.core.sync import sync

    bucket = location.url.split("://", 1)[1].split("/", 1)[0]
    try:
        exists = sync(store.fs._exists(bucket))
    except Exception:  # the bucket check is only a better message; the caller reports the absence anyway
        return "no zarr.json"
    return "no zarr.json" if exists else f"the bucket {bucket!r} does not exist"


def io_errors() -> tuple[type[BaseException], ...]:
    """Exceptions a store backend raises for I/O trouble (not for programming errors)."""
    errors: list[type[BaseException]] = [OSError]
    try:
        from botocore.exceptions import BotoCoreError, ClientError

        errors += [BotoCoreError, ClientError]
    except ImportError:
        pass
    return tuple(errors)


def describe_io_error(location: Location, e: BaseException) -> str:
    """One line for an I/O failure against a store: unreachable endpoint, credentials, missing bucket."""
    text = f"{type(e).__name__}: {e}".strip()
    low = text.lower()
    if "nosuchbucket" in low or "bucket does not exist" in low or "specified bucket does not exist" in low:
        return f"store {location.url!r}: the bucket does not exist ({text})"
    if "credential" in low or "accessdenied" in low or "forbidden" in low or "invalidaccesskeyid" in low or "signature" in low:
        return f"store {location.url!r}: access denied or no credentials; set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or --storage-option key=... secret=... ({text})"
    if "connect" in low or "endpoint" in low or "timed out" in low or "name or service not known" in low:
        return f"store {location.url!r}: cannot reach the storage endpoint ({text})"
    return f"store {location.url!r}: {text}"


# -- a local store holds only regular files -----------------------------------------------------

def local_file_faults(root: Path) -> list[str]:
    """Symlinks and non-regular files under `root`, each kind as ONE line with its count and first few.

    A symlink can point anywhere (another store's shard, /etc/passwd, itself), and a FIFO blocks the
    reader that opens it; a store is read and checked as the files it holds, so neither may be in one.
    Nothing is followed: a symlinked directory is named, not descended into.
    """
    links: list[str] = []
    others: list[str] = []
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            entries = list(os.scandir(top))
        except FileNotFoundError:  # removed while listed (a build's spool): nothing left to check there
            continue
        for entry in sorted(entries, key=lambda e: e.name):
            rel = os.path.relpath(entry.path, root)
            if entry.is_symlink():
                links.append(f"{rel} -> {link_target(entry.path)}")
            elif entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            elif not entry.is_file(follow_symlinks=False):
                try:
                    others.append(f"{rel} ({file_kind(entry.stat(follow_symlinks=False).st_mode)})")
                except FileNotFoundError:
                    continue
    faults = []
    for found, (one, many) in ((links, ("symlink", "symlinks")),
                               (others, ("file that is not a regular file", "files that are not regular files"))):  # fmt: skip
        if found:
            found.sort()
            more = f", and {len(found) - LISTED} more" if len(found) > LISTED else ""
            faults.append(f"{len(found)} {one if len(found) == 1 else many} in the store: {', '.join(found[:LISTED])}{more}")
    return faults


def check_local_files(location: Location) -> None:
    """A local store holding a symlink or a non-regular file is refused, in one line naming them (see `local_file_faults`)."""
    if not location.is_local:
        return
    faults = local_file_faults(location.local_path)
    if faults:
        raise StoreError(f"store {location.url!r}: {'; '.join(faults)}; a local store may hold only regular files: "
                         f"replace each with the file itself, or rebuild the store")

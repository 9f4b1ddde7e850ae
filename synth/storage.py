"""Where datasets, stage outputs and checkpoints live: a local or shared directory, or an S3-compatible bucket.

Every location is a string: a filesystem path, or an ``s3://bucket/prefix`` URI. Functions here take either and
do the same thing on both, so the code that writes shards, tier sets, prompts and checkpoints is written once.

Publishing is all-or-nothing on both. A local file is written under a temporary name in its directory, fsynced
and renamed. An object store has no rename, but a PUT is atomic (an interrupted upload leaves no object), so an
object is written under its final key and then verified (its size read back); readers trust a file only once
the record that lists it (a shard's state record, a stage's ``result.json``, a dataset's manifest) has been
published after it. S3 access uses pyarrow's filesystem (the one Ray Train uses for ``storage_path``) with the
standard AWS settings: ``AWS_ACCESS_KEY_ID``, ``AWS_SECRET_ACCESS_KEY``, ``AWS_DEFAULT_REGION`` and, for an
S3-compatible server, ``AWS_ENDPOINT_URL``. Nothing here logs credentials.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

REMOTE_SCHEMES = ("s3://",)
_CHUNK = 1 << 20


class StorageError(OSError):
    """A read or write that failed or could not be verified; the message names the location."""


def is_remote(location: str | Path) -> bool:
    """True for an object-store URI (``s3://...``), False for a filesystem path."""
    return str(location).startswith(REMOTE_SCHEMES)


def resolve(location: str | Path) -> str:
    """The canonical form: an absolute local path, or the URI without a trailing slash."""
    if is_remote(location):
        return str(location).rstrip("/")
    return str(Path(location).expanduser().resolve())


def join(base: str | Path, *parts: str) -> str:
    """``base / part / ...`` for either kind of location."""
    if is_remote(base):
        return "/".join([str(base).rstrip("/"), *(p.strip("/") for p in parts)])
    return str(Path(base, *parts))


def name(location: str | Path) -> str:
    """The last component (a file's name)."""
    return str(location).rstrip("/").rsplit("/", 1)[-1]


def parent(location: str | Path) -> str:
    if is_remote(location):
        return str(location).rstrip("/").rsplit("/", 1)[0]
    return str(Path(location).parent)


@functools.lru_cache(maxsize=16)
def _s3(bucket: str, endpoint: str | None):
    import pyarrow.fs as pafs

    # from_uri reads the AWS_* environment (credentials, region, AWS_ENDPOINT_URL) like every other S3 client.
    fs, _ = pafs.FileSystem.from_uri(f"s3://{bucket}")
    return fs


def _remote(location: str | Path) -> tuple[Any, str]:
    """(pyarrow filesystem, path within it) of an ``s3://`` URI."""
    path = str(location)[len("s3://") :].rstrip("/")
    bucket = path.split("/", 1)[0]
    if not bucket:
        raise StorageError(f"{location}: an s3:// location needs a bucket (s3://BUCKET/prefix)")
    return _s3(bucket, os.environ.get("AWS_ENDPOINT_URL")), path


def filesystem(location: str | Path) -> tuple[Any | None, str]:
    """What Ray Train takes as ``(storage_filesystem, storage_path)``: None and the path for a local directory."""
    if is_remote(location):
        return _remote(location)
    return None, resolve(location)


def _info(location: str | Path):
    import pyarrow.fs as pafs

    fs, path = _remote(location)
    try:
        return fs.get_file_info(path), pafs
    except OSError as err:
        raise StorageError(f"{location}: {err}") from None


def exists(location: str | Path) -> bool:
    """Whether a file (or, locally, a directory) is there."""
    if not is_remote(location):
        return Path(location).exists()
    info, pafs = _info(location)
    return info.type != pafs.FileType.NotFound


def is_file(location: str | Path) -> bool:
    """Whether ``location`` is a file (an object), not a directory (a prefix) or nothing."""
    if not is_remote(location):
        return Path(location).is_file()
    info, pafs = _info(location)
    return info.type == pafs.FileType.File


def size(location: str | Path) -> int:
    if not is_remote(location):
        return Path(location).stat().st_size
    info, pafs = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such object")
    return int(info.size)


@contextmanager
def open_read(location: str | Path) -> Iterator[IO[bytes]]:
    """A binary stream of the file, read sequentially (objects are streamed, not downloaded first)."""
    if not is_remote(location):
        with open(location, "rb") as f:
            yield f
        return
    fs, path = _remote(location)
    try:
        stream = fs.open_input_stream(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"{location}: no such object") from None
    except OSError as err:
        raise StorageError(f"{location}: {err}") from None
    with stream:
        yield stream


def read_bytes(location: str | Path) -> bytes:
    with open_read(location) as f:
        return f.read()


def read_text(location: str | Path) -> str:
    return read_bytes(location).decode()


def read_json(location: str | Path) -> Any:
    try:
        return json.loads(read_bytes(location))
    except json.JSONDecodeError as err:
        raise StorageError(f"{location}: not valid JSON ({err})") from None


def sha256(location: str | Path) -> str:
    h = hashlib.sha256()
    with open_read(location) as f:
        while chunk := f.read(_CHUNK):
            h.update(chunk)
    return h.hexdigest()


def makedirs(location: str | Path) -> None:
    """Create a local directory (and parents); object stores have no directories, so nothing to do there."""
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)


def _verify(location: str, expected: int) -> None:
    got = size(location)
    if got != expected:
        raise StorageError(f"{location}: wrote {expected} bytes but the store holds {got}; not published")


@contextmanager
def staged(location: str | Path) -> Iterator[Path]:
    """A local file to write ``location``'s content into; published all-or-nothing when the block ends without
    an error, deleted otherwise.

    Locally it is ``.NAME.partial`` beside the final name, renamed into place; for an object store it lies in
    scratch space and is uploaded and verified.
    """
    location = str(location)
    if is_remote(location):
        scratch: Path | None = scratch_dir("staged-")
        tmp = scratch / name(location)
    else:
        scratch = None
        Path(location).parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(location).with_name(f".{name(location)}.partial")
    try:
        yield tmp
        put_file(tmp, location, move=True)
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
        else:
            tmp.unlink(missing_ok=True)


def write_bytes(location: str | Path, data: bytes) -> None:
    """Publish ``data`` at ``location`` all-or-nothing (see the module docstring)."""
    location = str(location)
    if not is_remote(location):
        with staged(location) as tmp, open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return
    fs, path = _remote(location)
    try:
        with fs.open_output_stream(path) as f:
            f.write(data)
    except OSError as err:
        raise StorageError(f"{location}: {err}") from None
    _verify(location, len(data))


def write_text(location: str | Path, text: str) -> None:
    write_bytes(location, text.encode())


def write_json(location: str | Path, data: Any) -> None:
    write_text(location, json.dumps(data, indent=1, sort_keys=True))


def put_file(local: str | Path, location: str | Path, *, move: bool = False) -> None:
    """Publish the local file ``local`` at ``location`` all-or-nothing (moved there when ``move`` and local)."""
    local, location = Path(local), str(location)
    if not is_remote(location):
        dest = Path(location)
        dest.parent.mkdir(parents=True, exist_ok=True)
        if move:
            os.replace(local, dest)  # callers write ``local`` beside ``dest``, so this is a rename
            return
        tmp = dest.with_name(f".{dest.name}.partial")
        shutil.copyfile(local, tmp)
        os.replace(tmp, dest)
        return
    fs, path = _remote(location)
    n = local.stat().st_size
    try:
        with open(local, "rb") as src, fs.open_output_stream(path) as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
    except OSError as err:
        raise StorageError(f"{location}: upload of {local} failed: {err}") from None
    _verify(location, n)
    if move:
        local.unlink()


def get_file(location: str | Path, local: str | Path) -> Path:
    """Copy ``location`` to the local file ``local`` (written under a temporary name, then renamed)."""
    local = Path(local)
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.partial")
    with open_read(location) as src, open(tmp, "wb") as dst:
        shutil.copyfileobj(src, dst, _CHUNK)
    os.replace(tmp, local)
    return local


def cache_dir() -> Path:
    """Where copies of remote files are kept (``CLEARAIR_CACHE``, default ``~/.cache/clearair``)."""
    return Path(os.environ.get("CLEARAIR_CACHE", "~/.cache/clearair")).expanduser()


def local_copy(location: str | Path) -> Path:
    """A local path to read ``location`` with libraries that need one (torch.load, safetensors).

    Local files are returned as they are. Remote ones are downloaded once into the cache, under a name derived
    from the URI, the object's size and its modification time, so an object published again (a stage rerun with
    ``--from``) is fetched again.
    """
    if not is_remote(location):
        return Path(location)
    location = str(location)
    info, pafs = _info(location)
    if info.type != pafs.FileType.File:
        raise FileNotFoundError(f"{location}: no such object")
    digest = hashlib.sha256(f"{location}\0{info.size}\0{info.mtime_ns}".encode()).hexdigest()[:24]
    path = cache_dir() / "objects" / digest / name(location)
    if not path.exists():
        get_file(location, path)
    return path


def listdir(location: str | Path) -> list[str]:
    """Names of the entries directly under ``location`` (sorted; empty when there is nothing)."""
    if not is_remote(location):
        p = Path(location)
        return sorted(c.name for c in p.iterdir()) if p.is_dir() else []
    import pyarrow.fs as pafs

    fs, path = _remote(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return sorted(name(i.path) for i in infos)


def file_sizes(location: str | Path) -> dict[str, int]:
    """``{name: bytes}`` of the files directly under ``location``, from one listing (empty when there is nothing)."""
    if not is_remote(location):
        p = Path(location)
        return {c.name: c.stat().st_size for c in p.iterdir() if c.is_file()} if p.is_dir() else {}
    import pyarrow.fs as pafs

    fs, path = _remote(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=False))
    return {name(i.path): int(i.size) for i in infos if i.type == pafs.FileType.File}


def tree_size(location: str | Path) -> int:
    """Bytes of every file under ``location``."""
    if not is_remote(location):
        return sum(p.stat().st_size for p in Path(location).rglob("*") if p.is_file())
    import pyarrow.fs as pafs

    fs, path = _remote(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    return sum(i.size or 0 for i in infos if i.type == pafs.FileType.File)


def remove(location: str | Path) -> None:
    """Delete a file if it is there."""
    if not is_remote(location):
        Path(location).unlink(missing_ok=True)
        return
    fs, path = _remote(location)
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


def remove_tree(location: str | Path) -> None:
    """Delete a directory (or every object under a prefix)."""
    if not is_remote(location):
        shutil.rmtree(location, ignore_errors=True)
        return
    fs, path = _remote(location)
    try:
        fs.delete_dir(path)
    except FileNotFoundError:
        pass


def scratch_dir(prefix: str) -> Path:
    """A new local directory for files on their way to a remote location (the caller removes it)."""
    root = cache_dir() / "scratch"
    root.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=prefix, dir=root))


def _walk(location: str) -> list[tuple[str, int, int]]:
    """(path relative to ``location``, size, modification time in ns) of every object under an s3:// prefix."""
    import pyarrow.fs as pafs

    fs, path = _remote(location)
    infos = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True, recursive=True))
    files = [(i.path[len(path) + 1 :], int(i.size), i.mtime_ns or 0) for i in infos if i.type == pafs.FileType.File]
    return sorted(files)


def local_tree(location: str | Path) -> Path:
    """A local directory with the files under ``location`` (e.g. an exported model: weights + config).

    Local directories are returned as they are; remote prefixes are downloaded once into the cache, under a
    name derived from the URI and the names, sizes and modification times of its objects.
    """
    if not is_remote(location):
        return Path(location)
    location = str(location).rstrip("/")
    files = _walk(location)
    if not files:
        raise FileNotFoundError(f"{location}: no objects under this prefix")
    digest = hashlib.sha256(json.dumps([location, files]).encode()).hexdigest()[:24]
    root = cache_dir() / "trees" / digest
    for rel, _, _ in files:
        if not (root / rel).exists():
            get_file(join(location, rel), root / rel)
    return root


def put_tree(local: str | Path, location: str | Path) -> None:
    """Publish every file under the local directory ``local`` at ``location`` (same relative names)."""
    local = Path(local)
    for path in sorted(p for p in local.rglob("*") if p.is_file()):
        put_file(path, join(location, *path.relative_to(local).parts))


@contextmanager
def local_output(location: str | Path, keep: tuple[str, ...] | None = None) -> Iterator[Path]:
    """A local directory whose files end up at ``location`` when the block finishes without an error.

    For a local ``location`` that is the directory itself. For an object store it is scratch space that is
    uploaded (each file verified) and then removed; ``keep`` limits the upload to those top-level names (e.g.
    leave a library's working files behind).
    """
    if not is_remote(location):
        Path(location).mkdir(parents=True, exist_ok=True)
        yield Path(location)
        return
    scratch = scratch_dir("out-")
    try:
        yield scratch
        for entry in sorted(scratch.iterdir()):
            if keep is not None and entry.name not in keep:
                continue
            if entry.is_dir():
                put_tree(entry, join(location, entry.name))
            else:
                put_file(entry, join(location, entry.name))
    finally:
        shutil.rmtree(scratch, ignore_errors=True)

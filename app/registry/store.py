"""Adapter files on disk, content-addressed: DATA_DIR/adapters/<sha256>/, one directory per version.

A version's directory is named by the sha256 of its content, so the same adapter uploaded twice
is stored once, and a name can never point at other bytes than it did. Uploads are unpacked into
a private directory under `.incoming/`, checked there, and moved into place with one rename, so
a version directory is either complete or absent; once committed its files are read-only.
Several server processes may share one store.

The digest is the sha256 of `sha256sum`'s output over the files, sorted by path, so an operator
can check a version by hand:

    cd DATA_DIR/adapters/<sha256> && find . -type f -printf '%P\\n' | LC_ALL=C sort \\
        | xargs -d '\\n' sha256sum | sha256sum
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import re
import shutil
import stat
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

_SHA256 = re.compile(r"[0-9a-f]{64}")
_INCOMING = ".incoming"


@dataclass(frozen=True)
class StoredAdapter:
    sha256: str
    path: Path
    size_bytes: int  # all files together
    files: tuple[str, ...]  # relative POSIX paths, sorted


class StoreFull(Exception):
    """The store's file system is out of space (or quota): the upload is refused, nothing kept."""


class AdapterStore:
    """Adapter files under DATA_DIR/adapters: one directory per version, named by its content's sha256."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)
        self._incoming = self.root / _INCOMING
        self._incoming.mkdir(parents=True, exist_ok=True)

    def sweep_incoming(self, older_than_s: float = 6 * 3600) -> int:
        """Remove upload directories left by a process that died mid-upload; returns how many.

        Only old ones: another process sharing the store may be unpacking an upload right now.
        """
        cutoff = time.time() - older_than_s
        stale = [entry for entry in self._incoming.iterdir() if entry.stat().st_mtime < cutoff]
        for entry in stale:
            if entry.is_dir():
                _remove_tree(entry)
            else:
                entry.unlink(missing_ok=True)
        return len(stale)

    @contextlib.contextmanager
    def incoming(self) -> Iterator[Path]:
        """A fresh empty directory to unpack an upload into; removed on exit, whatever happened."""
        try:
            staged = Path(tempfile.mkdtemp(dir=self._incoming))
        except OSError as error:
            raise self._full(error) from error
        try:
            yield staged
        except OSError as error:
            raise self._full(error) from error
        finally:
            _remove_tree(staged)  # already gone when commit() moved it into place

    def _full(self, error: OSError) -> Exception:
        """A full disk, said as such (the upload streams to disk here; ENOSPC was a bare 500)."""
        if error.errno not in (errno.ENOSPC, errno.EDQUOT):
            return error
        return StoreFull(
            f"the adapter store ({self.root}) is out of disk space, so nothing was stored; "
            "free space there (or delete versions no longer served) and upload again"
        )

    def commit(self, staged: Path) -> StoredAdapter:
        """Move a directory from `incoming()` into the store under its content's sha256."""
        staged = Path(staged)
        if staged.parent.resolve() != self._incoming.resolve() or not staged.is_dir():
            raise ValueError(f"{staged} is not a directory from this store's incoming()")
        files = _regular_files(staged)
        digest, size = _digest(staged, files)
        target = self.root / digest
        # Read-only before it is visible. The top directory stays writable until it has moved:
        # moving a directory to another parent rewrites its "..".
        for directory, _, names in os.walk(staged, topdown=False):
            for name in names:
                os.chmod(os.path.join(directory, name), 0o444)
            if directory != str(staged):
                os.chmod(directory, 0o555)
        for attempt in range(3):
            try:
                os.rename(staged, target)
            except OSError:
                # Another commit of the same content won the race (or came long before): keep its
                # copy. POSIX refuses to rename onto a non-empty directory, so ours never replaces it.
                if target.is_dir():
                    _remove_tree(staged)
                    break
                if attempt == 2:
                    raise
                # Otherwise a remove() of this version was moving it aside just then: try again.
            else:
                os.chmod(target, 0o555)
                _fsync_directory(self.root)
                break
        return StoredAdapter(sha256=digest, path=target, size_bytes=size, files=files)

    def path(self, sha256: str) -> Path:
        """Where version `sha256` lives (whether or not it exists); refuses anything but 64 hex digits."""
        if not isinstance(sha256, str) or not _SHA256.fullmatch(sha256):
            raise ValueError(f"not an adapter version (64 lowercase hex digits): {sha256!r}")
        return self.root / sha256

    def has(self, sha256: str) -> bool:
        """Whether the version's files are here (its weights file, at least)."""
        return (self.path(sha256) / "adapter_model.safetensors").is_file()

    def remove(self, sha256: str) -> None:
        """Delete a version's files; removing one that is not there is not an error."""
        target = self.path(sha256)
        # Moved aside first, so no one ever sees a half-deleted version under its name.
        doomed = self._incoming / f"{sha256}.removed.{os.urandom(6).hex()}"
        try:
            os.chmod(target, 0o755)
            os.rename(target, doomed)
        except FileNotFoundError:
            return
        _remove_tree(doomed)


def _regular_files(directory: Path) -> tuple[str, ...]:
    files: list[str] = []
    for root, dirs, names in os.walk(directory):
        for name in (*dirs, *names):
            path = os.path.join(root, name)
            relative = os.path.relpath(path, directory).replace(os.sep, "/")
            mode = os.lstat(path).st_mode
            if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
                raise ValueError(f"{relative} in {directory} is not a regular file or directory")
            if any(ord(char) < 32 for char in relative) or "\\" in relative:
                # The digest is sha256sum's line format, which these would make ambiguous.
                raise ValueError(f"{relative!r} in {directory}: control characters or backslash in a name")
            if stat.S_ISREG(mode):
                files.append(relative)
    return tuple(sorted(files))


def _digest(directory: Path, files: tuple[str, ...]) -> tuple[str, int]:
    """sha256 of the `sha256sum` listing of `files` (sorted), and their total size; files are fsynced."""
    listing = hashlib.sha256()
    total = 0
    for relative in files:
        file_hash = hashlib.sha256()
        with open(directory / relative, "rb") as file:
            while chunk := file.read(2**20):
                file_hash.update(chunk)
                total += len(chunk)
            os.fsync(file.fileno())  # the bytes hashed are the bytes on disk after a crash
        listing.update(f"{file_hash.hexdigest()}  {relative}\n".encode())
    return listing.hexdigest(), total


def _remove_tree(path: Path) -> None:
    """rmtree that also removes read-only files and directories; a missing path is fine."""
    with contextlib.suppress(FileNotFoundError):
        if os.path.islink(path) or not os.path.isdir(path):
            os.unlink(path)
            return
        # Entries are removed through their directory, which must be writable (read-only files need not be).
        for directory, dirs, _ in os.walk(path):
            os.chmod(directory, 0o700)
            for name in dirs:
                inner = os.path.join(directory, name)
                if not os.path.islink(inner):
                    os.chmod(inner, 0o700)
        shutil.rmtree(path)


def _fsync_directory(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

"""Unpack an uploaded LoRA adapter archive (.zip, .tar.gz or .tgz), refusing anything unsafe.

The admin uploads a PEFT adapter folder packed as a zip or a gzipped tar. Before a byte is
written we read the whole table of entries and check every one: its name (no absolute paths,
`..`, backslashes or drive letters), its type (regular files and directories only: no links,
devices or FIFOs), duplicates, the number of entries, and the file names themselves against an
allowlist (safetensors weights, JSON configs, tokenizer files; never pickles or code). Only then
are the files streamed out in chunks, counting the bytes really written, so a bomb is stopped at
`max_unpacked_bytes` whatever its headers claim. Nothing is ever extracted by name into a path
the archive chose: each file is written as its allowlisted bare name inside `dest`.

Typical use, with the store that owns `dest`:

    with store.incoming() as staged:
        extract_adapter_archive(upload_path, "finance-lora.zip", staged)
        facts = inspect_adapter(staged, model=model, base=base, max_rank=64)
        stored = store.commit(staged)

A refusal raises `AdapterRejected`, whose message is meant for the admin; the `incoming()`
context then removes whatever was written.
"""

from __future__ import annotations

import contextlib
import gzip
import os
import re
import stat
import tarfile
import zipfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any


class AdapterRejected(ValueError):
    """Refused upload; str(error) is the message for the admin."""


@dataclass(frozen=True)
class ArchiveLimits:
    max_archive_bytes: int = 2 * 2**30  # the upload as sent (compressed)
    max_unpacked_bytes: int = 4 * 2**30  # all files together once unpacked, counted while writing
    max_files: int = 64  # entries of any kind, directories included


REQUIRED_FILES = ("adapter_config.json", "adapter_model.safetensors")
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "vocab.json",
    "merges.txt",
    "tokenizer.model",
    "added_tokens.json",
    "chat_template.jinja",
)
MANIFEST_FILE = "private_gpt.json"  # our own manifest: base fingerprint, prompt template, metrics
ALLOWED_FILES = frozenset((*REQUIRED_FILES, *TOKENIZER_FILES, "README.md", MANIFEST_FILE))

# Files that run code when loaded (pickles) or are code. Named specifically in the refusal.
PICKLE_OR_EXECUTABLE_SUFFIXES = frozenset({
    ".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz", ".msgpack", ".h5",
    ".py", ".pyc", ".pyo", ".pyd", ".so", ".dylib", ".dll", ".exe", ".sh", ".bash", ".bat", ".cmd",
    ".ps1", ".jar",
})  # fmt: skip

_CHUNK = 2**20
_ZIP_METHODS = {zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED, zipfile.ZIP_BZIP2, zipfile.ZIP_LZMA}
# A tar's long names and pax records are read into memory whole by tarfile; real ones are tiny.
_TAR_METADATA_BYTES = 64 * 2**10
_TAR_METADATA_TYPES = (
    tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE,
    tarfile.SOLARIS_XHDTYPE,
)  # fmt: skip
_PACKING_HINT = (
    "pack the adapter folder with `zip -r adapter.zip adapter/` or `tar czf adapter.tar.gz adapter/`"
)


def extract_adapter_archive(
    archive: Path, filename: str, dest: Path, limits: ArchiveLimits = ArchiveLimits()
) -> None:
    """Check the archive at `archive` (uploaded as `filename`) and unpack its files flat into `dest`.

    `dest` must be an empty directory. Raises AdapterRejected, naming the problem, for anything
    that is not a well-formed adapter folder; files already written are then the caller's to
    remove (`AdapterStore.incoming()` does).
    """
    upload = _upload_name(filename)
    if any(dest.iterdir()):
        raise ValueError(f"{dest} is not empty; extract into a fresh directory from AdapterStore.incoming()")
    size = archive.stat().st_size
    if size == 0:
        raise AdapterRejected(f"{upload} is an empty file (0 bytes); {_PACKING_HINT}")
    if size > limits.max_archive_bytes:
        raise AdapterRejected(
            f"{upload} is {_bytes(size)}, over this server's limit of {_bytes(limits.max_archive_bytes)} "
            "for an uploaded adapter"
        )
    with archive.open("rb") as file:
        head = file.read(512)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        _ZipReader(archive, upload, limits).extract(dest)
    elif head.startswith(b"\x1f\x8b"):
        _TarReader(archive, upload, limits).extract(dest)
    else:
        kind = _describe(head)
        raise AdapterRejected(
            f"{upload} is not a .zip or .tar.gz archive{f': it is {kind}' if kind else ''}; {_PACKING_HINT}"
        )


# -- the plan: every entry checked, before anything is written ----------------------------------------


@dataclass(frozen=True)
class _Entry:
    name: str  # as the archive spells it, for messages
    parts: tuple[str, ...]  # normalized path components
    is_dir: bool
    key: Any  # the format's handle: a ZipInfo, or the member's index in the tar stream


class _Plan:
    """Checks entries as they are listed; `files()` then says which to write, under which name."""

    def __init__(self, upload: str, limits: ArchiveLimits) -> None:
        self.upload = upload
        self.limits = limits
        self.entries: list[_Entry] = []
        self._seen: set[tuple[str, ...]] = set()

    def add(self, entry: _Entry) -> None:
        if len(self.entries) >= self.limits.max_files:
            raise _too_many(self.upload, self.limits)
        if entry.parts in self._seen:
            raise AdapterRejected(
                f"{_shown(entry.name)} appears twice in {self.upload}; each file may appear once"
            )
        self._seen.add(entry.parts)
        self.entries.append(entry)

    def files(self) -> list[tuple[_Entry, str]]:
        """The entries to write and the bare file name each is written as, after every check."""
        kept = [entry for entry in self.entries if entry.parts and not _is_finder_litter(entry.parts)]
        if not any(not entry.is_dir for entry in kept):
            raise AdapterRejected(f"{self.upload} is an empty archive: it contains no files")
        # Many people zip the folder itself: strip one directory that holds everything.
        tops = {entry.parts[0] for entry in kept}
        if len(tops) == 1 and all(len(entry.parts) > 1 or entry.is_dir for entry in kept):
            kept = [_Entry(e.name, e.parts[1:], e.is_dir, e.key) for e in kept if e.parts[1:]]
        planned: list[tuple[_Entry, str]] = []
        for entry in kept:
            if entry.is_dir or len(entry.parts) > 1:
                folder = entry.name if entry.is_dir else entry.name.rsplit("/", 1)[0]
                raise AdapterRejected(
                    f"{_shown(folder.rstrip('/'))}/ is a folder inside the adapter folder; upload the "
                    "adapter's files only (adapter_config.json, adapter_model.safetensors and optional "
                    "tokenizer files), with no folders inside"
                )
            name = entry.parts[0]
            if name not in ALLOWED_FILES:
                raise AdapterRejected(_not_allowed(name))
            planned.append((entry, name))
        names = {name for _, name in planned}
        for required in REQUIRED_FILES:
            if required not in names:
                raise AdapterRejected(f"{self.upload} has no {required} {_REQUIRED_WHY[required]}")
        return planned


_REQUIRED_WHY = {
    "adapter_config.json": "(the LoRA configuration that PEFT's save_pretrained() writes beside the weights)",
    "adapter_model.safetensors": (
        "(the LoRA weights); save the adapter with PEFT's save_pretrained(), which writes it"
    ),
}


def _too_many(upload: str, limits: ArchiveLimits) -> AdapterRejected:
    return AdapterRejected(
        f"{upload} has more than {limits.max_files} entries; an adapter folder holds a handful of "
        "files (adapter_config.json, adapter_model.safetensors, tokenizer files)"
    )


def _too_big(upload: str, limit: int) -> AdapterRejected:
    return AdapterRejected(
        f"{upload} unpacks to more than {_bytes(limit)}, this server's limit for an adapter "
        "(a LoRA adapter is usually well under 1 GiB)"
    )


def _not_allowed(name: str) -> str:
    suffix = os.path.splitext(name)[1].lower()
    if suffix in PICKLE_OR_EXECUTABLE_SUFFIXES:
        hint = (
            " (re-save the adapter with save_pretrained(..., safe_serialization=True))"
            if suffix == ".bin"
            else ""
        )
        return (
            f"{_shown(name)} is a pickle/executable file: only safetensors weights are accepted, "
            f"pickles are never loaded{hint}"
        )
    return (
        f"{_shown(name)} is not part of a LoRA adapter; an upload may hold only "
        f"{', '.join(REQUIRED_FILES)}, README.md, {MANIFEST_FILE} and tokenizer files "
        f"({', '.join(TOKENIZER_FILES)})"
    )


def _is_finder_litter(parts: tuple[str, ...]) -> bool:
    # macOS Finder and bsdtar add these to every archive; they are skipped, never written.
    return parts[0] == "__MACOSX" or parts[-1] == ".DS_Store" or parts[-1].startswith("._")


def _path_parts(name: str, upload: str) -> tuple[str, ...]:
    shown = _shown(name)
    if not name:
        raise AdapterRejected(f"{upload} has an entry with an empty name")
    if any(ord(char) < 32 or ord(char) == 127 for char in name):
        raise AdapterRejected(f"{shown} has control characters in its name")
    if "\\" in name:
        raise AdapterRejected(
            f"{shown} has a backslash in its path (a Windows path); re-create the archive with a tool "
            "that writes / separators"
        )
    if re.match(r"[A-Za-z]:", name):
        raise AdapterRejected(f"{shown} starts with a drive letter; archive paths must be relative")
    if name.startswith("/"):
        raise AdapterRejected(
            f"{shown} is an absolute path; archive paths must be relative to the adapter folder"
        )
    parts = tuple(part for part in name.split("/") if part not in ("", "."))
    if ".." in parts:
        raise AdapterRejected(f"{shown} has a '..' component, which would write outside the adapter folder")
    return parts


# -- writing, with the unpacked bytes counted -----------------------------------------------------------


class _Budget:
    def __init__(self, upload: str, limit: int) -> None:
        self.upload, self.limit, self.spent = upload, limit, 0

    def spend(self, count: int) -> None:
        self.spent += count
        if self.spent > self.limit:
            raise _too_big(self.upload, self.limit)


def _write(read: Callable[[int], bytes], target: Path, budget: _Budget) -> None:
    # O_EXCL | O_NOFOLLOW: never write through something already there.
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644)
    with os.fdopen(fd, "wb") as out:
        while chunk := read(_CHUNK):
            budget.spend(len(chunk))
            out.write(chunk)


# -- zip -----------------------------------------------------------------------------------------------


class _ZipReader:
    def __init__(self, archive: Path, upload: str, limits: ArchiveLimits) -> None:
        self.archive, self.upload, self.limits = archive, upload, limits

    def extract(self, dest: Path) -> None:
        try:
            zip_file = zipfile.ZipFile(self.archive)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError) as error:
            raise AdapterRejected(
                f"{self.upload} is truncated or corrupt: its zip directory cannot be read ({error})"
            ) from error
        with zip_file:
            infos = zip_file.infolist()
            if len(infos) > self.limits.max_files:
                raise _too_many(self.upload, self.limits)
            plan = _Plan(self.upload, self.limits)
            for info in infos:
                plan.add(self._entry(info))
            budget = _Budget(self.upload, self.limits.max_unpacked_bytes)
            for entry, name in plan.files():
                with self._reading(entry.name):
                    member = zip_file.open(entry.key)
                with member:
                    _write(self._guarded(member, entry.name), dest / name, budget)

    def _entry(self, info: zipfile.ZipInfo) -> _Entry:
        parts = _path_parts(info.filename, self.upload)
        shown = _shown(info.filename)
        mode = info.external_attr >> 16
        if stat.S_ISLNK(mode):
            raise AdapterRejected(
                f"{shown} is a symbolic link; links are refused, as they could point outside the adapter"
            )
        if stat.S_IFMT(mode) and not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            raise AdapterRejected(
                f"{shown} is a special file (not a regular file); only regular files are accepted"
            )
        if info.flag_bits & 0x1:
            raise AdapterRejected(f"{shown} is encrypted; upload an archive without a password")
        if info.compress_type not in _ZIP_METHODS:
            raise AdapterRejected(
                f"{shown} is compressed with a method this server does not read (zip method "
                f"{info.compress_type}); re-create the archive with the standard deflate compression"
            )
        return _Entry(info.filename, parts, info.is_dir(), info)

    @contextlib.contextmanager
    def _reading(self, name: str) -> Iterator[None]:
        try:
            yield
        except (zipfile.BadZipFile, zlib.error, EOFError, OSError, NotImplementedError) as error:
            raise AdapterRejected(
                f"{self.upload} is truncated or corrupt: {_shown(name)} does not unpack to the data its "
                f"header records ({error})"
            ) from error

    def _guarded(self, member: IO[bytes], name: str) -> Callable[[int], bytes]:
        def read(size: int) -> bytes:
            with self._reading(name):
                return member.read(size)

        return read


# -- tar.gz --------------------------------------------------------------------------------------------


class _HeaderTooLarge(Exception):
    """Raised inside tarfile's header parsing; args[0] is the record's size."""


class _BoundedTarInfo(tarfile.TarInfo):
    """A TarInfo that refuses oversized long-name and pax headers, which tarfile reads into memory."""

    def _proc_member(self, tar: tarfile.TarFile) -> Any:
        if self.type in _TAR_METADATA_TYPES and self.size > _TAR_METADATA_BYTES:
            raise _HeaderTooLarge(self.size)
        return super()._proc_member(tar)  # type: ignore[misc]


class _BoundedStream:
    """The decompressed tar stream, refused once it runs past what the limits allow."""

    def __init__(self, raw: gzip.GzipFile, upload: str, limit: int) -> None:
        self.raw = raw
        self.budget = _Budget(upload, limit)

    def read(self, size: int = -1) -> bytes:
        if size < 0:
            size = self.budget.limit - self.budget.spent + 1
        data = self.raw.read(size)
        self.budget.spend(len(data))
        return data


class _TarReader:
    """Two streaming passes: list and check every member, then write the planned ones."""

    def __init__(self, archive: Path, upload: str, limits: ArchiveLimits) -> None:
        self.archive, self.upload, self.limits = archive, upload, limits

    def extract(self, dest: Path) -> None:
        plan = _Plan(self.upload, self.limits)
        declared = 0
        with self._open() as tar:
            for index, member in self._members(tar):
                plan.add(self._entry(member, index))
                declared += member.size if member.isreg() else 0
                if declared > self.limits.max_unpacked_bytes:
                    raise _too_big(self.upload, self.limits.max_unpacked_bytes)
        wanted = {entry.key: (entry, name) for entry, name in plan.files()}
        budget = _Budget(self.upload, self.limits.max_unpacked_bytes)
        with self._open() as tar:
            for index, member in self._members(tar):
                if index not in wanted:
                    continue
                entry, name = wanted.pop(index)
                same = member.name == entry.name and member.type in (tarfile.REGTYPE, tarfile.AREGTYPE)
                data = tar.extractfile(member) if same else None
                if data is None:  # not what the first pass saw
                    break
                _write(self._guarded(data), dest / name, budget)
                if not wanted:
                    break
        if wanted:
            raise AdapterRejected(f"{self.upload} changed while it was being read; upload it again")

    @contextlib.contextmanager
    def _open(self) -> Iterator[tarfile.TarFile]:
        # Headers, padding and long names ride on top of the files' own bytes.
        overhead = (self.limits.max_files + 2) * (_TAR_METADATA_BYTES + 4 * tarfile.BLOCKSIZE)
        with self.archive.open("rb") as raw, gzip.GzipFile(fileobj=raw, mode="rb") as unzipped:
            stream = _BoundedStream(unzipped, self.upload, self.limits.max_unpacked_bytes + overhead)
            with self._reading(opening=True):  # the first header is read here: its errors mean "not a tar"
                # A read-only stream is all "r|" needs, whatever typeshed's protocol says.
                tar = tarfile.open(  # type: ignore[call-overload]  # noqa: SIM115 (closed just below)
                    fileobj=stream, mode="r|", tarinfo=_BoundedTarInfo
                )
            with tar:
                yield tar

    def _members(self, tar: tarfile.TarFile) -> Iterator[tuple[int, tarfile.TarInfo]]:
        index = 0
        while True:
            with self._reading():
                member = tar.next()
            if member is None:
                return
            yield index, member
            index += 1

    @contextlib.contextmanager
    def _reading(self, *, opening: bool = False) -> Iterator[None]:
        try:
            yield
        except _HeaderTooLarge as error:
            raise AdapterRejected(
                f"{self.upload} has a tar header record of {_bytes(error.args[0])} (a long name or pax "
                "data); real ones are a few hundred bytes"
            ) from error
        except EOFError as error:
            raise AdapterRejected(
                f"{self.upload} is truncated or corrupt: its data ends early ({error})"
            ) from error
        except tarfile.ReadError as error:
            if opening and str(error) == "empty file":
                raise AdapterRejected(f"{self.upload} is an empty archive: it contains no files") from error
            if opening and not str(error).startswith("zlib"):
                raise AdapterRejected(
                    f"{self.upload} is gzip-compressed but holds no tar archive ({error}); {_PACKING_HINT}"
                ) from error
            raise AdapterRejected(f"{self.upload} is truncated or corrupt: {error}") from error
        except (tarfile.TarError, zlib.error, OSError, RecursionError) as error:
            raise AdapterRejected(f"{self.upload} is truncated or corrupt: {error}") from error

    def _guarded(self, data: IO[bytes]) -> Callable[[int], bytes]:
        def read(size: int) -> bytes:
            with self._reading():
                return data.read(size)

        return read

    def _entry(self, member: tarfile.TarInfo, index: int) -> _Entry:
        parts = _path_parts(member.name, self.upload)
        shown = _shown(member.name)
        if member.issym():
            raise AdapterRejected(
                f"{shown} is a symbolic link (to {_shown(member.linkname)}); links are refused, as they "
                "could point outside the adapter"
            )
        if member.islnk():
            raise AdapterRejected(
                f"{shown} is a hard link (to {_shown(member.linkname)}); links are refused, "
                "add the file itself"
            )
        if member.ischr() or member.isblk():
            raise AdapterRejected(f"{shown} is a device file; only regular files are accepted")
        if member.isfifo():
            raise AdapterRejected(f"{shown} is a FIFO (named pipe); only regular files are accepted")
        if member.type not in (tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.DIRTYPE):
            raise AdapterRejected(
                f"{shown} is a tar entry of type {member.type!r} (not a regular file or folder); only "
                "regular files are accepted"
            )
        return _Entry(member.name, parts, member.isdir(), index)


# -- messages -------------------------------------------------------------------------------------------


def _upload_name(filename: str) -> str:
    # Browsers may send a full client path ("C:\\fakepath\\adapter.zip").
    base = re.split(r"[/\\]", filename)[-1]
    return _shown(base) if base else "the upload"


def _shown(name: str) -> str:
    """A name as safe to show: control characters escaped, long ones shortened."""
    shown = name if name.isprintable() else ascii(name)[1:-1]
    return shown if len(shown) <= 120 else shown[:100] + "…" + shown[-19:]


def _bytes(count: int) -> str:
    for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if count >= size:
            return f"{count / size:.3g} {unit}"
    return f"{count} bytes"


def _describe(head: bytes) -> str | None:
    """What a file that is not a zip or a gzip looks like, for the refusal."""
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head[257:262] == b"ustar":
        return "an uncompressed tar archive (compress it: tar czf)"
    known = {
        b"BZh": "a bzip2 file",
        b"\xfd7zXZ\x00": "an xz file",
        b"7z\xbc\xaf\x27\x1c": "a 7-Zip archive",
        b"Rar!": "a RAR archive",
        b"\x28\xb5\x2f\xfd": "a zstd file",
        b"\x80": "a Python pickle",
    }
    for magic, kind in known.items():
        if head.startswith(magic):
            return kind
    if len(head) >= 9 and head[8:9] == b"{" and int.from_bytes(head[:8], "little") < 2**27:
        return "a bare safetensors file (upload the whole adapter folder, zipped)"
    return None

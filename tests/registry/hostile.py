"""Builders of bad adapter uploads: each case writes a real archive to disk that intake must refuse.

A case names what it is, builds its archive from a good adapter (real PEFT files for the tiny
model), and gives the fragment of the refusal that proves it was refused for the right reason.
`ARCHIVE_CASES` are refused while unpacking; `ADAPTER_CASES` are well-formed archives whose
adapter is refused by inspection. `refuse()` runs one through the whole intake (unpack, inspect,
commit) and checks that nothing was left behind, in the store or anywhere beside it.
"""

from __future__ import annotations

import gzip
import io
import json
import stat
import struct
import tarfile
import warnings
import zipfile
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load, save
from torch import nn

from app.llm.loader import LoadedModel
from app.registry.archive import AdapterRejected, ArchiveLimits, extract_adapter_archive
from app.registry.inspect import AdapterFacts, BaseIdentity, inspect_adapter
from app.registry.store import AdapterStore, StoredAdapter
from tests.conftest import build_adapter

MAX_RANK = 64
MiB = 2**20
SMALL = ArchiveLimits(max_unpacked_bytes=1 * MiB)
DEFAULT_LIMITS = ArchiveLimits()


@dataclass(frozen=True)
class Materials:
    adapter: Path  # a good PEFT adapter directory for the tiny model
    base_dir: Path  # the tiny model's directory, to build other adapters

    def files(self, changes: dict[str, bytes | None] | None = None) -> dict[str, bytes]:
        """The good adapter's files, with some replaced (bytes), added, or left out (None)."""
        files = {path.name: path.read_bytes() for path in sorted(self.adapter.iterdir())}
        for name, content in (changes or {}).items():
            if content is None:
                files.pop(name, None)
            else:
                files[name] = content
        return files

    def config(self, **changes: Any) -> bytes:
        config = json.loads((self.adapter / "adapter_config.json").read_text())
        config.update(changes)
        return json.dumps(config).encode()

    def tensors(self) -> dict[str, torch.Tensor]:
        return load((self.adapter / "adapter_model.safetensors").read_bytes())


@dataclass(frozen=True)
class Hostile:
    id: str
    refusal: str  # a fragment of the expected message
    build: Callable[[Materials, Path], Path]  # writes the upload into the folder given; returns it
    limits: ArchiveLimits = field(default_factory=ArchiveLimits)
    upload_name: str | None = None  # the file name the browser sent; default the file's own


def build_materials(work: Path, tiny_model_dir: Path) -> Materials:
    return Materials(adapter=build_adapter(tiny_model_dir, work / "good"), base_dir=tiny_model_dir)


def tiny_base(tiny_model_dir: Path, tiny_model: LoadedModel) -> BaseIdentity:
    """The tiny model as the server would describe it."""
    return BaseIdentity(
        model_id=str(tiny_model_dir), served_name="private-gpt-test", fingerprint=tiny_model.fingerprint
    )


# -- the intake, as the server runs it ---------------------------------------------------------------


def intake(
    store: AdapterStore,
    archive: Path,
    upload_name: str,
    *,
    model: nn.Module,
    base: BaseIdentity,
    limits: ArchiveLimits = DEFAULT_LIMITS,
) -> tuple[StoredAdapter, AdapterFacts]:
    with store.incoming() as staged:
        extract_adapter_archive(archive, upload_name, staged, limits)
        facts = inspect_adapter(staged, model=model, base=base, max_rank=MAX_RANK)
        return store.commit(staged), facts


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every path under `root` with its size and modification time ((-1, 0) for directories)."""
    return {
        str(path.relative_to(root)): (-1, 0)
        if path.is_dir()
        else (path.lstat().st_size, path.lstat().st_mtime_ns)
        for path in root.rglob("*")
    }


def refuse(case: Hostile, materials: Materials, work: Path, *, model: nn.Module, base: BaseIdentity) -> str:
    """Run `case` through intake; check it is refused as expected and nothing is left anywhere."""
    uploads = work / "uploads"
    uploads.mkdir()
    archive = case.build(materials, uploads)
    store = AdapterStore(work / "store")
    before = tree(work)
    with pytest.raises(AdapterRejected) as refused:
        intake(store, archive, case.upload_name or archive.name, model=model, base=base, limits=case.limits)
    message = str(refused.value)
    assert case.refusal in message, message
    # Nothing written: not in the store, not beside it (traversal cases aim at `work` itself).
    assert tree(work) == before
    assert [path.name for path in store.root.iterdir()] == [".incoming"]
    assert not any((store.root / ".incoming").iterdir())
    return message


# -- writing archives -------------------------------------------------------------------------------


def write_zip(
    path: Path, entries: Iterable[tuple[str | zipfile.ZipInfo, bytes]], method: int = zipfile.ZIP_DEFLATED
) -> Path:
    with warnings.catch_warnings():
        # zipfile warns when it writes a name twice; the duplicate-entry case does so on purpose.
        warnings.filterwarnings("ignore", "Duplicate name", UserWarning)
        with zipfile.ZipFile(path, "w", method) as archive:
            for name, data in entries:
                archive.writestr(name, data)
    return path


def write_tar(path: Path, entries: Iterable[tuple[tarfile.TarInfo, bytes]], *, gz: bool = True) -> Path:
    with tarfile.open(path, "w:gz" if gz else "w") as archive:
        for info, data in entries:
            if info.isreg():
                info.size = len(data)
                archive.addfile(info, io.BytesIO(data))
            else:
                archive.addfile(info)
    return path


def member(name: str, kind: bytes = tarfile.REGTYPE, **attributes: Any) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    info.mode = 0o755 if kind == tarfile.DIRTYPE else 0o644
    for key, value in attributes.items():
        setattr(info, key, value)
    return info


def zip_files(path: Path, files: dict[str, bytes], folder: str = "") -> Path:
    entries: list[tuple[str | zipfile.ZipInfo, bytes]] = [(f"{folder}/", b"")] if folder else []
    entries += [(f"{folder}/{name}" if folder else name, data) for name, data in files.items()]
    return write_zip(path, entries)


def tar_files(path: Path, files: dict[str, bytes], folder: str = "", *, gz: bool = True) -> Path:
    entries = [(member(folder, tarfile.DIRTYPE), b"")] if folder else []
    entries += [(member(f"{folder}/{name}" if folder else name), data) for name, data in files.items()]
    return write_tar(path, entries, gz=gz)


def special_zip_entry(name: str, file_type: int, data: bytes) -> tuple[zipfile.ZipInfo, bytes]:
    info = zipfile.ZipInfo(name)
    info.create_system = 3  # Unix: the high 16 bits of external_attr are st_mode
    info.external_attr = (file_type | 0o777) << 16
    return info, data


def patch_zip(path: Path, patch: Callable[[bytearray, int, int], None], only: str | None = None) -> Path:
    """Rewrite header fields of each entry (or the one named `only`).

    patch(data, offset of its local header, offset of its central directory header).
    """
    data = bytearray(path.read_bytes())
    local, central = 0, data.find(b"PK\x01\x02")
    while data[local : local + 4] == b"PK\x03\x04" and central >= 0:
        name_length, extra_length = struct.unpack_from("<HH", data, local + 26)
        name = bytes(data[local + 30 : local + 30 + name_length]).decode()
        compressed = struct.unpack_from("<I", data, local + 18)[0]
        if only is None or name == only:
            patch(data, local, central)
        local += 30 + name_length + extra_length + compressed
        central = data.find(b"PK\x01\x02", central + 4)
    path.write_bytes(bytes(data))
    return path


def lie_about_size(data: bytearray, local: int, central: int) -> None:
    struct.pack_into("<I", data, local + 22, 1000)  # uncompressed size, local header
    struct.pack_into("<I", data, central + 24, 1000)  # and central directory


def mark_encrypted(data: bytearray, local: int, central: int) -> None:
    struct.pack_into("<H", data, local + 6, struct.unpack_from("<H", data, local + 6)[0] | 1)
    struct.pack_into("<H", data, central + 8, struct.unpack_from("<H", data, central + 8)[0] | 1)


def safetensors_file(tensors: dict[str, torch.Tensor]) -> bytes:
    return save({key: tensor.contiguous() for key, tensor in tensors.items()})


def good_zip(m: Materials, out: Path, changes: dict[str, bytes | None] | None = None) -> Path:
    """The good adapter, in a folder, zipped; with `changes` to its files."""
    return zip_files(out / "adapter.zip", m.files(changes), folder="adapter")


# -- archives refused while unpacking -----------------------------------------------------------------

ZEROS = b"\0" * (8 * MiB)  # deflates to 8 KiB


def _with_extra(m: Materials, out: Path, name: str, data: bytes = b"x") -> Path:
    return write_zip(out / "adapter.zip", [(name, data), *m.files().items()])


def _tar_with(m: Materials, out: Path, *extra: tuple[tarfile.TarInfo, bytes]) -> Path:
    files = [(member(f"adapter/{name}"), data) for name, data in m.files().items()]
    return write_tar(out / "adapter.tar.gz", [(member("adapter", tarfile.DIRTYPE), b""), *extra, *files])


def _duplicate_tar(m: Materials, out: Path) -> Path:
    files = m.files()
    entries = [(member("adapter_config.json"), files["adapter_config.json"])]
    entries += [(member("./adapter_config.json"), files["adapter_config.json"])]
    entries += [(member("adapter_model.safetensors"), files["adapter_model.safetensors"])]
    return write_tar(out / "adapter.tgz", entries)


def _too_many(m: Materials, out: Path) -> Path:
    folders: list[tuple[str | zipfile.ZipInfo, bytes]] = [(f"folder-{i}/", b"") for i in range(62)]
    return write_zip(out / "adapter.zip", [*m.files().items(), *folders])


def _too_many_tar(m: Materials, out: Path) -> Path:
    junk = [(member(f"adapter/README-{i}.md"), b"x") for i in range(70)]
    return _tar_with(m, out, *junk)


def _bomb_zip(m: Materials, out: Path) -> Path:
    return write_zip(out / "adapter.zip", m.files({"adapter_model.safetensors": ZEROS}).items())


def _bomb_tar(m: Materials, out: Path) -> Path:
    return tar_files(out / "adapter.tar.gz", m.files({"adapter_model.safetensors": ZEROS}), folder="adapter")


def _lying_zip(m: Materials, out: Path) -> Path:
    # Headers say 1000 bytes; the data inflates to 8 MiB. Only the header's 1000 may come out,
    # and then the checksum gives the lie away.
    path = write_zip(out / "adapter.zip", m.files({"adapter_model.safetensors": ZEROS}).items())
    return patch_zip(path, lie_about_size, only="adapter_model.safetensors")


def _pickle(m: Materials, out: Path) -> Path:
    weights = io.BytesIO()
    torch.save(m.tensors(), weights)  # what old PEFT versions wrote: a pickle
    return good_zip(m, out, {"adapter_model.safetensors": None, "adapter_model.bin": weights.getvalue()})


def _truncated(build: Callable[[Materials, Path], Path]) -> Callable[[Materials, Path], Path]:
    def truncate(m: Materials, out: Path) -> Path:
        path = build(m, out)
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return path

    return truncate


def _good_tar(m: Materials, out: Path) -> Path:
    return tar_files(out / "adapter.tar.gz", m.files(), folder="adapter")


def _gzip_of(data: bytes, out: Path) -> Path:
    path = out / "adapter.tar.gz"
    path.write_bytes(gzip.compress(data))
    return path


PDF = b"%PDF-1.7\n1 0 obj << /Type /Catalog >> endobj\n%%EOF\n"

ARCHIVE_CASES = [
    Hostile("zip-traversal", "has a '..' component", lambda m, out: _with_extra(m, out, "../../evil.txt")),
    Hostile(
        "tar-traversal",
        "has a '..' component",
        lambda m, out: _tar_with(m, out, (member("adapter/../../../evil.txt"), b"x")),
    ),
    Hostile(
        "zip-absolute-path",
        "is an absolute path",
        lambda m, out: _with_extra(m, out, str(out.parent / "evil-absolute.txt")),
    ),
    Hostile(
        "tar-absolute-path",
        "is an absolute path",
        lambda m, out: _tar_with(m, out, (member(str(out.parent / "evil-absolute.txt")), b"x")),
    ),
    Hostile("zip-backslash", "has a backslash", lambda m, out: _with_extra(m, out, "..\\..\\evil.txt")),
    Hostile(
        "zip-drive-letter", "starts with a drive letter", lambda m, out: _with_extra(m, out, "C:/evil.txt")
    ),
    Hostile(
        "zip-symlink",
        "adapter_model.safetensors is a symbolic link",
        lambda m, out: write_zip(
            out / "adapter.zip",
            [
                ("adapter_config.json", m.config()),
                special_zip_entry("adapter_model.safetensors", stat.S_IFLNK, b"/etc/passwd"),
            ],
        ),
    ),
    Hostile(
        "tar-symlink",
        "adapter/tokenizer.json is a symbolic link (to /etc/passwd)",
        lambda m, out: _tar_with(
            m, out, (member("adapter/tokenizer.json", tarfile.SYMTYPE, linkname="/etc/passwd"), b"")
        ),
    ),
    Hostile(
        "tar-hard-link",
        "adapter/tokenizer.json is a hard link (to /etc/passwd)",
        lambda m, out: _tar_with(
            m, out, (member("adapter/tokenizer.json", tarfile.LNKTYPE, linkname="/etc/passwd"), b"")
        ),
    ),
    Hostile(
        "tar-device",
        "adapter/tokenizer.json is a device file",
        lambda m, out: _tar_with(
            m, out, (member("adapter/tokenizer.json", tarfile.CHRTYPE, devmajor=1, devminor=3), b"")
        ),
    ),
    Hostile(
        "tar-fifo",
        "adapter/tokenizer.json is a FIFO",
        lambda m, out: _tar_with(m, out, (member("adapter/tokenizer.json", tarfile.FIFOTYPE), b"")),
    ),
    Hostile(
        "zip-fifo",
        "vocab.json is a special file",
        lambda m, out: write_zip(
            out / "adapter.zip", [*m.files().items(), special_zip_entry("vocab.json", stat.S_IFIFO, b"")]
        ),
    ),
    Hostile("zip-bomb", "unpacks to more than 1 MiB", _bomb_zip, limits=SMALL),
    Hostile("tar-bomb", "unpacks to more than 1 MiB", _bomb_tar, limits=SMALL),
    Hostile(
        "zip-header-lies-about-size",
        "adapter_model.safetensors does not unpack to the data its header records",
        _lying_zip,
        limits=SMALL,
    ),
    Hostile(
        "tar-huge-long-name",
        "adapter.tar.gz has a tar header record of 97.7 KiB",
        lambda m, out: _tar_with(m, out, (member("adapter/" + "n" * 100_000), b"x")),
    ),
    Hostile(
        "pickle-weights",
        "adapter_model.bin is a pickle/executable file: only safetensors weights are accepted, "
        "pickles are never loaded",
        _pickle,
    ),
    Hostile(
        "python-file",
        "setup.py is a pickle/executable file",
        lambda m, out: good_zip(m, out, {"setup.py": b"import os; os.system('id')\n"}),
    ),
    Hostile(
        "unknown-file",
        "notes.txt is not part of a LoRA adapter",
        lambda m, out: good_zip(m, out, {"notes.txt": b"hello"}),
    ),
    Hostile(
        "nested-folder",
        "adapter/checkpoint-100/ is a folder inside the adapter folder",
        lambda m, out: write_zip(
            out / "adapter.zip",
            [
                *((f"adapter/{name}", data) for name, data in m.files().items()),
                ("adapter/checkpoint-100/adapter_config.json", m.config()),
            ],
        ),
    ),
    Hostile(
        "missing-config",
        "adapter.zip has no adapter_config.json",
        lambda m, out: good_zip(m, out, {"adapter_config.json": None}),
    ),
    Hostile(
        "missing-safetensors",
        "adapter.zip has no adapter_model.safetensors",
        lambda m, out: good_zip(m, out, {"adapter_model.safetensors": None}),
    ),
    Hostile(
        "duplicate-zip-entry",
        "adapter_config.json appears twice in adapter.zip",
        lambda m, out: write_zip(out / "adapter.zip", [("adapter_config.json", b"{}"), *m.files().items()]),
    ),
    Hostile("duplicate-tar-entry", "./adapter_config.json appears twice in adapter.tgz", _duplicate_tar),
    Hostile("too-many-zip-entries", "adapter.zip has more than 64 entries", _too_many),
    Hostile("too-many-tar-entries", "adapter.tar.gz has more than 64 entries", _too_many_tar),
    Hostile(
        "archive-too-large",
        "KiB, over this server's limit of 1 KiB for an uploaded adapter",
        lambda m, out: good_zip(m, out),
        limits=ArchiveLimits(max_archive_bytes=1024),
    ),
    Hostile("truncated-zip", "adapter.zip is truncated or corrupt", _truncated(good_zip)),
    Hostile("truncated-tar-gz", "adapter.tar.gz is truncated or corrupt", _truncated(_good_tar)),
    Hostile(
        "empty-zip", "adapter.zip is an empty archive", lambda m, out: write_zip(out / "adapter.zip", [])
    ),
    Hostile(
        "empty-tar-gz",
        "adapter.tar.gz is an empty archive",
        lambda m, out: write_tar(out / "adapter.tar.gz", []),
    ),
    Hostile(
        "zip-of-folders-only",
        "is an empty archive: it contains no files",
        lambda m, out: write_zip(out / "adapter.zip", [("adapter/", b""), ("adapter/sub/", b"")]),
    ),
    Hostile(
        "zero-bytes",
        "adapter.zip is an empty file (0 bytes)",
        lambda m, out: _written(out / "adapter.zip", b""),
    ),
    Hostile(
        "pdf",
        "report.pdf is not a .zip or .tar.gz archive: it is a PDF document",
        lambda m, out: _written(out / "report.pdf", PDF),
    ),
    Hostile(
        "pdf-named-zip",
        "adapter.zip is not a .zip or .tar.gz archive: it is a PDF document",
        lambda m, out: _written(out / "upload.bin", PDF),
        upload_name="C:\\fakepath\\adapter.zip",
    ),
    Hostile(
        "uncompressed-tar",
        "it is an uncompressed tar archive",
        lambda m, out: tar_files(out / "adapter.tar", m.files(), gz=False),
    ),
    Hostile(
        "gzip-not-tar",
        "adapter.tar.gz is gzip-compressed but holds no tar archive",
        lambda m, out: _gzip_of(m.files()["adapter_model.safetensors"], out),
    ),
    Hostile(
        "encrypted-zip",
        "adapter_config.json is encrypted",
        lambda m, out: patch_zip(
            zip_files(out / "adapter.zip", m.files()), mark_encrypted, only="adapter_config.json"
        ),
    ),
]


def _written(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


# -- archives whose adapter inspection refuses ------------------------------------------------------------


def _config(**changes: Any) -> Callable[[Materials, Path], Path]:
    return lambda m, out: good_zip(m, out, {"adapter_config.json": m.config(**changes)})


def _manifest(**fields: Any) -> Callable[[Materials, Path], Path]:
    return lambda m, out: good_zip(m, out, {"private_gpt.json": json.dumps(fields).encode()})


def _weights(
    change: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]],
) -> Callable[[Materials, Path], Path]:
    return lambda m, out: good_zip(
        m, out, {"adapter_model.safetensors": safetensors_file(change(m.tensors()))}
    )


def _wider(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    # What an adapter trained on a model with twice the hidden size looks like.
    return {
        key: torch.randn(tensor.shape[0], tensor.shape[1] * 2) if ".lora_A." in key
        else torch.randn(tensor.shape[0] * 2, tensor.shape[1])
        for key, tensor in tensors.items()
    }  # fmt: skip


def _poisoned(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    key = sorted(tensors)[-1]
    tensors[key] = tensors[key].clone()
    tensors[key][0, 0] = float("nan")
    return tensors


def _rank_128(m: Materials, out: Path) -> Path:
    adapter = build_adapter(m.base_dir, out / "rank-128", rank=128, alpha=256)
    files = {path.name: path.read_bytes() for path in adapter.iterdir()}
    return zip_files(out / "adapter.zip", files)


def _truncated_safetensors(m: Materials, out: Path) -> Path:
    weights = m.files()["adapter_model.safetensors"]
    return good_zip(m, out, {"adapter_model.safetensors": weights[: len(weights) - 100]})


NAMED_A = "base_model.model.transformer.h.0.self_attention.dense.lora_A.default.weight"

ADAPTER_CASES = [
    Hostile(
        "wrong-base-model",
        "this adapter was trained for tiiuae/falcon-40b, but this server runs ",
        _config(base_model_name_or_path="tiiuae/falcon-40b"),
    ),
    Hostile(
        "wrong-fingerprint",
        "this adapter was trained for a different network (fingerprint 0123456789abcdef != ",
        _manifest(base_fingerprint="0123456789abcdef"),
    ),
    Hostile(
        "wrong-tensor-shapes",
        "was the adapter trained for a different model size?",
        _weights(_wider),
    ),
    Hostile("rank-over-cap", "rank 128 is over this server's maximum of 64 (MAX_ADAPTER_RANK)", _rank_128),
    Hostile(
        "rank-pattern-over-cap",
        "rank 96 is over this server's maximum of 64",
        _config(rank_pattern={"dense": 96}),
    ),
    Hostile("nan-weights", "contains NaN or Inf values", _weights(_poisoned)),
    Hostile(
        "not-lora",
        "peft_type PREFIX_TUNING is not supported; only LoRA adapters can be served",
        _config(peft_type="PREFIX_TUNING"),
    ),
    Hostile("dora", "DoRA (use_dora) adapters are not supported", _config(use_dora=True)),
    Hostile("modules-to-save", "modules_to_save saves full copies", _config(modules_to_save=["lm_head"])),
    Hostile(
        "unknown-tensor",
        "unexpected tensor base_model.model.transformer.word_embeddings.weight: only LoRA A/B matrices "
        "are accepted",
        _weights(lambda t: {**t, "base_model.model.transformer.word_embeddings.weight": torch.zeros(4, 4)}),
    ),
    Hostile(
        "integer-tensor",
        "LoRA weights must be floating point",
        _weights(lambda t: {key: v.to(torch.int32) if key == sorted(t)[0] else v for key, v in t.items()}),
    ),
    Hostile(
        "missing-lora-b",
        "transformer.h.3.mlp.dense_4h_to_h is targeted but the adapter has no lora_B matrix for it",
        _weights(
            lambda t: {k: v for k, v in t.items() if not k.endswith("h.3.mlp.dense_4h_to_h.lora_B.weight")}
        ),
    ),
    Hostile(
        "duplicate-lora-a",
        "is a second lora_A matrix for transformer.h.0.self_attention.dense",
        _weights(lambda t: {**t, NAMED_A: t[NAMED_A.replace(".default", "")].clone()}),
    ),
    Hostile(
        "tensor-for-untargeted-module",
        "which target_modules does not select",
        _config(target_modules=["query_key_value"]),
    ),
    Hostile(
        "invalid-json-config",
        "adapter_config.json is not valid JSON (line 1, column 2",
        lambda m, out: good_zip(m, out, {"adapter_config.json": b"{not json"}),
    ),
    Hostile(
        "config-not-an-object",
        "adapter_config.json must hold a JSON object, not list",
        lambda m, out: good_zip(m, out, {"adapter_config.json": b"[1, 2]"}),
    ),
    Hostile(
        "missing-target-module",
        "target module 'q_proj' does not exist in this base model (its linear layers are: "
        "query_key_value, dense, dense_h_to_4h, dense_4h_to_h, lm_head)",
        _config(target_modules=["q_proj", "v_proj"]),
    ),
    Hostile(
        "embedding-target",
        "target_modules selects transformer.word_embeddings, which is of type Embedding, not a linear layer",
        _config(target_modules=["word_embeddings", "dense"]),
    ),
    Hostile(
        "truncated-safetensors",
        "adapter_model.safetensors is not a valid safetensors file",
        _truncated_safetensors,
    ),
    Hostile(
        "unknown-prompt-template",
        "prompt_template vicuna is not one of alpaca, chat_template",
        _manifest(prompt_template="vicuna"),
    ),
    Hostile(
        "unknown-manifest-field",
        "private_gpt.json has an unknown field 'promt_template'",
        _manifest(promt_template="chat_template"),
    ),
]

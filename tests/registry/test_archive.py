"""Unpacking uploaded adapters: a real PEFT adapter in every packing people use, and a corpus of
hostile or broken archives, each refused for its own reason with nothing left behind."""

from __future__ import annotations

import gzip
import io
import shutil
import subprocess
import tarfile
from collections.abc import Callable
from pathlib import Path

import pytest

from app.llm.loader import LoadedModel
from app.registry.archive import AdapterRejected, extract_adapter_archive
from app.registry.inspect import BaseIdentity
from app.registry.store import AdapterStore
from tests.conftest import FALCON_TARGETS
from tests.registry.hostile import (
    ARCHIVE_CASES,
    SMALL,
    ZEROS,
    Hostile,
    Materials,
    build_materials,
    intake,
    member,
    refuse,
    tar_files,
    tiny_base,
    write_zip,
    zip_files,
)

ADAPTER_FILES = {"adapter_config.json", "adapter_model.safetensors", "README.md"}


@pytest.fixture(scope="module")
def materials(tmp_path_factory: pytest.TempPathFactory, tiny_model_dir: Path) -> Materials:
    return build_materials(tmp_path_factory.mktemp("adapter"), tiny_model_dir)


@pytest.fixture(scope="module")
def base(tiny_model_dir: Path, tiny_model: LoadedModel) -> BaseIdentity:
    return tiny_base(tiny_model_dir, tiny_model)


def _flat_zip(m: Materials, out: Path) -> Path:
    return zip_files(out / "flat.zip", m.files())


def _folder_zip(m: Materials, out: Path) -> Path:
    return zip_files(out / "folder.zip", m.files(), folder="my-adapter")


def _folder_tar(m: Materials, out: Path) -> Path:
    return tar_files(out / "folder.tar.gz", m.files(), folder="my-adapter")


def _dot_tgz(m: Materials, out: Path) -> Path:
    # `tar czf adapter.tgz -C my-adapter .` names everything ./...
    return tar_files(out / "dot.tgz", m.files(), folder=".")


def _finder_zip(m: Materials, out: Path) -> Path:
    # macOS Finder's "Compress": resource forks under __MACOSX/ and a .DS_Store, skipped.
    entries = [(f"my-adapter/{name}", data) for name, data in m.files().items()]
    entries += [("my-adapter/.DS_Store", b"\0\0\0\1Bud1"), ("__MACOSX/", b"")]
    entries += [("__MACOSX/my-adapter/._adapter_config.json", b"\0\5\26\7")]
    return write_zip(out / "finder.zip", entries)


def _tar_named_zip(m: Materials, out: Path) -> Path:
    # The content decides the format, not the name.
    return tar_files(out / "misnamed.zip", m.files(), folder="my-adapter")


@pytest.mark.parametrize(
    "pack",
    [_flat_zip, _folder_zip, _folder_tar, _dot_tgz, _finder_zip, _tar_named_zip],
    ids=lambda f: f.__name__[1:],
)
def test_a_good_adapter_is_unpacked_from_every_packing(
    pack: Callable[[Materials, Path], Path],
    materials: Materials,
    tiny_model: LoadedModel,
    base: BaseIdentity,
    tmp_path: Path,
) -> None:
    archive = pack(materials, tmp_path)
    store = AdapterStore(tmp_path / "store")
    stored, facts = intake(store, archive, archive.name, model=tiny_model.model, base=base)

    assert set(stored.files) == ADAPTER_FILES
    for name in ADAPTER_FILES:
        assert (stored.path / name).read_bytes() == (materials.adapter / name).read_bytes()
    assert (facts.peft_type, facts.rank, facts.alpha) == ("LORA", 4, 8.0)
    assert set(facts.target_modules) == set(FALCON_TARGETS)
    assert [path.name for path in store.root.iterdir() if path.name != ".incoming"] == [stored.sha256]
    assert not any((store.root / ".incoming").iterdir())


@pytest.mark.parametrize(
    "command",
    [
        ["tar", "czf", "{out}/adapter.tar.gz", "-C", "{parent}", "{folder}"],
        ["tar", "czf", "{out}/adapter.tgz", "-C", "{adapter}", "."],
        ["zip", "-qr", "{out}/adapter.zip", "{folder}"],
    ],
    ids=["tar-folder", "tar-dot", "zip-folder"],
)
def test_archives_made_by_the_usual_tools_are_accepted(
    command: list[str], materials: Materials, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    if shutil.which(command[0]) is None:
        pytest.skip(reason=f"{command[0]} is not installed")
    adapter = materials.adapter
    values = {
        "out": str(tmp_path),
        "parent": str(adapter.parent),
        "folder": adapter.name,
        "adapter": str(adapter),
    }
    subprocess.run([part.format(**values) for part in command], cwd=adapter.parent, check=True)
    archive = tmp_path / Path(command[2]).name
    stored, facts = intake(
        AdapterStore(tmp_path / "store"), archive, archive.name, model=tiny_model.model, base=base
    )
    assert set(stored.files) == ADAPTER_FILES and facts.rank == 4


def test_every_packing_of_the_same_adapter_is_the_same_version(
    materials: Materials, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    store = AdapterStore(tmp_path / "store")
    digests = set()
    for pack in (_flat_zip, _folder_tar, _finder_zip):
        out = tmp_path / pack.__name__
        out.mkdir()
        archive = pack(materials, out)
        digests.add(intake(store, archive, archive.name, model=tiny_model.model, base=base)[0].sha256)
    assert len(digests) == 1
    assert sorted(path.name for path in store.root.iterdir()) == [".incoming", *digests]


def test_tokenizer_files_and_manifest_are_kept(materials: Materials, tmp_path: Path) -> None:
    extra = {"tokenizer.json": b"{}", "chat_template.jinja": b"{{ messages }}", "private_gpt.json": b"{}"}
    archive = zip_files(tmp_path / "adapter.zip", materials.files(extra), folder="adapter")
    dest = tmp_path / "dest"
    dest.mkdir()
    extract_adapter_archive(archive, "adapter.zip", dest)
    assert {path.name for path in dest.iterdir()} == ADAPTER_FILES | set(extra)


@pytest.mark.parametrize("case", ARCHIVE_CASES, ids=lambda case: case.id)
def test_a_hostile_archive_is_refused_and_leaves_nothing(
    case: Hostile, materials: Materials, tiny_model: LoadedModel, base: BaseIdentity, tmp_path: Path
) -> None:
    refuse(case, materials, tmp_path, model=tiny_model.model, base=base)


def test_the_corpus_refuses_each_case_for_its_own_reason() -> None:
    assert len(ARCHIVE_CASES) >= 18
    assert len({case.id for case in ARCHIVE_CASES}) == len(ARCHIVE_CASES)


@pytest.mark.parametrize("packing", ["zip", "tar.gz"])
def test_a_bomb_is_stopped_while_streaming_before_the_limit_is_written(
    packing: str, materials: Materials, tmp_path: Path
) -> None:
    files = materials.files({"adapter_model.safetensors": ZEROS})  # inflates 8 MiB, limit 1 MiB
    if packing == "zip":
        archive = zip_files(tmp_path / "bomb.zip", files)
    else:
        archive = tar_files(tmp_path / "bomb.tar.gz", files)
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(AdapterRejected, match="unpacks to more than 1 MiB"):
        extract_adapter_archive(archive, archive.name, dest, SMALL)
    # Written straight into `dest` (no incoming() to clean up): what got there stayed under the limit.
    assert sum(path.stat().st_size for path in dest.iterdir()) <= SMALL.max_unpacked_bytes


def test_a_tar_member_that_ends_early_is_refused(materials: Materials, tmp_path: Path) -> None:
    # The header promises more bytes than follow, inside a gzip stream that is itself intact.
    good = io.BytesIO()
    with tarfile.open(fileobj=good, mode="w") as tar:
        info = member("adapter_config.json")
        info.size = 10_000
        tar.addfile(info, io.BytesIO(b"{" * 10_000))
    archive = tmp_path / "short.tar.gz"
    archive.write_bytes(gzip.compress(good.getvalue()[:2048]))
    dest = tmp_path / "dest"
    dest.mkdir()
    with pytest.raises(AdapterRejected, match=r"short\.tar\.gz is truncated or corrupt"):
        extract_adapter_archive(archive, archive.name, dest)


def test_dest_must_be_empty(materials: Materials, tmp_path: Path) -> None:
    archive = zip_files(tmp_path / "adapter.zip", materials.files())
    dest = tmp_path / "dest"
    dest.mkdir()
    (dest / "adapter_config.json").write_text("{}")
    with pytest.raises(ValueError, match="is not empty"):
        extract_adapter_archive(archive, "adapter.zip", dest)

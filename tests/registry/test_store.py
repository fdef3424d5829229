"""The adapter store on a real filesystem: content addressing, clean-up, read-only versions, and
commits of the same content racing in threads and in separate processes."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import threading
from pathlib import Path

import pytest

from app.registry.store import AdapterStore, StoredAdapter

FILES = {"adapter_config.json": b'{"r": 4}', "adapter_model.safetensors": b"\x08" * 4096, "README.md": b"hi"}


def stage(staged: Path, files: dict[str, bytes] = FILES) -> None:
    for name, data in files.items():
        (staged / name).write_bytes(data)


def commit(store: AdapterStore, files: dict[str, bytes] = FILES) -> StoredAdapter:
    with store.incoming() as staged:
        stage(staged, files)
        return store.commit(staged)


def versions(store: AdapterStore) -> list[str]:
    return sorted(path.name for path in store.root.iterdir() if path.name != ".incoming")


def incoming_is_empty(store: AdapterStore) -> bool:
    return not any((store.root / ".incoming").iterdir())


def test_a_commit_is_named_by_its_content(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    first = commit(store)
    assert first.path == store.root / first.sha256 == store.path(first.sha256)
    assert first.files == ("README.md", "adapter_config.json", "adapter_model.safetensors")
    assert first.size_bytes == sum(len(data) for data in FILES.values())
    assert {name: (first.path / name).read_bytes() for name in first.files} == FILES

    again = commit(store)
    assert again == first
    other = commit(store, {**FILES, "README.md": b"changed"})
    assert other.sha256 != first.sha256
    assert versions(store) == sorted([first.sha256, other.sha256])
    assert incoming_is_empty(store)


@pytest.mark.skipif(shutil.which("sha256sum") is None, reason="needs coreutils' sha256sum")
def test_the_digest_can_be_checked_by_hand(tmp_path: Path) -> None:
    stored = commit(AdapterStore(tmp_path / "adapters"))
    recipe = "find . -type f -printf '%P\\n' | LC_ALL=C sort | xargs -d '\\n' sha256sum | sha256sum"
    output = subprocess.run(
        ["bash", "-c", recipe], cwd=stored.path, capture_output=True, text=True, check=True
    )
    assert output.stdout.split()[0] == stored.sha256


def test_a_committed_version_is_read_only(tmp_path: Path) -> None:
    stored = commit(AdapterStore(tmp_path / "adapters"))
    assert stat.S_IMODE(stored.path.stat().st_mode) == 0o555
    for name in stored.files:
        assert stat.S_IMODE((stored.path / name).stat().st_mode) == 0o444


def test_incoming_is_removed_whatever_happens(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    with pytest.raises(RuntimeError), store.incoming() as staged:
        stage(staged)
        (staged / "sub").mkdir()
        (staged / "sub" / "locked").write_bytes(b"x")
        os.chmod(staged / "sub" / "locked", 0o444)
        os.chmod(staged / "sub", 0o555)
        raise RuntimeError("refused")
    assert not staged.exists()
    with store.incoming() as unused:
        assert unused.is_dir() and not any(unused.iterdir())
    assert incoming_is_empty(store) and versions(store) == []


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "abc",
        "A" * 64,
        "g" * 64,
        "a" * 63,
        "a" * 65,
        "../" + "a" * 61,
        "a" * 63 + "/",
        ".incoming",
        "/" + "a" * 63,
    ],
)
def test_path_refuses_anything_but_a_sha256(bad: str, tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        store.path(bad)
    with pytest.raises(ValueError, match="64 lowercase hex digits"):
        store.remove(bad)


def test_remove_deletes_a_read_only_version_and_is_idempotent(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    stored = commit(store)
    kept = commit(store, {"adapter_config.json": b"{}", "adapter_model.safetensors": b"\x00"})
    store.remove(stored.sha256)
    assert not stored.path.exists()
    store.remove(stored.sha256)
    assert versions(store) == [kept.sha256] and incoming_is_empty(store)
    assert commit(store) == stored  # and it can come back


def test_commit_takes_only_directories_from_incoming(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    with pytest.raises(ValueError, match="not a directory from this store's incoming"):
        store.commit(elsewhere)
    with pytest.raises(ValueError, match="not a regular file"), store.incoming() as staged:
        stage(staged)
        (staged / "link").symlink_to("/etc/passwd")
        store.commit(staged)
    assert versions(store) == [] and incoming_is_empty(store)


def test_threads_committing_the_same_content_at_once_all_succeed(tmp_path: Path) -> None:
    store = AdapterStore(tmp_path / "adapters")
    threads = 8
    ready = threading.Barrier(threads)
    results: list[StoredAdapter | BaseException] = []

    def upload() -> None:
        try:
            with store.incoming() as staged:
                stage(staged)
                ready.wait()  # all renames race
                results.append(store.commit(staged))
        except BaseException as error:
            results.append(error)

    workers = [threading.Thread(target=upload) for _ in range(threads)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    assert len(set(results)) == 1, results
    stored = results[0]
    assert isinstance(stored, StoredAdapter)
    assert versions(store) == [stored.sha256] and incoming_is_empty(store)
    assert {name: (stored.path / name).read_bytes() for name in stored.files} == FILES


PROCESS = """
import sys
from pathlib import Path
from app.registry.store import AdapterStore
store = AdapterStore(Path(sys.argv[1]))
with store.incoming() as staged:
    (staged / "adapter_model.safetensors").write_bytes(b"\\x07" * 65536)
    (staged / "adapter_config.json").write_bytes(b"{}")
    print("ready", flush=True)
    sys.stdin.readline()  # wait for the go
    print(store.commit(staged).sha256)
"""


def test_processes_sharing_the_store_commit_the_same_content_at_once(tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    AdapterStore(root)
    repo = Path(__file__).resolve().parents[2]
    processes = [
        subprocess.Popen(
            [sys.executable, "-c", PROCESS, str(root)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=repo,
        )
        for _ in range(4)
    ]
    for process in processes:  # every one staged and waiting
        assert process.stdout is not None and process.stdout.readline() == "ready\n"
    for process in processes:
        assert process.stdin is not None
        process.stdin.write("go\n")
        process.stdin.flush()
    outputs = [process.communicate(timeout=60)[0] for process in processes]
    assert [process.returncode for process in processes] == [0] * 4
    digests = {stdout.strip() for stdout in outputs}
    assert len(digests) == 1
    assert sorted(path.name for path in root.iterdir()) == [".incoming", *digests]
    assert not any((root / ".incoming").iterdir())


def test_sweep_removes_only_old_unfinished_uploads(tmp_path: Path) -> None:
    import os
    import time

    store = AdapterStore(tmp_path / "adapters")
    incoming = tmp_path / "adapters" / ".incoming"
    old, fresh = incoming / "old-upload", incoming / "fresh-upload"
    for directory in (old, fresh):
        directory.mkdir()
        (directory / "adapter_config.json").write_text("{}")
    long_ago = time.time() - 7 * 3600
    os.utime(old, (long_ago, long_ago))
    assert store.sweep_incoming() == 1
    assert not old.exists() and fresh.exists()

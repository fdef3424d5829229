"""Settings whose defaults depend on the machine."""

from __future__ import annotations

from pathlib import Path

from app.config import Settings


def test_running_generations_default_to_a_gpu_sized_batch_on_a_gpu(tmp_path: Path) -> None:
    default = Settings(data_dir=tmp_path, _env_file=None)  # type: ignore[call-arg]
    assert default.running_generations("cuda") == 32
    assert default.running_generations("cpu") == 4
    chosen = Settings(data_dir=tmp_path, max_running_generations=7, _env_file=None)  # type: ignore[call-arg]
    assert chosen.running_generations("cuda") == chosen.running_generations("cpu") == 7

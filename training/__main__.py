"""Fine-tune an adapter with QLoRA, check data, or publish an adapter.

    python -m training CONFIG.yaml [--resume] [--skip-bad-records] [--publish NAME] [--key value ...]
    python -m training validate CONFIG.yaml [--key value ...]
    python -m training publish ADAPTER_DIR --name NAME [--by ADMIN_EMAIL] [--notes TEXT] [--default]

`--key value` overrides any config field, dotted for sections: `--lora.r 8 --max_steps 50`.
Publishing uses the server's settings (DATABASE_URL, DATA_DIR, MODEL_ID) from the environment.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from training.config import ConfigError, load_config
from training.data import DataError


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    try:
        if argv[0] == "publish":
            return _publish(argv[1:])
        if argv[0] == "validate":
            return _validate(argv[1:])
        return _train(argv)
    except (ConfigError, DataError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2


def _split(argv: list[str], flags: tuple[str, ...]) -> tuple[Path, set[str], dict[str, str], list[str]]:
    """CONFIG.yaml first, then our own flags, then --key value overrides."""
    if not argv or argv[0].startswith("--"):
        raise ConfigError("give the config file first: python -m training CONFIG.yaml [--key value ...]")
    path, rest = Path(argv[0]), argv[1:]
    if not path.is_file():
        raise ConfigError(f"no config file {path}")
    switches, options, overrides = set(), {}, []
    items = iter(rest)
    for arg in items:
        if arg in flags:
            switches.add(arg)
        elif arg == "--publish":
            options["publish"] = next(items, "")
        else:
            overrides.append(arg)
    return path, switches, options, overrides


def _validate(argv: list[str]) -> int:
    from training.trainer import load_data, load_tokenizer

    path, switches, _, overrides = _split(argv, ("--skip-bad-records",))
    if "--skip-bad-records" in switches:
        overrides += ["--data.skip_bad_records", "true"]
    config = load_config(path, overrides)
    data = load_data(config, load_tokenizer(config))
    print(data.report.summary())
    print("config and data are fine")
    return 0


def _train(argv: list[str]) -> int:
    from training.trainer import train

    path, switches, options, overrides = _split(argv, ("--resume", "--skip-bad-records"))
    if "--skip-bad-records" in switches:
        overrides += ["--data.skip_bad_records", "true"]
    if options.get("publish"):
        overrides += ["--publish", options["publish"]]
    config = load_config(path, overrides)
    result = train(config, resume="--resume" in switches)
    if not result.metrics:
        return 0  # another accelerate process than the one that reports
    print(f"adapter written to {result.adapter_dir}")
    for key, value in result.metrics.items():
        print(f"  {key}: {value}")
    if result.interrupted:
        print(f"interrupted: resume with python -m training {path} --resume")
        return 130
    if config.publish:
        return _publish([str(result.adapter_dir), "--name", config.publish, "--notes", config.notes])
    return 0


def _publish(argv: list[str]) -> int:
    from app.config import ConfigError as SettingsError
    from app.config import get_settings
    from app.registry.archive import AdapterRejected
    from app.registry.service import RegistryError
    from training.publish import PublishError, publish_adapter

    parser = argparse.ArgumentParser(prog="python -m training publish")
    parser.add_argument("adapter_dir", type=Path)
    parser.add_argument("--name", required=True)
    parser.add_argument("--by", help="the admin to record it under (default: the first admin)")
    parser.add_argument("--notes", default="")
    parser.add_argument("--default", action="store_true", help="make it the default for new conversations")
    args = parser.parse_args(argv)
    try:
        settings = get_settings()
        version = asyncio.run(
            publish_adapter(
                args.adapter_dir,
                name=args.name,
                settings=settings,
                by=args.by,
                notes=args.notes,
                default=args.default,
            )
        )
    except SettingsError as error:
        print(error, file=sys.stderr)
        return 2
    except (PublishError, AdapterRejected, RegistryError) as error:
        print(f"error: not published: {error}", file=sys.stderr)
        return 1
    print(f"published {args.name}@{version.version}: served from the next request on")
    if args.default:
        print(f"{args.name} is the default adapter for new conversations")
    return 0


if __name__ == "__main__":
    sys.exit(main())

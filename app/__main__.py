"""Private GPT's command line: serve, migrate, and bootstrap users on an on-prem install.

python -m app serve                      migrate the database, then serve HOST:PORT (the demo
                                         model's first start trains the demo adapter first)
python -m app migrate                    apply the database migrations
python -m app wait-for-database [--timeout S]   wait until the database answers (containers start it first)
python -m app create-user --email E --password P [--admin]
python -m app set-password --email E [--password P]   (signs them out everywhere, revokes their API keys)
python -m app create-api-key --email E [--name N] [--rate-limit-per-minute R]   (prints the key once)
python -m app build-demo-model [DIR]     build the embedded demo model
"""

from __future__ import annotations

import argparse
import asyncio
import getpass
import logging
import os
import sys
from pathlib import Path

from app.config import ConfigError, Settings, get_settings

FIRST_ADMIN_EMAIL = "admin@localhost"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m app", description="Private GPT")
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("serve", help="migrate the database, then serve the chat and the API")
    commands.add_parser("migrate", help="apply the database migrations")
    wait = commands.add_parser("wait-for-database", help="wait until the configured database answers")
    wait.add_argument("--timeout", type=float, default=60.0, help="give up after this many seconds")
    user = commands.add_parser("create-user", help="create a user (or an admin) who signs in with a password")
    user.add_argument("--email", required=True)
    user.add_argument("--password", help="default: the PGPT_PASSWORD variable, else asked for")
    user.add_argument("--admin", action="store_true", help="give the user the admin role")
    password = commands.add_parser(
        "set-password", help="set a user's password; ends all their sessions and revokes their API keys"
    )
    password.add_argument("--email", required=True)
    password.add_argument("--password", help="default: the PGPT_PASSWORD variable, else asked for")
    key = commands.add_parser("create-api-key", help="create an API key for a user and print it once")
    key.add_argument("--email", required=True)
    key.add_argument("--name", default="", help="a label to recognise the key by")
    key.add_argument(
        "--rate-limit-per-minute",
        type=int,
        default=None,
        help="this key's own limit on requests for a reply, within its user's "
        "(default: API_KEY_RATE_LIMIT_PER_MINUTE; 0: none of its own)",
    )
    demo = commands.add_parser("build-demo-model", help="build the embedded demo model")
    demo.add_argument("directory", nargs="?", type=Path, help="default: DATA_DIR/models/demo")
    args = parser.parse_args(argv)

    try:
        settings = get_settings()
    except ConfigError as error:
        print(error, file=sys.stderr)
        return 2
    from app.logs import configure_logging

    configure_logging(settings.log_format)
    if args.command == "serve":
        return serve(settings)
    if args.command == "wait-for-database":
        from app.migrate import wait_for_database

        return 0 if wait_for_database(settings.sqlalchemy_url, timeout=args.timeout) else 1
    if args.command == "migrate":
        from app.migrate import upgrade_database

        upgrade_database(settings.sqlalchemy_url)
        return 0
    if args.command == "build-demo-model":
        from app.llm.demo import ensure_demo_model

        print(ensure_demo_model(args.directory or settings.demo_model_dir))
        return 0
    from app.migrate import upgrade_database

    upgrade_database(settings.sqlalchemy_url)  # a fresh install can create its first admin at once
    return asyncio.run(_manage(settings, args))


async def _manage(settings: Settings, args: argparse.Namespace) -> int:
    from app.auth import service as auth
    from app.db import create_engine, create_sessionmaker
    from app.models import Role

    engine = create_engine(settings.sqlalchemy_url)
    try:
        async with create_sessionmaker(engine)() as db:
            password = ""
            if args.command in ("create-user", "set-password"):
                password = args.password or os.environ.get("PGPT_PASSWORD", "")
                if not password and sys.stdin.isatty():
                    password = getpass.getpass(f"Password for {args.email}: ")
                if not password:
                    print("error: give --password, or set PGPT_PASSWORD", file=sys.stderr)
                    return 1
            if args.command == "create-user":
                try:
                    user = await auth.create_user(
                        db, email=args.email, password=password, role=Role.ADMIN if args.admin else Role.USER
                    )
                except auth.UserError as error:
                    print(f"error: {error}", file=sys.stderr)
                    return 1
                print(f"created {user.role.value} {user.email}")
            else:
                found = await auth.get_user_by_email(db, args.email)
                if found is None:
                    print(
                        f"error: no user with the email {args.email}; create it with create-user",
                        file=sys.stderr,
                    )
                    return 1
                if args.command == "set-password":
                    try:
                        await auth.set_password(db, user=found, password=password)
                    except auth.UserError as error:
                        print(f"error: {error}", file=sys.stderr)
                        return 1
                    print(f"new password set for {found.email}; their sessions and API keys are revoked")
                    return 0
                if args.rate_limit_per_minute is not None and args.rate_limit_per_minute < 0:
                    print(
                        "error: --rate-limit-per-minute must be 0 or more (0: no limit of its own)",
                        file=sys.stderr,
                    )
                    return 1
                key, row = await auth.create_api_key(db, user=found, secret=settings.secret(), name=args.name)
                if args.rate_limit_per_minute is not None:
                    row.rate_limit_per_minute = args.rate_limit_per_minute
                    await db.commit()
                print(key)
    finally:
        await engine.dispose()
    return 0


async def _first_admin(settings: Settings) -> None:
    """On a brand-new development install, make an admin so `make run` leads to a usable chat."""
    import secrets

    from sqlalchemy.exc import IntegrityError

    from app.auth import service as auth
    from app.config import Environment
    from app.db import create_engine, create_sessionmaker
    from app.models import Role

    engine = create_engine(settings.sqlalchemy_url)
    try:
        async with create_sessionmaker(engine)() as db:
            if await auth.count_users(db):
                return
            if settings.environment is Environment.PRODUCTION:
                print(
                    "No users yet: create the first admin with\n"
                    "  python -m app create-user --email you@company.com --admin",
                    flush=True,
                )
                return
            password = secrets.token_urlsafe(12)
            try:
                await auth.create_user(db, email=FIRST_ADMIN_EMAIL, password=password, role=Role.ADMIN)
            except (auth.UserError, IntegrityError):
                return  # another server process starting at the same time made it first
            print(
                f"\nNo users yet, so an admin was created for you:\n  email:    {FIRST_ADMIN_EMAIL}\n"
                f"  password: {password}\n(shown once; add real accounts with `python -m app create-user`)\n",
                flush=True,
            )
    finally:
        await engine.dispose()


def _demo_adapter(settings: Settings) -> None:
    """On the demo model's first start, train and publish the demo adapter (training/demo.py)."""
    from app.llm.demo import ensure_demo_model

    ensure_demo_model(settings.demo_model_dir)
    if not settings.demo_adapter:
        return
    from training.demo import ensure_demo_adapter
    from training.publish import PublishError

    log = logging.getLogger(__name__)
    try:
        ensure_demo_adapter(settings)
    except PublishError as error:  # e.g. users but no admin yet
        log.warning("no demo adapter: %s; the next start tries again (DEMO_ADAPTER=false skips it)", error)
    except Exception:  # a demo nicety: the server still starts without it
        log.exception(
            "the demo adapter could not be set up; serving without it (the next start tries again, "
            "DEMO_ADAPTER=false skips it)"
        )


def serve(settings: Settings) -> int:
    import uvicorn

    from app.main import create_app
    from app.migrate import upgrade_database

    upgrade_database(settings.sqlalchemy_url)
    asyncio.run(_first_admin(settings))
    if settings.uses_demo_model:
        try:
            _demo_adapter(settings)  # publishes under the first admin, so after it exists
        except KeyboardInterrupt as stop:
            print(f"\n{stop or 'stopped'}", file=sys.stderr)
            return 130
    print(f"Private GPT: http://{settings.host}:{settings.port}", flush=True)
    # One worker process: it owns the GPU; concurrency comes from the engine and asyncio.
    # Forwarded headers are applied inside the app (app.main.DirectPeer), after it has noted the
    # connection's own address for the trusted-proxy sign-in.
    uvicorn.run(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        proxy_headers=False,
        log_level="info",
        log_config=None,  # app.logs.configure_logging has set the format (LOG_FORMAT) for uvicorn too
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())

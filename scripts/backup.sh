#!/bin/sh
# Back up Private GPT: the database and the adapter store, into a new timestamped directory.
#
#   scripts/backup.sh BACKUP_ROOT          -> BACKUP_ROOT/private-gpt-YYYYmmddTHHMMSSZ/
#
# Reads the server's own settings from the environment: DATABASE_URL (PostgreSQL: pg_dump in its
# custom format; empty or sqlite: a consistent copy through SQLite's online backup, safe while the
# server runs), DATA_DIR (default ./data) and ADAPTER_STORE (default DATA_DIR/adapters). A
# development install's generated DATA_DIR/secret_key is copied too (API keys and sessions are
# hashed with it); in production SECRET_KEY lives in .env: back that up yourself.
# With compose: docker compose --profile backup run --rm backup (README: Backups).
set -eu

root="${1:?usage: backup.sh BACKUP_ROOT}"
data_dir="${DATA_DIR:-data}"
store="${ADAPTER_STORE:-$data_dir/adapters}"
url="${DATABASE_URL:-}"
target="$root/private-gpt-$(date -u +%Y%m%dT%H%M%SZ)"
mkdir -p "$target"
umask 077

case "$url" in
  postgres*)
    # libpq takes the URL itself once SQLAlchemy's +driver suffix is dropped.
    libpq_url="$(printf '%s' "$url" | sed -E 's#^postgres(ql)?(\+[a-z0-9]+)?://#postgresql://#')"
    pg_dump --format=custom --no-owner --no-privileges --file="$target/database.dump" "$libpq_url"
    echo "database: PostgreSQL dump, $(wc -c < "$target/database.dump") bytes"
    ;;
  "" | sqlite*)
    database="${url#sqlite*:///}"
    [ -n "$url" ] || database="$data_dir/private-gpt.db"
    [ -f "$database" ] || { echo "backup.sh: no SQLite database at $database" >&2; exit 1; }
    if command -v sqlite3 >/dev/null 2>&1; then
      sqlite3 "$database" ".backup '$target/database.sqlite'"
    else
      "${PYTHON:-python3}" -c 'import sqlite3, sys; sqlite3.connect(sys.argv[1]).backup(sqlite3.connect(sys.argv[2]))' \
        "$database" "$target/database.sqlite"
    fi
    echo "database: SQLite copy of $database"
    ;;
  *)
    echo "backup.sh: DATABASE_URL must be postgresql://... or sqlite:///..." >&2
    exit 1
    ;;
esac

if [ -d "$store" ]; then
  tar -C "$store" --exclude=./.incoming -cf "$target/adapters.tar" .
else
  tar -cf "$target/adapters.tar" --files-from /dev/null
fi
echo "adapter store: $(tar -tf "$target/adapters.tar" | grep -c '/adapter_config.json$' || true) adapter versions from $store"
if [ -f "$data_dir/secret_key" ]; then
  cp "$data_dir/secret_key" "$target/secret_key"
fi
echo "$target"

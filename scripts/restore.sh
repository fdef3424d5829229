#!/bin/sh
# Restore a backup made by scripts/backup.sh into the database and adapter store the environment
# names (DATABASE_URL, DATA_DIR, ADAPTER_STORE: as for backup.sh). Stop every app replica first.
#
#   scripts/restore.sh [--force] BACKUP_DIR
#
# Without --force it only restores into an empty database and an empty store (a fresh install, or a
# new server); --force replaces what is there. Run the migrations afterwards (the app's entrypoint
# does): a backup of an older release is brought up to date like any older database.
set -eu

force=false
if [ "${1:-}" = --force ]; then
  force=true
  shift
fi
backup="${1:?usage: restore.sh [--force] BACKUP_DIR}"
data_dir="${DATA_DIR:-data}"
store="${ADAPTER_STORE:-$data_dir/adapters}"
url="${DATABASE_URL:-}"
[ -f "$backup/adapters.tar" ] || { echo "restore.sh: $backup is not a backup (no adapters.tar)" >&2; exit 1; }

case "$url" in
  postgres*)
    [ -f "$backup/database.dump" ] || { echo "restore.sh: $backup holds no PostgreSQL dump" >&2; exit 1; }
    libpq_url="$(printf '%s' "$url" | sed -E 's#^postgres(ql)?(\+[a-z0-9]+)?://#postgresql://#')"
    tables="$(psql "$libpq_url" -Atc "SELECT count(*) FROM pg_tables WHERE schemaname = 'public'")"
    if [ "$tables" != 0 ] && [ "$force" = false ]; then
      echo "restore.sh: the database has $tables tables already; restore into an empty one, or pass --force" >&2
      exit 1
    fi
    pg_restore --clean --if-exists --no-owner --no-privileges --exit-on-error --single-transaction \
      --dbname="$libpq_url" "$backup/database.dump"
    echo "database: restored into PostgreSQL"
    ;;
  "" | sqlite*)
    [ -f "$backup/database.sqlite" ] || { echo "restore.sh: $backup holds no SQLite database" >&2; exit 1; }
    database="${url#sqlite*:///}"
    [ -n "$url" ] || database="$data_dir/private-gpt.db"
    if [ -e "$database" ] && [ "$force" = false ]; then
      echo "restore.sh: $database exists; pass --force to replace it" >&2
      exit 1
    fi
    mkdir -p "$(dirname "$database")"
    rm -f "$database" "$database-wal" "$database-shm"
    cp "$backup/database.sqlite" "$database"
    echo "database: restored to $database"
    ;;
  *)
    echo "restore.sh: DATABASE_URL must be postgresql://... or sqlite:///..." >&2
    exit 1
    ;;
esac

mkdir -p "$store"
if [ -n "$(ls -A "$store")" ]; then
  if [ "$force" = false ]; then
    echo "restore.sh: the adapter store $store is not empty; pass --force to replace it" >&2
    exit 1
  fi
  # Stored versions are read-only: make them writable to remove them. The directory itself stays
  # (it may be a volume's mount point).
  chmod -R u+w "$store"
  find "$store" -mindepth 1 -maxdepth 1 -exec rm -rf {} +
fi
tar -C "$store" -xf "$backup/adapters.tar"
echo "adapter store: restored to $store"
if [ -f "$backup/secret_key" ] && { [ ! -e "$data_dir/secret_key" ] || [ "$force" = true ]; }; then
  cp "$backup/secret_key" "$data_dir/secret_key"
fi

#!/bin/sh
# Make the cluster on first start, then run the server as the postgres user.
#
# The first start initialises PGDATA and creates POSTGRES_DB on a server that listens on its
# Unix socket only, so a readiness probe over TCP (testcontainers runs `psql --host 127.0.0.1`)
# cannot succeed until the real server, with the final configuration, is up.
set -eu

if [ "${1#-}" != "$1" ]; then
    set -- postgres "$@"
fi
if [ "$1" != postgres ]; then
    exec "$@"
fi
shift

: "${POSTGRES_USER:=postgres}"
: "${POSTGRES_DB:=$POSTGRES_USER}"
if [ -z "${POSTGRES_PASSWORD:-}" ]; then
    echo "docker-entrypoint: POSTGRES_PASSWORD must be set" >&2
    exit 1
fi

as_postgres() {
    setpriv --reuid=postgres --regid=postgres --init-groups "$@"
}

mkdir -p "$PGDATA" /run/postgresql
chown postgres:postgres "$PGDATA" /run/postgresql
chmod 700 "$PGDATA"

if [ ! -s "$PGDATA/PG_VERSION" ]; then
    pwfile=$(mktemp)
    printf '%s\n' "$POSTGRES_PASSWORD" > "$pwfile"
    chown postgres "$pwfile"
    as_postgres initdb --username="$POSTGRES_USER" --pwfile="$pwfile" --encoding=UTF8 \
        --locale=C.UTF-8 --auth-local=trust --auth-host=scram-sha-256 >/dev/null
    rm -f "$pwfile"
    echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"

    as_postgres pg_ctl --silent --wait --options="-c listen_addresses=''" start
    if [ "$POSTGRES_DB" != postgres ]; then
        # psql quotes the name (:"db") only in a script it reads, never in --command.
        echo 'CREATE DATABASE :"db"' | as_postgres psql --quiet --username="$POSTGRES_USER" \
            --dbname=postgres --set=ON_ERROR_STOP=1 --set=db="$POSTGRES_DB" >/dev/null
    fi
    as_postgres pg_ctl --silent --wait --mode=fast stop
    echo "docker-entrypoint: initialised $PGDATA with database $POSTGRES_DB"
fi

exec setpriv --reuid=postgres --regid=postgres --init-groups \
    postgres -c listen_addresses='*' "$@"

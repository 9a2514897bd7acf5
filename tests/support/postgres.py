"""A PostgreSQL image for the template tests, built from Debian's packages (no registry here).

It honours the official image's POSTGRES_USER / POSTGRES_PASSWORD / POSTGRES_DB, so the template's
docker-compose.yml works with it as with postgres:16.
"""

from __future__ import annotations

import io
import tarfile

from devbox_build.engine import Built, Engine

TAG = "devbox-test/postgres:15"

DOCKERFILE = b"""\
FROM debian:bookworm-slim
RUN apt-get update && apt-get install -y --no-install-recommends postgresql-15 \\
 && rm -rf /var/lib/apt/lists/* \\
 && install -d -o postgres -g postgres /var/lib/postgresql/data /var/run/postgresql
COPY entrypoint.sh /usr/local/bin/entrypoint.sh
USER postgres
ENV PATH=/usr/lib/postgresql/15/bin:$PATH PGDATA=/var/lib/postgresql/data
ENTRYPOINT ["sh", "/usr/local/bin/entrypoint.sh"]
"""

ENTRYPOINT = b"""\
set -eu
if [ ! -s "$PGDATA/PG_VERSION" ]; then
  echo "$POSTGRES_PASSWORD" > /tmp/pw
  initdb --username="$POSTGRES_USER" --pwfile=/tmp/pw --auth-local=trust --auth-host=scram-sha-256 >/dev/null
  rm /tmp/pw
  echo "listen_addresses = '*'" >> "$PGDATA/postgresql.conf"
  echo "host all all all scram-sha-256" >> "$PGDATA/pg_hba.conf"
  echo "CREATE DATABASE $POSTGRES_DB;" | postgres --single -D "$PGDATA" postgres >/dev/null
fi
exec postgres -D "$PGDATA"
"""


def ensure_postgres_image(engine: Engine) -> str:
    if engine.image_id(TAG):
        return TAG
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as archive:
        for name, data in (("Dockerfile", DOCKERFILE), ("entrypoint.sh", ENTRYPOINT)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    buffer.seek(0)
    image_id = None
    for event in engine.build(buffer, network_mode="host"):
        if isinstance(event, Built):
            image_id = event.image_id
    assert image_id, "the PostgreSQL test image did not build"
    engine.tag(image_id, TAG)
    return TAG

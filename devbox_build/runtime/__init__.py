"""The image's runtime: what runs inside every devbox-built image.

Entrypoint, start hooks, idle watcher, restore hook, cron runner, training runner, healthcheck
and dev-container setup, as modules of one package. In the image it is ``/opt/devbox/lib/
devbox_runtime``, started by the thin launchers ``render`` writes to ``/opt/devbox/bin``; on the
host it is ``devbox_build.runtime``, imported by the tests and by host code for the facts in
:mod:`.contract`.

Rules for every module here: the standard library only (the image's system Python runs it,
before and whatever the user installs), Python 3.9 or newer (the oldest a spec may name), and
relative imports only, so the package works under either name. ``tests/test_runtime.py`` holds
the package to these rules.
"""

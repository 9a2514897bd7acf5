# Sourced by scripts/main, scripts/test and .ci/run: make this machine able to build.
# Idempotent: each step only does work when what it provides is missing.
#   - .venv with devbox-build and its test tools
#   - a Docker engine (installs docker.io and starts dockerd when none answers, Linux + root)
#   - the base image the default specs name (pulled, or bootstrapped from a Debian mirror)
#   - arm64 under emulation (an x86-64 Linux machine, as root): Debian's qemu-user-static, its
#     aarch64 handler registered with this machine's kernel (binfmt_misc; said when done), and
#     the base's arm64 twin (bootstrap-base --platform linux/arm64)
#   - (the host's extra CA certificates: devbox-build finds them itself)
#   - the Dev Container CLI (npm @devcontainers/cli, in .devbox/node) and docker-compose, which
#     the template tests use in place of VS Code, and Debian's docker-registry for a loopback
#     registry
#   - cloud-init's package, unpacked (not installed) for its schema check of the EC2 user data
#   - JupyterHub's proxy (npm configurable-http-proxy, in .devbox/node): the hub tests run a hub
#     on loopback (JupyterHub itself and DockerSpawner come with the test extras)

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
BASE_IMAGE="${DEVBOX_BASE_IMAGE:-debian:bookworm-slim}"
STATE="$ROOT/.devbox"
mkdir -p "$STATE"

log() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

provision_python() {
  if [ ! -x "$ROOT/.venv/bin/devbox-build" ] || [ "$ROOT/pyproject.toml" -nt "$ROOT/.venv/.provisioned" ]; then
    log "python: creating .venv with devbox-build[test]"
    python3 -m venv "$ROOT/.venv"
    "$ROOT/.venv/bin/pip" install -q --disable-pip-version-check -e "$ROOT[test]"
    touch "$ROOT/.venv/.provisioned"
  fi
  export PATH="$ROOT/.venv/bin:$PATH"
}

engine_answers() { docker info >/dev/null 2>&1 || "$ROOT/.venv/bin/python" -c 'import docker; docker.from_env().ping()' >/dev/null 2>&1; }

provision_engine() {
  engine_answers && return 0
  if [ "$(id -u)" != 0 ] || [ "$(uname -s)" != Linux ]; then
    log "engine: no Docker engine answers; start Docker and run again"; return 1
  fi
  if ! command -v dockerd >/dev/null; then
    log "engine: installing docker.io"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker.io >/dev/null
  fi
  log "engine: starting dockerd (log: .devbox/dockerd.log)"
  # Detached, output to a file: it must not hold the caller's pipes open.
  setsid dockerd >"$STATE/dockerd.log" 2>&1 < /dev/null &
  echo $! >"$STATE/dockerd.pid"
  for _ in $(seq 60); do engine_answers && return 0; sleep 1; done
  log "engine: dockerd did not answer in 60 s; see .devbox/dockerd.log"; return 1
}

stop_engine_if_started() {
  if [ -f "$STATE/dockerd.pid" ]; then
    log "engine: stopping the dockerd this run started"
    kill "$(cat "$STATE/dockerd.pid")" 2>/dev/null || true
    rm -f "$STATE/dockerd.pid"
  fi
}

provision_base_image() {
  docker image inspect "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  docker pull -q "$BASE_IMAGE" >/dev/null 2>&1 && return 0
  log "base: $BASE_IMAGE cannot be pulled here; bootstrapping it from a Debian mirror"
  command -v debootstrap >/dev/null || {
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null; }
  devbox-build bootstrap-base --tag "$BASE_IMAGE"
}

# Flags OCPF: open the binary (O), run setuid programs such as sudo as their owner (C: Debian's
# own registration lacks it, and sudo then fails under emulation), keep argv[0] (P), load the
# interpreter now, so containers use it without having it (F).
ARM64_HANDLER=/proc/sys/fs/binfmt_misc/qemu-aarch64

provision_emulation() {
  [ "$(uname -m)" = x86_64 ] && [ "$(uname -s)" = Linux ] || return 0
  if [ -e "$ARM64_HANDLER" ]; then
    grep -q '^flags:.*C' "$ARM64_HANDLER" \
      || log "emulation: the registered qemu-aarch64 handler lacks flag C: sudo fails in arm64 containers"
    return 0
  fi
  if [ "$(id -u)" != 0 ]; then
    log "emulation: not root, so no arm64 handler is registered; arm64 builds are refused"; return 0
  fi
  [ -x /usr/libexec/qemu-binfmt/aarch64-binfmt-P ] || {
    log "emulation: installing qemu-user-static"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq qemu-user-static >/dev/null; }
  mountpoint -q /proc/sys/fs/binfmt_misc || mount -t binfmt_misc binfmt_misc /proc/sys/fs/binfmt_misc
  sed 's/:[A-Z]*$/:OCPF/' /usr/lib/binfmt.d/qemu-aarch64.conf > /proc/sys/fs/binfmt_misc/register
  log "emulation: registered Debian's qemu-aarch64 handler with this machine's kernel (binfmt_misc, flags OCPF): arm64 programs and containers now run here under QEMU. It stays until reboot; remove it with: echo -1 > $ARM64_HANDLER"
}

provision_arm64_base() {
  # Says whether it exists or was made (from the Debian mirror, under emulation: about a minute).
  [ -e "$ARM64_HANDLER" ] || return 0
  devbox-build bootstrap-base --tag "$BASE_IMAGE" --platform linux/arm64 --if-missing
}

provision_ca_certificates() {
  # Nothing to export: devbox-build itself trusts this host's extra CAs (the same files a plain
  # shell's build finds), so the scripts and the README's commands agree on every content hash.
  if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    log "ca: builds will trust this host's extra CA certificates (/usr/local/share/ca-certificates)"
  fi
}

provision_devcontainer_cli() {
  local bin="$STATE/node/node_modules/.bin"
  if [ ! -x "$bin/devcontainer" ] && ! command -v devcontainer >/dev/null; then
    command -v npm >/dev/null || {
      log "devcontainer: installing npm"
      apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq npm >/dev/null; }
    log "devcontainer: installing @devcontainers/cli into .devbox/node"
    npm install --silent --no-fund --no-audit --prefix "$STATE/node" @devcontainers/cli >/dev/null
  fi
  [ -x "$bin/devcontainer" ] && export PATH="$bin:$PATH"
  if ! command -v docker-compose >/dev/null && ! docker compose version >/dev/null 2>&1; then
    log "compose: installing docker-compose (dev containers with services need it)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-compose >/dev/null
  fi
}

provision_hub_proxy() {
  [ -x "$STATE/node/node_modules/.bin/configurable-http-proxy" ] && return 0
  log "hub: installing configurable-http-proxy into .devbox/node (the hub tests' proxy)"
  npm install --silent --no-fund --no-audit --prefix "$STATE/node" configurable-http-proxy@5 >/dev/null
}

provision_registry() {
  # A real registry (the CNCF distribution registry, Debian's package) that tests start on
  # loopback: pushes by a project's CI, pulls by its dev container.
  command -v docker-registry >/dev/null && return 0
  log "registry: installing docker-registry (the tests run one on 127.0.0.1)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq docker-registry >/dev/null
}

provision_cloud_init() {
  # cloud-init's own `schema` command checks the EC2 user data. Only its package is unpacked
  # into .devbox/cloud-init (not installed: it would run on this machine's next boot).
  [ -d "$STATE/cloud-init/usr/lib/python3/dist-packages/cloudinit" ] && return 0
  log "cloud-init: unpacking Debian's package into .devbox/cloud-init (for its schema check)"
  local scratch
  scratch="$(mktemp -d)"
  (cd "$scratch" && apt-get download -qq cloud-init >/dev/null 2>&1 \
    || { apt-get update -qq && apt-get download -qq cloud-init >/dev/null; }) \
    && dpkg -x "$scratch"/cloud-init_*.deb "$STATE/cloud-init"
  rm -rf "$scratch"
}

provision() {
  provision_python && provision_engine && provision_base_image && provision_emulation \
    && provision_arm64_base && provision_ca_certificates \
    && provision_devcontainer_cli && provision_hub_proxy && provision_registry \
    && provision_cloud_init
}

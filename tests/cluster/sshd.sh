#!/usr/bin/env bash
# A real SSH server on localhost, for the DVC SSH-remote test (tests/test_e2e.py) and for trying one.
#
#   tests/cluster/sshd.sh start    install openssh-server if needed (apt-get, as root), make a host
#                                  key and a client key, start sshd on 127.0.0.1:$HCD_SSHD_PORT
#   tests/cluster/sshd.sh stop
#
# Everything lives in $HCD_SSHD_DIR (default /tmp/hcd-sshd): host key, the client key (id_ed25519)
# and the only authorized_keys this server reads; ~/.ssh is not touched. Listens on 127.0.0.1 only,
# keys only (no passwords).
set -euo pipefail

DIR="${HCD_SSHD_DIR:-/tmp/hcd-sshd}"
PORT="${HCD_SSHD_PORT:-2222}"

install() {
  command -v /usr/sbin/sshd >/dev/null 2>&1 && command -v ssh-keygen >/dev/null && return 0
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null || { echo "sshd.sh: openssh-server is not installed and cannot be installed here" >&2; exit 3; }
  echo "sshd.sh: installing openssh-server (apt-get)" >&2
  DEBIAN_FRONTEND=noninteractive apt-get update -qq >/dev/null
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq openssh-server openssh-client >/dev/null
}

start() {
  install
  mkdir -p "$DIR" /run/sshd
  chmod 700 "$DIR"
  [ -f "$DIR/host_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$DIR/host_ed25519"
  [ -f "$DIR/id_ed25519" ] || ssh-keygen -q -t ed25519 -N "" -f "$DIR/id_ed25519" -C hcd-test
  cp "$DIR/id_ed25519.pub" "$DIR/authorized_keys"
  chmod 600 "$DIR/authorized_keys"
  cat >"$DIR/sshd_config" <<EOF
Port $PORT
ListenAddress 127.0.0.1
HostKey $DIR/host_ed25519
PidFile $DIR/sshd.pid
AuthorizedKeysFile $DIR/authorized_keys
PasswordAuthentication no
KbdInteractiveAuthentication no
PermitRootLogin prohibit-password
StrictModes no
UsePAM no
Subsystem sftp internal-sftp
EOF
  if [ -f "$DIR/sshd.pid" ] && kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null; then
    kill "$(cat "$DIR/sshd.pid")"
    sleep 0.5
  fi
  /usr/sbin/sshd -f "$DIR/sshd_config"
  for _ in $(seq 1 50); do
    if ssh -q -i "$DIR/id_ed25519" -p "$PORT" -o BatchMode=yes -o StrictHostKeyChecking=no -o UserKnownHostsFile=/dev/null "$(id -un)@127.0.0.1" true 2>/dev/null; then
      echo "sshd.sh: up on 127.0.0.1:$PORT (key $DIR/id_ed25519)"
      return 0
    fi
    sleep 0.2
  done
  echo "sshd.sh: sshd did not answer on 127.0.0.1:$PORT" >&2
  exit 1
}

stop() {
  if [ -f "$DIR/sshd.pid" ] && kill -0 "$(cat "$DIR/sshd.pid")" 2>/dev/null; then
    kill "$(cat "$DIR/sshd.pid")"
  fi
  echo "sshd.sh: stopped"
}

case "${1:-}" in
  start) start ;;
  stop) stop ;;
  *) echo "usage: $0 start|stop" >&2; exit 2 ;;
esac

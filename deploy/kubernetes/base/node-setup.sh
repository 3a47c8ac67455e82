#!/bin/sh
# node-setup.sh: point this node's container runtimes at the node-local
# simple-oci-registry.
#
# The DaemonSet runs it as an init container; an administrator can also run it
# by hand on a node (NODE_ROOT=/) or against a scratch directory to see
# what it would write (NODE_ROOT=/tmp/x). It writes three things, all
# idempotently, so running it any number of times leaves the same result:
#
#   $NODE_ROOT/etc/hosts
#       one "<REGISTRY_ALIAS_IP> <REGISTRY_HOST>" line, tagged with a marker
#       comment; an older tagged line (other IP or host name) is replaced.
#   $NODE_ROOT/etc/containerd/certs.d/<host>:<port>/hosts.toml
#       tells containerd (CRI) to talk plain HTTP (or HTTPS with our CA) to the
#       registry. containerd reads this directory only if config_path points at
#       it: containerd 1.x needs, once, in /etc/containerd/config.toml
#           [plugins."io.containerd.grpc.v1.cri".registry]
#             config_path = "/etc/containerd/certs.d"
#       and containerd 2.x (config version 3) the same key under
#           [plugins."io.containerd.cri.v1.images".registry]
#       config.toml is read only at start-up, so that change needs a containerd
#       restart and is left to the node's provisioning; files under certs.d are
#       picked up without a restart. This script only warns when config_path
#       looks missing.
#   $NODE_ROOT/etc/containers/registries.conf.d/50-simple-oci-registry.conf
#       the same for CRI-O, podman, buildah and skopeo (containers-registries.conf).
#
# Settings (environment variables; the DaemonSet fills them from a ConfigMap):
#   NODE_ROOT          where the node's / is mounted; required, so that a stray
#                      run cannot edit the wrong machine: "/" on the node itself
#   REGISTRY_HOST      host name of the registry in image references (registry.local)
#   REGISTRY_PORT      port the registry listens on (5000)
#   REGISTRY_ALIAS_IP  address the host name resolves to on this node (127.0.0.1)
#   REGISTRY_TLS       "true" when the registry serves HTTPS (false)
#   REGISTRY_CA_FILE   with REGISTRY_TLS=true: PEM file of the CA that signed the
#                      registry certificate; copied next to hosts.toml and into
#                      $NODE_ROOT/etc/containers/certs.d/<host>:<port>/
#   SETUP_ETC_HOSTS, SETUP_CONTAINERD, SETUP_CONTAINERS
#                      "false" skips that part (default: all "true")
#
# Only POSIX sh and coreutils are used, so it runs from the registry image
# itself (Debian slim) or from any busybox image.

set -eu

if [ -z "${NODE_ROOT:-}" ]; then
    printf 'node-setup: error: set NODE_ROOT (/ to configure this machine itself)\n' >&2
    exit 2
fi
NODE_ROOT=${NODE_ROOT%/}
REGISTRY_HOST=${REGISTRY_HOST:-registry.local}
REGISTRY_PORT=${REGISTRY_PORT:-5000}
REGISTRY_ALIAS_IP=${REGISTRY_ALIAS_IP:-127.0.0.1}
REGISTRY_TLS=${REGISTRY_TLS:-false}
REGISTRY_CA_FILE=${REGISTRY_CA_FILE:-}
SETUP_ETC_HOSTS=${SETUP_ETC_HOSTS:-true}
SETUP_CONTAINERD=${SETUP_CONTAINERD:-true}
SETUP_CONTAINERS=${SETUP_CONTAINERS:-true}

# Every file this script owns carries this marker, which is how a later run
# recognises (and replaces or removes) what an earlier run wrote.
MARKER="managed by simple-oci-registry node-setup"
CA_NAME="simple-oci-registry-ca.crt"

log() { printf 'node-setup: %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

is_true() {
    case $1 in
        true | TRUE | True | yes | 1) return 0 ;;
        false | FALSE | False | no | 0 | "") return 1 ;;
        *) die "expected true or false, got '$1'" ;;
    esac
}

# Validate everything that ends up inside TOML strings or /etc/hosts, so that
# a typo in the ConfigMap cannot produce a file the runtime refuses to parse.
case $REGISTRY_HOST in
    "" | *[!A-Za-z0-9.-]* | [.-]* | *[.-]) die "REGISTRY_HOST '$REGISTRY_HOST' is not a host name" ;;
esac
case $REGISTRY_PORT in
    "" | *[!0-9]* | 0* | ??????*) die "REGISTRY_PORT '$REGISTRY_PORT' is not a port number" ;;
esac
if [ "$REGISTRY_PORT" -gt 65535 ]; then
    die "REGISTRY_PORT '$REGISTRY_PORT' is out of range"
fi
case $REGISTRY_ALIAS_IP in
    "" | *[!0-9A-Fa-f.:]*) die "REGISTRY_ALIAS_IP '$REGISTRY_ALIAS_IP' is not an IP address" ;;
esac

HOSTPORT="$REGISTRY_HOST:$REGISTRY_PORT"
if is_true "$REGISTRY_TLS"; then
    SCHEME=https
    if [ -n "$REGISTRY_CA_FILE" ] && [ ! -r "$REGISTRY_CA_FILE" ]; then
        die "REGISTRY_CA_FILE '$REGISTRY_CA_FILE' is not readable"
    fi
else
    SCHEME=http
    REGISTRY_CA_FILE=
fi
umask 022

# write_file DEST CONTENT: replace DEST with CONTENT (plus a final newline) by
# writing a temporary file in the same directory and renaming it over DEST, so
# a runtime reading the file never sees half of it. Unchanged files are left
# alone (no mtime churn, no rename on every pod restart).
write_file() {
    if [ -f "$1" ] && [ "$(cat "$1")" = "$2" ]; then
        return 0
    fi
    printf '%s\n' "$2" >"$1.tmp.$$"
    mv -f "$1.tmp.$$" "$1"
    log "wrote $1"
}

# copy_file SRC DEST: like write_file, for the CA certificate.
copy_file() {
    if [ -f "$2" ] && cmp -s "$1" "$2" 2>/dev/null; then
        return 0
    fi
    cp "$1" "$2.tmp.$$"
    mv -f "$2.tmp.$$" "$2"
    log "wrote $2"
}

setup_etc_hosts() {
    hosts="$NODE_ROOT/etc/hosts"
    line="$REGISTRY_ALIAS_IP $REGISTRY_HOST # $MARKER"
    kept=
    if [ -f "$hosts" ]; then
        # Every line but ours; grep exits 1 when nothing is left, which is fine.
        kept=$(grep -v -F -e "$MARKER" "$hosts") || [ $? -eq 1 ] ||
            die "cannot read $hosts"
    fi
    if [ -n "$kept" ]; then
        new="$kept
$line"
    else
        new=$line
    fi
    # A hand-written entry for the same name would shadow or contradict ours.
    if printf '%s\n' "$kept" | grep -v '^[[:space:]]*#' |
        grep -q -E "[[:space:]]$(printf '%s' "$REGISTRY_HOST" | sed 's/\./\\./g')([[:space:]]|\$)"; then
        log "warning: $hosts has another entry for $REGISTRY_HOST; the first one wins"
    fi
    if [ -f "$hosts" ] && [ "$(cat "$hosts")" = "$new" ]; then
        return 0
    fi
    # Rewritten in place, not renamed: in the pod /etc/hosts is a single-file
    # bind mount, which cannot be replaced by rename(2) (EBUSY), and keeping
    # the inode keeps the owner, mode and SELinux label of the node's file.
    printf '%s\n' "$new" >"$hosts"
    log "wrote $hosts ($REGISTRY_ALIAS_IP $REGISTRY_HOST)"
}

setup_containerd() {
    certs_d="$NODE_ROOT/etc/containerd/certs.d"
    dir="$certs_d/$HOSTPORT"
    mkdir -p "$dir"

    ca_line=
    if [ -n "$REGISTRY_CA_FILE" ]; then
        copy_file "$REGISTRY_CA_FILE" "$dir/$CA_NAME"
        # containerd opens the path as written, on the node: no NODE_ROOT here.
        ca_line="
  ca = \"/etc/containerd/certs.d/$HOSTPORT/$CA_NAME\""
    else
        rm -f "$dir/$CA_NAME"
    fi
    write_file "$dir/hosts.toml" "# $MARKER; rewritten on every pod start, do not edit.
server = \"$SCHEME://$HOSTPORT\"

[host.\"$SCHEME://$HOSTPORT\"]
  capabilities = [\"pull\", \"resolve\"]$ca_line"

    # Drop what an earlier run wrote for another host name or port.
    for old in "$certs_d"/*/hosts.toml; do
        [ -f "$old" ] || continue
        old_dir=${old%/hosts.toml}
        [ "$old_dir" != "$dir" ] || continue
        grep -q -F -e "$MARKER" "$old" || continue
        rm -f "$old" "$old_dir/$CA_NAME"
        rmdir "$old_dir" 2>/dev/null || true
        log "removed stale $old"
    done

    config="$NODE_ROOT/etc/containerd/config.toml"
    if [ -f "$config" ] && ! grep -q '^[[:space:]]*config_path[[:space:]]*=' "$config"; then
        log "warning: $config does not set config_path; unless this containerd's" \
            "default includes /etc/containerd/certs.d (see 'containerd config dump')," \
            "set it in the CRI registry section and restart containerd once"
    fi
}

setup_containers() {
    dropin_dir="$NODE_ROOT/etc/containers/registries.conf.d"
    mkdir -p "$dropin_dir"
    if [ "$SCHEME" = https ]; then
        insecure=false
    else
        # "insecure" lets containers/image use plain HTTP (and skip TLS
        # verification) for this one registry.
        insecure=true
    fi
    write_file "$dropin_dir/50-simple-oci-registry.conf" "# $MARKER; rewritten on every pod start, do not edit.
[[registry]]
location = \"$HOSTPORT\"
insecure = $insecure"

    if [ -n "$REGISTRY_CA_FILE" ]; then
        # containers-certs.d(5): every *.crt in this directory is a trusted CA.
        certs_dir="$NODE_ROOT/etc/containers/certs.d/$HOSTPORT"
        mkdir -p "$certs_dir"
        copy_file "$REGISTRY_CA_FILE" "$certs_dir/$CA_NAME"
    fi
}

if is_true "$SETUP_ETC_HOSTS"; then setup_etc_hosts; fi
if is_true "$SETUP_CONTAINERD"; then setup_containerd; fi
if is_true "$SETUP_CONTAINERS"; then setup_containers; fi
log "node configured for $SCHEME://$HOSTPORT -> $REGISTRY_ALIAS_IP"

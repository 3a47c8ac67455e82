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
# With MIRROR_REGISTRIES set (mirror mode: upstream names such as
# docker.io/library/nginx served from DIR/docker.io/library/nginx/...), also:
#
#   $NODE_ROOT/etc/containerd/certs.d/<upstream>/hosts.toml
#       one per upstream registry: containerd asks the node-local registry
#       first (it adds ?ns=<upstream> to each request) and, with
#       MIRROR_FALLBACK=true, the upstream after it; with MIRROR_FALLBACK=false
#       the node-local registry is the only server (air-gapped).
#   $NODE_ROOT/etc/containers/registries.conf.d/50-simple-oci-registry-mirrors.conf
#       a [[registry]] per upstream whose [[registry.mirror]] (fallback) or
#       location (air-gapped) is <REGISTRY_HOST>:<REGISTRY_PORT>/<upstream folder>.
#
# And, only when asked (SETUP_CONTAINERD_CONFIG_PATH=true), it sets
# config_path = "/etc/containerd/certs.d" in $NODE_ROOT/etc/containerd/config.toml
# (1.x "version = 2" and 2.x "version = 3" layouts), keeping the rest of the
# file and a one-time copy of the original beside it; containerd must then be
# restarted, which the script says but does not do.
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
#   MIRROR_REGISTRIES  upstream registries to serve from the image directory,
#                      space-separated host[:port] (e.g. "docker.io registry.k8s.io
#                      quay.io"); empty (the default) writes no mirror configuration
#                      and removes an earlier run's
#   MIRROR_FALLBACK    "true": the upstream stays the fallback (online sites);
#                      "false": only the node-local registry (air-gapped) (true)
#   SETUP_ETC_HOSTS, SETUP_CONTAINERD, SETUP_CONTAINERS
#                      "false" skips that part (default: all "true")
#   SETUP_CONTAINERD_CONFIG_PATH
#                      "true" sets config_path in containerd's config.toml (false);
#                      needs that file mounted (NODE_ROOT=/ on the node itself)
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
MIRROR_REGISTRIES=${MIRROR_REGISTRIES:-}
MIRROR_FALLBACK=${MIRROR_FALLBACK:-true}
SETUP_CONTAINERD_CONFIG_PATH=${SETUP_CONTAINERD_CONFIG_PATH:-false}

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

# Mirror hosts end up in directory names, TOML strings and image locations:
# host[:port] by the reference grammar, nothing else.
# Each entry is lower-cased (host names are case-insensitive) and Docker Hub's
# aliases become docker.io, the name containerd and containers/image normalise
# references to; repeats are dropped.
MIRRORS=
for upstream in $MIRROR_REGISTRIES; do
    case $upstream in
        *[!A-Za-z0-9.:-]* | [.:-]* | *[.:-] | *:*:* | *.:* | *-:* | *:[!0-9]* | *:0* | *:??????*)
            die "MIRROR_REGISTRIES entry '$upstream' is not a registry host[:port]" ;;
    esac
    upstream=$(printf '%s' "$upstream" | tr '[:upper:]' '[:lower:]')
    case $upstream in
        index.docker.io | registry-1.docker.io) upstream=docker.io ;;
    esac
    if [ "$upstream" = "$(printf '%s' "$REGISTRY_HOST:$REGISTRY_PORT" | tr '[:upper:]' '[:lower:]')" ]; then
        die "MIRROR_REGISTRIES must not name the registry itself ($upstream)"
    fi
    case " $MIRRORS " in
        *" $upstream "*) ;;
        *) MIRRORS="${MIRRORS:+$MIRRORS }$upstream" ;;
    esac
done
is_true "$MIRROR_FALLBACK" || true  # validated here, before anything is written
is_true "$SETUP_CONTAINERD_CONFIG_PATH" || true

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

# The image directory's folder for an upstream host (already lower-cased, its
# aliases folded): the host, or "host_port" with a port, since ":" cannot be
# part of a repository name -- the rule of the registry's mirror.py.
mirror_folder() {
    case $1 in
        *:*) printf '%s_%s' "${1%%:*}" "${1##*:}" ;;
        *) printf '%s' "$1" ;;
    esac
}

# The upstream's own endpoint, for the fallback: Docker Hub answers on
# registry-1.docker.io, every other registry on its own name.
upstream_url() {
    case $1 in
        docker.io) printf 'https://registry-1.docker.io' ;;
        *) printf 'https://%s' "$1" ;;
    esac
}

# write_mirror_hosts_toml CERTS_D UPSTREAM: containerd's hosts.toml for one
# upstream. containerd tries the [host] tables in order, then "server"; a
# request to a host other than the upstream carries ?ns=<upstream>, which is
# how the registry knows which host folder to answer from.
write_mirror_hosts_toml() {
    mirror_dir="$1/$2"
    mkdir -p "$mirror_dir"
    mirror_ca=
    if [ -n "$REGISTRY_CA_FILE" ]; then
        mirror_ca="
  ca = \"/etc/containerd/certs.d/$HOSTPORT/$CA_NAME\""
    fi
    if is_true "$MIRROR_FALLBACK"; then
        content="# $MARKER; rewritten on every pod start, do not edit.
# Mirror of $2: the node-local registry first, then $2 itself.
server = \"$(upstream_url "$2")\"

[host.\"$SCHEME://$HOSTPORT\"]
  capabilities = [\"pull\", \"resolve\"]$mirror_ca"
    else
        # Air-gapped: the node-local registry is the server too, so nothing
        # is ever sent upstream (a missing image fails instead of leaking
        # out). The [host] table stays: containerd 1.6 refuses a hosts.toml
        # without one ("invalid host tree") and then goes upstream.
        content="# $MARKER; rewritten on every pod start, do not edit.
# Mirror of $2: only the node-local registry (MIRROR_FALLBACK=false).
server = \"$SCHEME://$HOSTPORT\"

[host.\"$SCHEME://$HOSTPORT\"]
  capabilities = [\"pull\", \"resolve\"]$mirror_ca"
    fi
    write_file "$mirror_dir/hosts.toml" "$content"
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

    # A hosts.toml someone else wrote for an upstream is theirs: refuse, before
    # writing anything, rather than replace it.
    for upstream in $MIRRORS; do
        theirs="$certs_d/$upstream/hosts.toml"
        if [ -f "$theirs" ] && ! grep -q -F -e "$MARKER" "$theirs"; then
            die "$theirs was not written by node-setup; merge it by hand or drop $upstream from MIRROR_REGISTRIES"
        fi
    done
    wanted=" $dir "
    for upstream in $MIRRORS; do
        write_mirror_hosts_toml "$certs_d" "$upstream"
        wanted="$wanted$certs_d/$upstream "
    done

    # Drop what an earlier run wrote for another host name, port or upstream.
    for old in "$certs_d"/*/hosts.toml; do
        [ -f "$old" ] || continue
        old_dir=${old%/hosts.toml}
        case $wanted in *" $old_dir "*) continue ;; esac
        grep -q -F -e "$MARKER" "$old" || continue
        rm -f "$old" "$old_dir/$CA_NAME"
        rmdir "$old_dir" 2>/dev/null || true
        log "removed stale $old"
    done

    config="$NODE_ROOT/etc/containerd/config.toml"
    # An empty value (config_path = "", as 1.x's 'config default' writes) is
    # as good as none.
    if ! is_true "$SETUP_CONTAINERD_CONFIG_PATH" && [ -f "$config" ] &&
        ! grep -q -E "^[[:space:]]*config_path[[:space:]]*=[[:space:]]*[\"'][^\"']" "$config"; then
        log "warning: $config does not set config_path; unless this containerd's" \
            "default includes /etc/containerd/certs.d (see 'containerd config dump')," \
            "set it in the CRI registry section and restart containerd once"
    fi
}

# setup_containerd_config_path: make containerd's CRI plugin read certs.d.
# config.toml is edited as text, not re-serialised, so comments, order and
# every other setting stay as the operator wrote them: awk finds the CRI
# registry table of the file's layout and sets config_path there (replacing
# an empty value, inserting the key after the table header, or appending the
# table), and refuses what it must not decide for the operator.
setup_containerd_config_path() {
    config="$NODE_ROOT/etc/containerd/config.toml"
    want=/etc/containerd/certs.d
    [ -f "$config" ] ||
        die "$config not found: create it (containerd config default) or leave SETUP_CONTAINERD_CONFIG_PATH=false"
    version=$(sed -n 's/^[[:space:]]*version[[:space:]]*=[[:space:]]*\([0-9][0-9]*\).*/\1/p' "$config" | head -n 1)
    case $version in
        2) table='plugins."io.containerd.grpc.v1.cri".registry' ;;  # containerd 1.x
        3) table='plugins."io.containerd.cri.v1.images".registry' ;;  # containerd 2.x
        *) die "$config has no 'version = 2' (containerd 1.x) or 'version = 3' (2.x) line; set config_path by hand (docs/operations.md)" ;;
    esac
    # config_path together with inline mirrors is a start-up error in
    # containerd (internal/cri/config/config.go): move them to hosts.toml first.
    if grep -q -E '^[[:space:]]*\[[^]]*registry\.mirrors\.' "$config"; then
        die "$config has [...registry.mirrors.<host>] tables, which containerd refuses beside config_path; move them to hosts.toml files first"
    fi
    # Table headers are compared without quotes and spaces, so the double
    # quotes of 1.x's 'config default' and the single quotes of 2.x's match.
    new=$(awk -v table="$table" -v want="$want" '
        function norm(h) { gsub(/[ \t"\047]/, "", h); return h }
        BEGIN { target = norm("[" table "]") }
        /^[ \t]*\[/ {
            if (inside && !done) { print "  config_path = \"" want "\""; done = 1; changed = 1 }
            inside = (norm($0) == target); if (inside) found = 1
            print; next
        }
        inside && /^[ \t]*config_path[ \t]*=/ {
            value = $0; sub(/^[^=]*=[ \t]*/, "", value); sub(/[ \t]*(#.*)?$/, "", value)
            if (value == "\"\"" || value == "\047\047") {
                sub(/=.*/, "= \"" want "\""); changed = 1
            } else if (index(value, want) == 0) {
                print "config_path is already " value > "/dev/stderr"; bad = 1; exit
            }
            done = 1; print; next
        }
        { print }
        END {
            if (bad) exit 3
            if (inside && !done) { print "  config_path = \"" want "\""; changed = 1 }
            else if (!found) { print ""; print "[" table "]"; print "  config_path = \"" want "\""; changed = 1 }
            exit changed ? 0 : 4
        }' "$config") && status=0 || status=$?
    case $status in
        0) ;;
        4) return 0 ;;  # already set: nothing to do, nothing to restart
        3) die "$config sets config_path to another directory; add $want to it by hand (2.x accepts a list separated by ':')" ;;
        *) die "cannot edit $config" ;;
    esac
    if [ ! -e "$config.before-simple-oci-registry" ]; then
        cp -p "$config" "$config.before-simple-oci-registry"
    fi
    # Written beside it and renamed over it; cp -p first keeps owner and mode.
    cp -p "$config" "$config.tmp.$$"
    printf '%s\n' "$new" >"$config.tmp.$$"
    mv -f "$config.tmp.$$" "$config"
    log "wrote $config: config_path = \"$want\" under [$table]"
    log "containerd reads config.toml only at start: restart it now (systemctl restart containerd)"
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

    mirrors="$dropin_dir/50-simple-oci-registry-mirrors.conf"
    if [ -n "$MIRRORS" ]; then
        content="# $MARKER; rewritten on every pod start, do not edit."
        for upstream in $MIRRORS; do
            location="$HOSTPORT/$(mirror_folder "$upstream")"
            # containers-registries.conf(5): the prefix is replaced by the
            # location, so docker.io/library/nginx is asked for as
            # /v2/docker.io/library/nginx/... -- the registry's path form.
            if is_true "$MIRROR_FALLBACK"; then
                content="$content

[[registry]]
prefix = \"$upstream\"
location = \"$upstream\"

[[registry.mirror]]
location = \"$location\"
insecure = $insecure"
            else
                # No mirror table: the upstream is replaced, never contacted.
                content="$content

[[registry]]
prefix = \"$upstream\"
location = \"$location\"
insecure = $insecure"
            fi
        done
        write_file "$mirrors" "$content"
    elif [ -f "$mirrors" ] && grep -q -F -e "$MARKER" "$mirrors"; then
        rm -f "$mirrors"
        log "removed $mirrors (MIRROR_REGISTRIES is empty)"
    fi

    if [ -n "$REGISTRY_CA_FILE" ]; then
        # containers-certs.d(5): every *.crt in this directory is a trusted CA.
        certs_dir="$NODE_ROOT/etc/containers/certs.d/$HOSTPORT"
        mkdir -p "$certs_dir"
        copy_file "$REGISTRY_CA_FILE" "$certs_dir/$CA_NAME"
    fi
}

if is_true "$SETUP_ETC_HOSTS"; then setup_etc_hosts; fi
if is_true "$SETUP_CONTAINERD"; then setup_containerd; fi
if is_true "$SETUP_CONTAINERD_CONFIG_PATH"; then setup_containerd_config_path; fi
if is_true "$SETUP_CONTAINERS"; then setup_containers; fi
log "node configured for $SCHEME://$HOSTPORT -> $REGISTRY_ALIAS_IP"

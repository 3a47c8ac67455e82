#!/usr/bin/env bash
# Install the Debian packages the tests, the demo and the benchmark drive: real registry
# clients (skopeo, podman, buildah, containerd/ctr, umoci), mmdebstrap for the image's offline base
# (make image), a static busybox for runnable demo
# images, the reference servers of the benchmark (nginx, CNCF distribution), wrk, and Chromium
# for the catalog page test, and FUSE (fusermount3, libfuse3) for the slow-storage passthrough
# of tests/test_latencyfs.py and the benchmark. Only missing packages are installed; services
# are not started.
set -euo pipefail

packages=(skopeo umoci busybox-static podman buildah runc containerd uidmap mmdebstrap
          golang-github-containers-common nginx-light docker-registry wrk apache2-utils zstd
          chromium ca-certificates curl fuse3 libfuse3-3)

# promtool, for the alert rules of deploy/kubernetes/components/monitoring (tests/test_monitoring.py).
packages+=(prometheus)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]} == 0)); then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "missing Debian packages: ${missing[*]}" >&2
  echo "run as root, or: sudo apt-get install -y ${missing[*]}" >&2
  exit 1
fi
# Packages such as nginx and containerd would start a service on install; policy-rc.d stops it.
if [ ! -e /usr/sbin/policy-rc.d ]; then
  printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
  chmod +x /usr/sbin/policy-rc.d
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -q
apt-get install -y -q --no-install-recommends "${missing[@]}"

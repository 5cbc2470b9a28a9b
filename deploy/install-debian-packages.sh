#!/bin/sh
# Install the Debian packages in deploy/debian-packages.txt (or those named) that are missing; a no-op when all
# are there. Needs root, as apt does; otherwise it says which command to run.
set -eu
here=$(dirname "$0")
if [ "$#" -eq 0 ]; then
    set -- $(grep -v '^#' "$here/debian-packages.txt")
fi
missing=""
for package in "$@"; do
    dpkg-query -W -f='${Status}' "$package" 2>/dev/null | grep -q "install ok installed" || missing="$missing $package"
done
[ -z "$missing" ] && exit 0
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
    echo "missing Debian packages:$missing; as root: apt-get update && apt-get install -y$missing" >&2
    exit 1
fi
echo "installing Debian packages:$missing"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends $missing >/dev/null

#!/usr/bin/env bash
# Install the Debian packages SMIG needs. Idempotent: does nothing when all are present.
set -euo pipefail

PACKAGES=(
    qemu-system-x86   # the hypervisor
    qemu-utils        # qemu-img, for guest disks
    busybox-static    # the guest's userland
    iproute2          # network namespaces for the lab
    gcc libc6-dev     # compiles the guest's static workload program and the lab's attack library
    b3sum             # the baseline AIM's hashing speed is benchmarked against
    debootstrap       # builds the nested Xen hosts' dom0 root disk (Xen 4.17 from Debian's main archive)
    e2fsprogs         # mkfs.ext4 -d writes that disk without a loop mount
)

SUDO=""
if [ "$(id -u)" != 0 ]; then SUDO=sudo; fi

missing=()
for p in "${PACKAGES[@]}"; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing+=("$p")
    fi
done

# The guest image needs apt's package lists to find Debian's cloud kernel.
if [ "${#missing[@]}" -gt 0 ] || ! apt-cache policy linux-image-cloud-amd64 2>/dev/null | grep -q 'Candidate: [0-9]'; then
    echo "setup: apt-get update" >&2
    $SUDO apt-get update -q
fi
if [ "${#missing[@]}" -gt 0 ]; then
    echo "setup: installing ${missing[*]}" >&2
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -q --no-install-recommends "${missing[@]}"
fi

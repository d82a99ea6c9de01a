#!/usr/bin/env bash
# Mesa's lavapipe (software Vulkan on the CPU) for ManiSkill/SAPIEN, unpacked into .vendor/lavapipe (git-ignored).
#
# SAPIEN 3 needs a Vulkan device even for state-only simulation (its URDF loader creates render materials). Debian 12's
# own lavapipe (Mesa 22.3) lacks descriptorBindingPartiallyBound and SAPIEN rejects it; Mesa 25 from the
# bookworm-backports suite works. The .deb is fetched with apt-get through a private sources list and private apt
# folders (the system's apt configuration is not touched, no root needed), unpacked with dpkg-deb -x, and named by a
# one-entry ICD json whose library path is relative to the json, so the folder can move with the checkout.
# step_envs/maniskill.py points VK_ICD_FILENAMES at that json when the variable is unset. The Vulkan loader itself is
# the one bundled in the sapien wheel, and every library lavapipe links against is already on Debian 12 (ldd).
#
# Idempotent: does nothing when the ICD json and the driver are already there. Usage: bash scripts/fetch_lavapipe.sh
set -euo pipefail
cd "$(dirname "$0")/.."

DEST=.vendor/lavapipe
SUITE=${LAVAPIPE_SUITE:-bookworm-backports}
MIRROR=${LAVAPIPE_MIRROR:-http://deb.debian.org/debian}
DRIVER=usr/lib/x86_64-linux-gnu/libvulkan_lvp.so

if [ -f "$DEST/lvp_icd.json" ] && [ -f "$DEST/root/$DRIVER" ]; then
  echo "lavapipe already in $DEST"
  exit 0
fi
if ! command -v apt-get >/dev/null || ! command -v dpkg-deb >/dev/null; then
  echo "fetch_lavapipe: apt-get/dpkg-deb not found (not Debian?). Install a Vulkan driver that SAPIEN accepts (Mesa >= 23" \
       "lavapipe or a GPU driver) and set VK_ICD_FILENAMES to its ICD json." >&2
  exit 1
fi

WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
mkdir -p "$WORK/lists/partial" "$WORK/cache/archives/partial" "$WORK/debs"
KEYRING=/usr/share/keyrings/debian-archive-keyring.gpg
echo "deb [signed-by=$KEYRING] $MIRROR $SUITE main" > "$WORK/sources.list"
APT=(-o "Dir::Etc::SourceList=$WORK/sources.list" -o Dir::Etc::SourceParts=/nonexistent
     -o "Dir::State::Lists=$WORK/lists" -o "Dir::Cache=$WORK/cache" -o Debug::NoLocking=1 -o APT::Sandbox::User=root -q)
apt-get "${APT[@]}" update >/dev/null
(cd "$WORK/debs" && apt-get "${APT[@]}" download "mesa-vulkan-drivers/$SUITE" >/dev/null)

rm -rf "$DEST.tmp" && mkdir -p "$DEST.tmp/root"
for deb in "$WORK"/debs/*.deb; do dpkg-deb -x "$deb" "$DEST.tmp/root"; done
[ -f "$DEST.tmp/root/$DRIVER" ] || { echo "fetch_lavapipe: $DRIVER not in the package" >&2; exit 1; }
API=$(grep -o '"api_version": *"[^"]*"' "$DEST.tmp/root/usr/share/vulkan/icd.d/lvp_icd.json" | grep -o '[0-9][0-9.]*')
# Only lavapipe is needed: drop the GPU drivers and layers of the package (about 45 MB).
find "$DEST.tmp/root/usr/lib" -name 'libvulkan_*.so' ! -name libvulkan_lvp.so -delete
find "$DEST.tmp/root/usr/lib" -name 'libVkLayer_*.so' -delete
rm -rf "$DEST.tmp/root/usr/share/vulkan"
if missing=$(ldd "$DEST.tmp/root/$DRIVER" | grep 'not found'); then
  echo "fetch_lavapipe: libvulkan_lvp.so needs libraries this system lacks:" >&2; echo "$missing" >&2; exit 1
fi
VERSION=$(dpkg-deb -f "$WORK"/debs/mesa-vulkan-drivers_*.deb Version)
cat > "$DEST.tmp/lvp_icd.json" <<EOF
{"file_format_version": "1.0.1", "ICD": {"library_path": "./root/$DRIVER", "api_version": "$API"}}
EOF
echo "$VERSION" > "$DEST.tmp/VERSION"
rm -rf "$DEST" && mv "$DEST.tmp" "$DEST"
echo "lavapipe (mesa-vulkan-drivers $VERSION from $SUITE) in $DEST ($(du -sh "$DEST" | cut -f1))"

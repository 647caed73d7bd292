#!/usr/bin/env bash
# Install vhdtool on Debian/Ubuntu: system packages (apt), then the package and its
# test tools into ./.venv. Safe to run again. Also unpacks the demo image, afresh each time
# (the README's first command stages into it).
set -euo pipefail
cd "$(dirname "$0")"

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Libraries vhdtool loads (libntfs-3g, libhivex, libmspack, libext2fs) and the real tools the
# tests build images with and judge results by; Wine (64-bit) and mingw-w64 run the boot-time
# install.cmd with stub installers in tests/test_stage_script.py; a static busybox is the
# guest's /bin/sh when tests/test_linux_stage_script.py runs install.sh in a chroot; systemd's
# systemctl --root judges unit states and makes the links the staged script's `systemctl enable`
# asks for in tests/test_linux_stage.py (nothing of systemd is started).
PACKAGES=(
  python3 python3-venv python3-pip
  ntfs-3g libhivex0 libhivex-bin libmspack0 libext2fs2 libcom-err2
  qemu-utils gcab genisoimage osslsigncode openssl e2fsprogs fdisk gdisk dosfstools xz-utils bzip2
  xfsprogs btrfs-progs lvm2 strace
  wine wine64 gcc-mingw-w64-x86-64 busybox-static systemd
  # The fleet test runs a batch as a Slurm job array on a private one-node cluster
  # (tests/slurm.py starts its own munged, slurmctld and slurmd; the system ones are not used).
  slurm-wlm munge
  # tests/test_report_html.py renders the `vhdtool report --html` page in headless chromium.
  chromium
)
missing=()
for p in "${PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e '.[test]'

for xz in demo/*.vhdx.xz; do
  [ -e "$xz" ] || continue
  out="${xz%.xz}"
  xz -dkc "$xz" > "$out.tmp" && mv "$out.tmp" "$out"
done
echo "vhdtool installed: .venv/bin/vhdtool" >&2

#!/usr/bin/env bash
# Install vhdtool on Debian/Ubuntu. Safe to run again.
#
#   ./install.sh          what vhdtool needs at run time (apt), vhdtool into ./.venv without its
#                         test extras, and the demo image, unpacked afresh each time (the README's
#                         first command stages into it)
#   ./install.sh --test   also the tools the tests build and judge images with (apt) and the
#                         test extras, '.[test]'
set -euo pipefail
cd "$(dirname "$0")"

with_tests=0
if [ "$#" -gt 1 ]; then
  echo "install.sh: unexpected argument '$2'; run ./install.sh or ./install.sh --test" >&2; exit 2
fi
case "${1-}" in
  "") ;;
  --test) with_tests=1 ;;
  -h|--help) sed -n '2,8s/^# \{0,1\}//p' "$0"; exit 0 ;;
  *) echo "install.sh: unknown option '$1'; run ./install.sh or ./install.sh --test" >&2; exit 2 ;;
esac

SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi

# Run time: Python with venv; the libraries vhdtool loads (vhdtool/native/libraries.py names them
# with their packages, and `vhdtool doctor` checks them: libntfs-3g, libhivex, libmspack,
# libext2fs and libcom_err); xz to unpack the demo image.
RUNTIME_PACKAGES=(
  python3 python3-venv
  libntfs-3g89 libhivex0 libmspack0 libext2fs2 libcom-err2
  xz-utils
)

# Tests only: the real tools the tests build images with and judge results by.
TEST_PACKAGES=(
  # images and volumes: qemu-img/qemu-io, partition tables, filesystems, LVM; ntfs-3g's tools
  # (mkntfs, ntfscat, ntfsls, the FUSE mount the NTFS fixtures are built through); hivexsh/hivexget
  qemu-utils fdisk gdisk dosfstools e2fsprogs xfsprogs btrfs-progs lvm2 ntfs-3g libhivex-bin
  # cabs, ISOs and signed catalogs; compressed fixtures; a fresh clone (tests/test_install.py)
  gcab genisoimage osslsigncode openssl bzip2 git
  # crash tests: strace fault injection kills the writer at each write and flush
  strace
  # Wine (64-bit) and mingw-w64 run the boot-time install.cmd with stub installers in
  # tests/test_stage_script.py
  wine wine64 gcc-mingw-w64-x86-64
  # a static busybox is the guest's /bin/sh when tests/test_linux_stage_script.py runs the Linux
  # install script in a chroot; systemd's systemctl --root judges unit states and makes the links the
  # staged script's `systemctl enable` asks for in tests/test_linux_stage.py (nothing is started)
  busybox-static systemd
  # the fleet test runs a batch as a Slurm job array on a private one-node cluster
  # (tests/slurm.py starts its own munged, slurmctld and slurmd; the system ones are not used)
  slurm-wlm munge
  # tests/test_report_html.py renders the `vhdtool report --html` page in headless chromium
  chromium
)

packages=("${RUNTIME_PACKAGES[@]}")
if [ "$with_tests" -eq 1 ]; then packages+=("${TEST_PACKAGES[@]}"); fi

missing=()
for p in "${packages[@]}"; do
  # Debian 13 and Ubuntu 24.04 renamed the libraries for 64-bit time_t (libext2fs2 -> libext2fs2t64);
  # the new package provides the old name, so apt takes the old one, and an installed t64 counts here.
  for name in "$p" "${p}t64"; do
    if dpkg-query -W -f='${Status}' "$name" 2>/dev/null | grep -q "install ok installed"; then continue 2; fi
  done
  missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  $SUDO apt-get update -qq
  $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
target="."
if [ "$with_tests" -eq 1 ]; then target=".[test]"; fi
.venv/bin/python -m pip install -q --disable-pip-version-check -e "$target"

for xz in demo/*.vhdx.xz; do
  [ -e "$xz" ] || continue
  out="${xz%.xz}"
  xz -dkc "$xz" > "$out.tmp" && mv "$out.tmp" "$out"
done
echo "vhdtool installed: .venv/bin/vhdtool (check its system libraries with .venv/bin/vhdtool doctor)" >&2

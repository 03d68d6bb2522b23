#!/usr/bin/env bash
# Build the default pyvmm guest: a small Linux 6.1 kernel (Debian's
# linux-source-6.1, tinyconfig + kernel.config + patches/) and an
# uncompressed busybox initramfs.  The result is cached outside the repository
# in $PYVMM_CACHE (default ~/.cache/pyvmm) under a hash of every input, and
# $PYVMM_CACHE/guest points at the current build.  Rebuilt from scratch when
# the cache has no entry for the hash.
#
# Needs: linux-source-6.1 busybox-static flex bison bc libelf-dev libssl-dev cpio
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${PYVMM_CACHE:-$HOME/.cache/pyvmm}
src_tar=/usr/src/linux-source-6.1.tar.xz
busybox=$(command -v busybox || echo /bin/busybox)

for f in "$src_tar" "$busybox"; do
    [ -e "$f" ] || { echo "guests/build.sh: missing $f (run 'make setup')" >&2; exit 1; }
done
file "$busybox" 2>/dev/null | grep -q "statically linked" || \
    ldd "$busybox" 2>&1 | grep -q "not a dynamic" || {
    echo "guests/build.sh: $busybox is not static (install busybox-static)" >&2; exit 1; }

key=$( {
    cd "$here"
    sha256sum build.sh kernel.config patches/*.patch $(find initramfs -type f | sort)
    dpkg-query -W -f='${Version}\n' linux-source-6.1 busybox-static 2>/dev/null || true
    sha256sum "$busybox" | cut -d' ' -f1
} | sha256sum | cut -c1-16)
out=$cache/guest-$key

if [ -s "$out/vmlinux" ] && [ -s "$out/bzImage" ] && [ -s "$out/initramfs.cpio" ]; then
    ln -sfn "guest-$key" "$cache/guest"
    echo "guest: cached $out"
    exit 0
fi

work=$(mktemp -d "${TMPDIR:-/tmp}/pyvmm-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT
echo "guest: building kernel in $work (a few minutes)"
tar -C "$work" -xf "$src_tar"
ksrc=$work/linux-source-6.1
for p in "$here"/patches/*.patch; do
    patch -s -d "$ksrc" -p1 < "$p"
done
make -s -C "$ksrc" tinyconfig >/dev/null
"$ksrc/scripts/kconfig/merge_config.sh" -m -O "$ksrc" "$ksrc/.config" "$here/kernel.config" >/dev/null
make -s -C "$ksrc" olddefconfig >/dev/null
# Every option of the fragment must have survived olddefconfig's dependency pass.
bad=0
while IFS= read -r line; do
    case "$line" in
        CONFIG_*=*) grep -qxF "$line" "$ksrc/.config" || { echo "guest: $line did not take" >&2; bad=1; } ;;
        "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}
            ! grep -q "^$opt=" "$ksrc/.config" || { echo "guest: $opt still set" >&2; bad=1; } ;;
    esac
done < "$here/kernel.config"
[ $bad = 0 ] || exit 1
make -s -C "$ksrc" -j"$(nproc)" vmlinux bzImage

echo "guest: building initramfs"
root=$work/root
mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,root,mnt}
cp "$busybox" "$root/bin/busybox"
for app in sh mount umount echo cat ls poweroff reboot halt init sleep mkdir dmesg \
           ip ping grep dd sync uname head tail wc true false md5sum hexdump stat; do
    ln -s busybox "$root/bin/$app"
done
ln -s ../bin/busybox "$root/sbin/init"
cp -r "$here"/initramfs/. "$root/"
chmod 755 "$root/init" "$root/etc/rc"
mknod -m 600 "$root/dev/console" c 5 1 2>/dev/null || true
(cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) > "$work/initramfs.cpio"

mkdir -p "$out.tmp"
cp "$ksrc/vmlinux" "$ksrc/arch/x86/boot/bzImage" "$ksrc/.config" "$work/initramfs.cpio" "$out.tmp/"
rm -rf "$out"; mv "$out.tmp" "$out"
ln -sfn "guest-$key" "$cache/guest"
ls -l "$out"

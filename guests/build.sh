#!/usr/bin/env bash
# Build the default pyvmm guest: a small Linux 6.1 kernel (Debian's
# linux-source-6.1, tinyconfig + kernel.config + patches/) and an
# uncompressed busybox initramfs (initramfs/ + src/).
#
# Both are cached outside the repository in $PYVMM_CACHE (default
# ~/.cache/pyvmm), each under a hash of its own inputs, so changing the init
# script does not rebuild the kernel; $PYVMM_CACHE/guest points at the
# current pair.  Anything missing from the cache is rebuilt from scratch.
#
# Needs: linux-source-6.1 busybox-static flex bison bc libelf-dev libssl-dev cpio lz4 gcc
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cache=${PYVMM_CACHE:-$HOME/.cache/pyvmm}
src_tar=/usr/src/linux-source-6.1.tar.xz
busybox=$(command -v busybox || echo /bin/busybox)
KERNEL_RECIPE=2     # bump when the kernel build steps below change
INITRAMFS_RECIPE=2  # bump when the initramfs build steps below change

for f in "$src_tar" "$busybox"; do
    [ -e "$f" ] || { echo "guests/build.sh: missing $f (run 'make setup')" >&2; exit 1; }
done
case "$(ldd "$busybox" 2>&1 || true)" in
    *"not a dynamic"*|*"statically linked"*) ;;
    *) echo "guests/build.sh: $busybox is not static (install busybox-static)" >&2; exit 1 ;;
esac

cd "$here"
kkey=$( { echo "$KERNEL_RECIPE"; sha256sum kernel.config patches/*.patch
          dpkg-query -W -f='${Version}\n' linux-source-6.1; gcc --version | head -1
        } | sha256sum | cut -c1-16)
ikey=$( { echo "$INITRAMFS_RECIPE"; sha256sum $(find initramfs src -type f | sort)
          sha256sum "$busybox" | cut -d' ' -f1; gcc --version | head -1
        } | sha256sum | cut -c1-16)
kdir=$cache/kernel-$kkey
icpio=$cache/initramfs-$ikey.cpio
gdir=$cache/guest-$kkey-$ikey
mkdir -p "$cache"
work=$(mktemp -d "${TMPDIR:-/tmp}/pyvmm-guest.XXXXXX")
trap 'rm -rf "$work"' EXIT

if [ ! -s "$kdir/vmlinux" ] || [ ! -s "$kdir/bzImage" ]; then
    echo "guest: building kernel in $work (a few minutes)"
    tar -C "$work" -xf "$src_tar"
    ksrc=$work/linux-source-6.1
    for p in patches/*.patch; do
        patch -s -d "$ksrc" -p1 < "$p"
    done
    make -s -C "$ksrc" tinyconfig >/dev/null
    "$ksrc/scripts/kconfig/merge_config.sh" -m -O "$ksrc" "$ksrc/.config" kernel.config >/dev/null
    make -s -C "$ksrc" olddefconfig >/dev/null
    # Every option of the fragment must survive olddefconfig's dependency pass.
    bad=0
    while IFS= read -r line; do
        case "$line" in
            CONFIG_*=*) grep -qxF "$line" "$ksrc/.config" || { echo "guest: $line did not take" >&2; bad=1; } ;;
            "# CONFIG_"*" is not set") opt=${line#\# }; opt=${opt%% *}
                ! grep -q "^$opt=" "$ksrc/.config" || { echo "guest: $opt still set" >&2; bad=1; } ;;
        esac
    done < kernel.config
    [ $bad = 0 ] || exit 1
    make -s -C "$ksrc" -j"$(nproc)" vmlinux bzImage
    mkdir -p "$kdir.tmp"
    cp "$ksrc/vmlinux" "$ksrc/arch/x86/boot/bzImage" "$ksrc/.config" "$kdir.tmp/"
    rm -rf "$kdir"; mv "$kdir.tmp" "$kdir"
fi

if [ ! -s "$icpio" ]; then
    echo "guest: building initramfs"
    root=$work/root
    mkdir -p "$root"/{bin,sbin,etc,proc,sys,dev,tmp,root,mnt}
    cp "$busybox" "$root/bin/busybox"
    for app in sh mount umount echo cat ls poweroff reboot halt init sleep mkdir dmesg \
               ip ping grep dd sync uname head tail wc true false md5sum hexdump stat; do
        ln -s busybox "$root/bin/$app"
    done
    ln -s ../bin/busybox "$root/sbin/init"
    # Freestanding getppid() timing loop: the system-call cost figure.
    gcc -static -nostdlib -O2 -fno-stack-protector -fno-pie -no-pie \
        -o "$root/bin/sysbench" src/sysbench.c
    # AF_VSOCK echo server and clients for the virtio-vsock tests (static libc).
    gcc -static -O2 -s -o "$root/bin/vsock" src/vsock.c
    # In-guest disk and TCP benchmark of bench/inguest.py (static: libc's
    # sockets and O_DIRECT; same binary under pyvmm and QEMU).
    gcc -static -O2 -o "$root/bin/iobench" src/iobench.c
    strip "$root/bin/iobench"
    cp -r initramfs/. "$root/"
    chmod 755 "$root/init" "$root/etc/rc"
    (cd "$root" && find . | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) > "$icpio.tmp"
    mv "$icpio.tmp" "$icpio"
fi

rm -rf "$gdir"; mkdir -p "$gdir"
ln "$kdir/vmlinux" "$kdir/bzImage" "$kdir/.config" "$icpio" "$gdir/" 2>/dev/null || \
    cp "$kdir/vmlinux" "$kdir/bzImage" "$kdir/.config" "$icpio" "$gdir/"
mv "$gdir/$(basename "$icpio")" "$gdir/initramfs.cpio"
ln -sfn "$(basename "$gdir")" "$cache/guest"
echo "guest: $gdir"

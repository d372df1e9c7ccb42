#!/bin/busybox sh
# The guest's first process: loads the modules the initramfs carries (in
# /modules/order), mounts the host's root read-only over 9p, gives it
# writable /tmp and /run, runs the script the kernel command line carries
# (vsocket.run=BASE64) inside it, prints its exit status and powers off.
B=/bin/busybox
$B mount -t proc proc /proc
$B mount -t sysfs sys /sys
$B mount -t devtmpfs dev /dev
for m in $($B cat /modules/order); do
  $B insmod /modules/$m.ko || echo "vsocket-vm: insmod $m failed"
done
$B mount -t 9p -o trans=virtio,version=9p2000.L,ro,cache=loose hostroot /mnt || echo "vsocket-vm: no host root"
$B mount -t proc proc /mnt/proc
$B mount -t sysfs sys /mnt/sys
$B mount -t devtmpfs dev /mnt/dev
$B mount -t tmpfs tmp /mnt/tmp
$B mount -t tmpfs run /mnt/run
RUN=$($B sed -n 's/.*vsocket\.run=\([^ ]*\).*/\1/p' /proc/cmdline)
$B chroot /mnt /bin/sh -c "$(echo "$RUN" | $B base64 -d)"
echo "vsocket-vm-exit=$?"
$B poweroff -f

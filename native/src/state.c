/* Snapshot helpers that cffi cannot express through a struct (the
 * anonymous union in struct kvm_dirty_log). */
#include <errno.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "pyvmm_native.h"

/* KVM_GET_DIRTY_LOG (KVM API doc 4.8): one bit per page of memory slot
 * `slot`, set when the guest wrote the page since the last call; the call
 * clears the log.  SAFETY: `bitmap` is a caller-owned buffer of at least
 * ceil(pages / 64) * 8 bytes for that slot (vmm/kvm/vm.py sizes it). */
long pv_get_dirty_log(int vmfd, uint32_t slot, void *bitmap)
{
    struct kvm_dirty_log log;
    memset(&log, 0, sizeof(log));
    log.slot = slot;
    log.dirty_bitmap = bitmap;
    return ioctl(vmfd, KVM_GET_DIRTY_LOG, &log) < 0 ? -errno : 0;
}

/* Guest RAM backed by a snapshot's memory file: MAP_PRIVATE, so pages are
 * read from the file on first touch, copied on first write, and the file is
 * never modified (several VMs can map one file at once).  Returns NULL and
 * sets *err on failure.  SAFETY: the caller checked that the file is at
 * least `size` bytes (a shorter file would SIGBUS on touch). */
void *pv_map_file(int fd, size_t size, int *err)
{
    void *p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_NORESERVE, fd, 0);
    if (p == MAP_FAILED) {
        *err = errno;
        return NULL;
    }
    *err = 0;
    return p;
}

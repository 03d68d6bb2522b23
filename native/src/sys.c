/* Thin system-call helpers for vmm/native.py: each returns -errno on failure. */
#include <errno.h>
#include <stddef.h>
#include <sys/ioctl.h>
#include <sys/mman.h>

#include "pyvmm_native.h"

long pv_ioctl(int fd, unsigned long req, void *arg)
{
    long r = ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}

long pv_ioctl_val(int fd, unsigned long req, unsigned long arg)
{
    long r = ioctl(fd, req, arg);
    return r < 0 ? -errno : r;
}

/* Anonymous guest RAM, aligned to `align` (2 MiB lets KVM and THP back it
 * with huge pages), MAP_NORESERVE so untouched RAM costs nothing. */
void *pv_alloc_ram(size_t size, size_t align, int hugepages)
{
    size_t len = size + align;
    unsigned char *p = mmap(NULL, len, PROT_READ | PROT_WRITE,
                            MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (p == MAP_FAILED)
        return NULL;
    uintptr_t start = ((uintptr_t)p + align - 1) & ~(uintptr_t)(align - 1);
    if (start > (uintptr_t)p)
        munmap(p, start - (uintptr_t)p);
    size_t tail = (uintptr_t)p + len - (start + size);
    if (tail)
        munmap((void *)(start + size), tail);
    if (hugepages)
        madvise((void *)start, size, MADV_HUGEPAGE);
    return (void *)start;
}

int pv_free_ram(void *addr, size_t size)
{
    return munmap(addr, size) < 0 ? -errno : 0;
}

/* Offsets inside the nested (anonymous) members of struct kvm_run, which
 * cffi cannot lay out from the header itself; tests compare them with
 * ffi.offsetof so a mismatch in decl/kvm.h is caught. */
size_t pv_kvm_run_offset(int which)
{
    switch (which) {
    case 0: return offsetof(struct kvm_run, io.port);
    case 1: return offsetof(struct kvm_run, io.data_offset);
    case 2: return offsetof(struct kvm_run, mmio.is_write);
    case 3: return offsetof(struct kvm_run, internal.data);
    case 4: return offsetof(struct kvm_run, system_event.ndata);
    case 5: return offsetof(struct kvm_run, fail_entry.cpu);
    }
    return (size_t)-1;
}

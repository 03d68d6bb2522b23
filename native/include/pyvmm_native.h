/* C prototypes of everything native/src/ exports to Python through cffi. */
#ifndef PYVMM_NATIVE_H
#define PYVMM_NATIVE_H

#include <stddef.h>
#include <stdint.h>
#include <linux/kvm.h>
#include <asm/bootparam.h>

/* sys.c: system calls that return -errno instead of setting errno, so the
 * Python side turns one integer into one exception. */
long pv_ioctl(int fd, unsigned long req, void *arg);
long pv_ioctl_val(int fd, unsigned long req, unsigned long arg);
void *pv_alloc_ram(size_t size, size_t align, int hugepages);
int pv_free_ram(void *addr, size_t size);
size_t pv_kvm_run_offset(int which);

/* state.c: snapshot helpers */
long pv_get_dirty_log(int vmfd, uint32_t slot, void *bitmap);
void *pv_map_file(int fd, size_t size, int *err);

#include "pyvmm_virtq.h"
#include "pyvmm_net.h"
#include "pyvmm_seccomp.h"
#include "pyvmm_vsock.h"
#include "pyvmm_uring.h"
#include "pyvmm_benchdrv.h"
#include "pyvmm_fast.h"

#endif

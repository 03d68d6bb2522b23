/* seccomp-bpf confinement of the VMM's threads: see native/src/seccomp.c and
 * vmm/seccomp.py (the allow-lists). */
#ifndef PYVMM_SECCOMP_H
#define PYVMM_SECCOMP_H

#include <stddef.h>

/* errors (returned negated; otherwise -errno from libseccomp) */
#define PV_SECCOMP_E_NAME 1000       /* a name is not a system call on this arch */

int pv_seccomp_apply(const char *kind, const char *const *names, int n, int *bad_index);
int pv_seccomp_resolve(const char *name);
int pv_seccomp_active(void);

#endif

/* seccomp-bpf confinement of the VMM's threads: see native/src/seccomp.c and
 * vmm/seccomp.py (the allow-lists). */
#ifndef PYVMM_SECCOMP_H
#define PYVMM_SECCOMP_H

#include <stddef.h>
#include <stdint.h>

/* errors (returned negated; otherwise -errno from libseccomp) */
#define PV_SECCOMP_E_NAME 1000       /* a name is not a system call on this arch */

int pv_seccomp_compile(const char *const *names, const int *arg_index,
                       const uint64_t *arg_value, int n, int *bad_index, void *out, int cap);
int pv_seccomp_install(const char *kind, const void *prog, int len);
int pv_seccomp_resolve(const char *name);
int pv_seccomp_active(void);

#endif

/* cffi declarations of native/include/pyvmm_seccomp.h */
#define PV_SECCOMP_E_NAME ...
int pv_seccomp_apply(const char *kind, const char *const *names, int n, int *bad_index);
int pv_seccomp_resolve(const char *name);
int pv_seccomp_active(void);

/* cffi declarations of native/include/pyvmm_seccomp.h */
#define PV_SECCOMP_E_NAME ...
int pv_seccomp_compile(const char *const *names, const int *arg_index,
                       const uint64_t *arg_value, int n, int *bad_index, void *out, int cap);
int pv_seccomp_install(const char *kind, const void *prog, int len);
int pv_seccomp_resolve(const char *name);
int pv_seccomp_active(void);

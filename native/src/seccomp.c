/* seccomp-bpf filters for the VMM's threads, built with libseccomp.
 *
 * Each thread installs its own filter (no TSYNC): the allow-list of its
 * kind (vmm/seccomp.py), compiled to BPF by libseccomp beforehand
 * (pv_seccomp_compile) and installed with one seccomp(2) call.  A filter
 * cannot be removed, and a thread created later inherits it, so the main
 * thread installs its own last.  The default
 * action is SECCOMP_RET_TRAP: the kernel sends SIGSYS without running the
 * call; on_sigsys() writes one line naming the thread kind and the system
 * call, restores SIGSYS's default action and re-sends it, so the process
 * ends killed by SIGSYS as soon as the handler returns (with KILL_PROCESS
 * nothing would say which call was refused).  The handler only uses
 * async-signal-safe calls and data prepared before any filter: the names
 * table and the thread's kind.
 *
 * One call is answered instead: glibc's malloc opens
 * /proc/sys/vm/overcommit_memory the first time a thread arena's heap
 * shrinks (check_may_shrink_heap, inside free()), on whichever thread and
 * whenever that happens -- long after the filters are in, and no thread kind
 * may open files.  That openat gets ENOENT, as where /proc is not mounted, and
 * glibc keeps its default (seccomp(2): with SECCOMP_RET_TRAP the call is not
 * made, and the handler's RAX in the ucontext is its return value).
 *
 * SAFETY: nothing here reads guest memory; the names come from our own
 * table in vmm/seccomp.py. */
#define _GNU_SOURCE
#include <errno.h>
#include <seccomp.h>
#include <signal.h>
#include <stdlib.h>
#include <string.h>
#include <linux/filter.h>
#include <linux/seccomp.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/syscall.h>
#include <ucontext.h>
#include <unistd.h>

#include "pyvmm_native.h"

#define NR_NAMES 512                 /* x86-64 system call numbers are below this */

static char *names[NR_NAMES];        /* filled once, before the first filter */
static int names_ready;
static __thread char thread_kind[16];
static int active;

static void put(char *buf, size_t *n, size_t cap, const char *s)
{
    while (*s && *n + 1 < cap)
        buf[(*n)++] = *s++;
}

static void put_num(char *buf, size_t *n, size_t cap, long v)
{
    char tmp[24];
    int k = 0;
    unsigned long u = v < 0 ? (unsigned long)-v : (unsigned long)v;
    do
        tmp[k++] = (char)('0' + u % 10);
    while ((u /= 10) && k < (int)sizeof(tmp));
    if (v < 0 && *n + 1 < cap)
        buf[(*n)++] = '-';
    while (k && *n + 1 < cap)
        buf[(*n)++] = tmp[--k];
}

static const char overcommit_path[] = "/proc/sys/vm/overcommit_memory";

/* SAFETY: the path pointer is the refused call's own argument, made by this
 * process on the signalled thread (glibc passes a string literal); it is
 * compared byte by byte up to the first difference or our string's end. */
static int answer_overcommit_open(int nr, void *ctx)
{
#if defined(__x86_64__)
    if (nr != __NR_openat || !ctx)
        return 0;
    ucontext_t *uc = ctx;
    const char *path = (const char *)uc->uc_mcontext.gregs[REG_RSI];
    if (!path)
        return 0;
    for (size_t i = 0; i < sizeof(overcommit_path); i++)
        if (path[i] != overcommit_path[i])
            return 0;
    uc->uc_mcontext.gregs[REG_RAX] = -ENOENT;
    return 1;
#else
    (void)nr;
    (void)ctx;
    return 0;
#endif
}

static void on_sigsys(int sig, siginfo_t *si, void *ctx)
{
    char buf[200];
    size_t n = 0;
    int nr = si->si_syscall;
    if (answer_overcommit_open(nr, ctx))
        return;
    put(buf, &n, sizeof(buf), "pyvmm: seccomp: ");
    put(buf, &n, sizeof(buf), thread_kind[0] ? thread_kind : "unconfined");
    put(buf, &n, sizeof(buf), " thread made a forbidden system call: ");
    put(buf, &n, sizeof(buf), nr >= 0 && nr < NR_NAMES && names[nr] ? names[nr] : "?");
    put(buf, &n, sizeof(buf), " (");
    put_num(buf, &n, sizeof(buf), nr);
    put(buf, &n, sizeof(buf), "); ending the VMM\n");
    ssize_t w = write(STDERR_FILENO, buf, n);
    (void)w;
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_handler = SIG_DFL;
    sigaction(SIGSYS, &sa, NULL);
    /* pending until this handler returns (SIGSYS is blocked meanwhile) */
    syscall(SYS_tgkill, getpid(), (pid_t)syscall(SYS_gettid), SIGSYS);
}

static int setup_once(void)
{
    if (names_ready)
        return 0;
    for (int nr = 0; nr < NR_NAMES; nr++)
        names[nr] = seccomp_syscall_resolve_num_arch(SCMP_ARCH_NATIVE, nr);   /* or NULL */
    struct sigaction sa;
    memset(&sa, 0, sizeof(sa));
    sa.sa_sigaction = on_sigsys;
    sa.sa_flags = SA_SIGINFO;
    sigemptyset(&sa.sa_mask);
    if (sigaction(SIGSYS, &sa, NULL) < 0)
        return -errno;
    /* A core file of the VMM would hold guest memory, and the SIGSYS ending
     * would write one each time: no core files once confined. */
    struct rlimit rl;
    if (getrlimit(RLIMIT_CORE, &rl) == 0) {
        rl.rlim_cur = 0;
        setrlimit(RLIMIT_CORE, &rl);
    }
    names_ready = 1;
    return 0;
}

int pv_seccomp_resolve(const char *name)
{
    return seccomp_syscall_resolve_name(name);
}

int pv_seccomp_active(void)
{
    return active;
}

/* Build (libseccomp) the filter allowing exactly `names`; where
 * arg_index[i] >= 0, only when that argument equals arg_value[i] (several
 * entries of one name allow several values). */
static int build(const char *const *names_in, const int *arg_index, const uint64_t *arg_value,
                 int n, int *bad_index, scmp_filter_ctx *out)
{
    int r = setup_once();
    if (r < 0)
        return r;
    scmp_filter_ctx ctx = seccomp_init(SCMP_ACT_TRAP);
    if (!ctx)
        return -ENOMEM;
    for (int i = 0; i < n; i++) {
        int nr = seccomp_syscall_resolve_name(names_in[i]);
        if (nr == __NR_SCMP_ERROR) {
            *bad_index = i;
            seccomp_release(ctx);
            return -PV_SECCOMP_E_NAME;
        }
        if (arg_index[i] >= 0)
            r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 1,
                                 SCMP_CMP((unsigned)arg_index[i], SCMP_CMP_EQ, arg_value[i]));
        else
            r = seccomp_rule_add(ctx, SCMP_ACT_ALLOW, nr, 0);
        if (r < 0) {
            *bad_index = i;
            seccomp_release(ctx);
            return r;
        }
    }
    *out = ctx;
    return 0;
}

static void name_thread(const char *kind)
{
    strncpy(thread_kind, kind, sizeof(thread_kind) - 1);
    prctl(PR_SET_NAME, thread_kind, 0, 0, 0);    /* shows in top -H, ps -L */
}

/* The same filter as BPF (an array of struct sock_filter) in out[0..cap):
 * returns its length in bytes, -ENOSPC if cap is too small, -PV_SECCOMP_E_NAME
 * or -errno.  Built ahead (while the API client configures the VM), a filter
 * costs one system call to install on the path to the guest's first
 * instruction instead of a libseccomp build (a few ms each, per thread). */
int pv_seccomp_compile(const char *const *names_in, const int *arg_index,
                       const uint64_t *arg_value, int n, int *bad_index, void *out, int cap)
{
    scmp_filter_ctx ctx;
    int r = build(names_in, arg_index, arg_value, n, bad_index, &ctx);
    if (r < 0)
        return r;
    int fd = memfd_create("pyvmm-seccomp", MFD_CLOEXEC);     /* export_bpf writes to an fd */
    if (fd < 0) {
        r = -errno;
        seccomp_release(ctx);
        return r;
    }
    r = seccomp_export_bpf(ctx, fd);
    seccomp_release(ctx);
    if (r == 0) {
        off_t len = lseek(fd, 0, SEEK_END);
        if (len < 0)
            r = -errno;
        else if (len > cap)
            r = -ENOSPC;
        else if (pread(fd, out, (size_t)len, 0) != len)
            r = -EIO;
        else
            r = (int)len;
    }
    close(fd);
    return r;
}

/* Install on the calling thread a filter compiled by pv_seccomp_compile, as
 * seccomp_load does: no_new_privs, then the filter (seccomp(2)).
 * SAFETY: prog/len come from pv_seccomp_compile in this process (vmm/seccomp.py
 * keeps them); the kernel checks the program itself. */
int pv_seccomp_install(const char *kind, const void *prog, int len)
{
    int r = setup_once();
    if (r < 0)
        return r;
    if (len <= 0 || len % (int)sizeof(struct sock_filter))
        return -EINVAL;
    struct sock_fprog fprog = {
        .len = (unsigned short)(len / (int)sizeof(struct sock_filter)),
        .filter = (struct sock_filter *)prog,
    };
    name_thread(kind);
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) < 0)
        return -errno;
    if (syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, 0, &fprog) < 0)
        return -errno;
    __atomic_store_n(&active, 1, __ATOMIC_RELEASE);
    return 0;
}

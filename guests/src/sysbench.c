/*
 * sysbench N: time N getppid() system calls and print the cost of one.
 * Freestanding (no libc) so the initramfs stays small: built by
 * guests/build.sh with gcc -static -nostdlib.
 */
#include <stddef.h>

#define SYS_write 1
#define SYS_getppid 110
#define SYS_clock_gettime 228
#define SYS_exit 60
#define CLOCK_MONOTONIC 1

struct ts { long sec, nsec; };

static long sys3(long n, long a, long b, long c)
{
    long r;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c)
                     : "rcx", "r11", "memory");
    return r;
}

static void put(const char *s)
{
    volatile size_t n = 0;      /* volatile: keep gcc from calling strlen */
    while (s[n])
        n++;
    sys3(SYS_write, 1, (long)s, n);
}

static void putnum(unsigned long v)
{
    char buf[24];
    int i = sizeof(buf) - 1;
    buf[i] = 0;
    do {
        buf[--i] = '0' + v % 10;
        v /= 10;
    } while (v);
    put(buf + i);
}

static long now_ns(void)
{
    struct ts t;
    sys3(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&t, 0);
    return t.sec * 1000000000L + t.nsec;
}

void __attribute__((noreturn)) start_c(long *sp)
{
    long argc = sp[0];
    char **argv = (char **)(sp + 1);
    unsigned long n = 10000;
    if (argc > 1) {
        n = 0;
        for (const char *p = argv[1]; *p >= '0' && *p <= '9'; p++)
            n = n * 10 + (*p - '0');
    }
    long t0 = now_ns();
    for (unsigned long i = 0; i < n; i++)
        sys3(SYS_getppid, 0, 0, 0);
    long t1 = now_ns();
    put("sysbench: ");
    putnum(n);
    put(" getppid calls in ");
    putnum((t1 - t0) / 1000);
    put(" us, ");
    putnum(n ? (t1 - t0) / n : 0);
    put(" ns each\n");
    sys3(SYS_exit, 0, 0, 0);
    __builtin_unreachable();
}

__asm__(".globl _start\n_start:\n\tmov %rsp, %rdi\n\tand $-16, %rsp\n\tcall start_c\n");

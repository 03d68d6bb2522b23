/*
 * iobench: the in-guest side of bench/inguest.py (the same program under
 * pyvmm and under QEMU, so the two VMMs are compared on the same guest).
 *
 *   iobench disk DEV read|write BS COUNT   O_DIRECT I/O of BS bytes (<= 1 MiB),
 *                                          COUNT times, sequential from 0
 *   iobench tcp A.B.C.D PORT BYTES         send BYTES to A.B.C.D:PORT, wait for
 *                                          the receiver's one-byte acknowledgement
 *
 * Prints one line "iobench: <what> ... bytes=N us=T" (T: microseconds on the
 * guest's CLOCK_MONOTONIC); disk runs of up to 64 transfers add
 * "each_us=t1,t2,..." (each transfer's time).  Freestanding (raw system calls, no libc), like
 * sysbench.c, so the initramfs stays small: the emulated guest kernel of a
 * software-KVM host copies every byte of it at boot.
 */
#include <stddef.h>

#define SYS_write 1
#define SYS_open 2
#define SYS_close 3
#define SYS_pread64 17
#define SYS_pwrite64 18
#define SYS_socket 41
#define SYS_connect 42
#define SYS_sendto 44
#define SYS_recvfrom 45
#define SYS_shutdown 48
#define SYS_setsockopt 54
#define SYS_exit 60
#define SYS_fdatasync 75
#define SYS_clock_gettime 228
#define O_RDONLY 0
#define O_WRONLY 1
#define O_DIRECT 040000
#define AF_INET 2
#define SOCK_STREAM 1
#define IPPROTO_TCP 6
#define TCP_NODELAY 1
#define SHUT_WR 1
#define CLOCK_MONOTONIC 1
#define MAX_BS (1 << 20)

#define MAX_EACH 64

static unsigned char buf[MAX_BS] __attribute__((aligned(4096)));
static long long each[MAX_EACH];

static long sys6(long n, long a, long b, long c, long d, long e, long f)
{
    long r;
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    __asm__ volatile("syscall" : "=a"(r) : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return r;
}

static long sys3(long n, long a, long b, long c) { return sys6(n, a, b, c, 0, 0, 0); }

static void put(const char *s)
{
    volatile size_t n = 0;      /* volatile: keep gcc from calling strlen */
    while (s[n])
        n++;
    sys3(SYS_write, 1, (long)s, n);
}

static void put_num(const char *label, long long v)
{
    char tmp[24], out[24];
    int n = 0, k = 0;
    if (v < 0) {
        out[k++] = '-';
        v = -v;
    }
    do {
        tmp[n++] = (char)('0' + v % 10);
        v /= 10;
    } while (v);
    while (n)
        out[k++] = tmp[--n];
    out[k] = 0;
    put(label);
    put(out);
}

static long long num(const char *s)
{
    long long v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (*s++ - '0');
    return v;
}

static int same(const char *a, const char *b)
{
    while (*a && *a == *b)
        a++, b++;
    return *a == *b;
}

static long long now_us(void)
{
    struct { long sec, nsec; } t;
    sys3(SYS_clock_gettime, CLOCK_MONOTONIC, (long)&t, 0);
    return t.sec * 1000000LL + t.nsec / 1000;
}

static int fail(const char *what, long r)
{
    put("iobench: ");
    put(what);
    put_num(" failed: ", r);
    put("\n");
    return 1;
}

static int disk(const char *dev, int write_, long bs, long count)
{
    if (bs <= 0 || bs > MAX_BS)
        return fail("block size", bs);
    long fd = sys3(SYS_open, (long)dev, (write_ ? O_WRONLY : O_RDONLY) | O_DIRECT, 0);
    if (fd < 0)
        return fail("open", fd);
    for (long i = 0; i < bs; i++)
        buf[i] = 0x5a;
    long long t0 = now_us(), t = t0;
    for (long i = 0; i < count; i++) {
        long r = sys6(write_ ? SYS_pwrite64 : SYS_pread64, fd, (long)buf, bs, i * bs, 0, 0);
        if (r != bs)
            return fail("transfer", r);
        if (i < MAX_EACH) {
            long long now = now_us();
            each[i] = now - t;
            t = now;
        }
    }
    long r = write_ ? sys3(SYS_fdatasync, fd, 0, 0) : 0;
    if (r < 0)
        return fail("fdatasync", r);
    long long t1 = now_us();
    put(write_ ? "iobench: disk write" : "iobench: disk read");
    put_num(" bs=", bs);
    put_num(" count=", count);
    put_num(" bytes=", (long long)bs * count);
    put_num(" us=", t1 - t0);
    /* each transfer's own time (a few runs' worth of samples for the
     * bench's median), only for short runs: the emulated guest console
     * pays for every byte */
    if (count <= MAX_EACH)
        for (long i = 0; i < count; i++)
            put_num(i ? "," : " each_us=", each[i]);
    put("\n");
    sys3(SYS_close, fd, 0, 0);
    return 0;
}

static int tcp(const char *host, long port, long long bytes)
{
    struct {
        unsigned short family, port;
        unsigned char addr[4];
        unsigned char zero[8];
    } a = {AF_INET, (unsigned short)(((port & 0xff) << 8) | ((port >> 8) & 0xff)), {0}, {0}};
    for (int i = 0; i < 4; i++) {           /* dotted quad */
        a.addr[i] = (unsigned char)num(host);
        while (*host && *host != '.')
            host++;
        if (*host)
            host++;
    }
    int one = 1;
    char ack;
    long s = sys3(SYS_socket, AF_INET, SOCK_STREAM, 0);
    if (s < 0)
        return fail("socket", s);
    sys6(SYS_setsockopt, s, IPPROTO_TCP, TCP_NODELAY, (long)&one, sizeof(one), 0);
    long r = sys3(SYS_connect, s, (long)&a, sizeof(a));
    if (r < 0)
        return fail("connect", r);
    for (long i = 0; i < 65536; i++)
        buf[i] = 0x42;
    long long t0 = now_us(), left = bytes;
    while (left > 0) {
        r = sys6(SYS_sendto, s, (long)buf, left < 65536 ? left : 65536, 0, 0, 0);
        if (r <= 0)
            return fail("send", r);
        left -= r;
    }
    sys3(SYS_shutdown, s, SHUT_WR, 0);
    r = sys6(SYS_recvfrom, s, (long)&ack, 1, 0, 0, 0);   /* the receiver got everything */
    if (r != 1)
        return fail("ack", r);
    long long t1 = now_us();
    put_num("iobench: tcp send bytes=", bytes);
    put_num(" us=", t1 - t0);
    put("\n");
    sys3(SYS_close, s, 0, 0);
    return 0;
}

static int run(int argc, char **argv)
{
    if (argc == 6 && same(argv[1], "disk"))
        return disk(argv[2], same(argv[3], "write"), (long)num(argv[4]), (long)num(argv[5]));
    if (argc == 5 && same(argv[1], "tcp"))
        return tcp(argv[2], (long)num(argv[3]), num(argv[4]));
    put("usage: iobench disk DEV read|write BS COUNT | iobench tcp A.B.C.D PORT BYTES\n");
    return 2;
}

/* entry: the kernel leaves argc at (%rsp), argv right above it */
__attribute__((used)) static void start_c(long *sp)
{
    sys3(SYS_exit, run((int)sp[0], (char **)(sp + 1)), 0, 0);
}

__asm__(".global _start\n_start:\n  mov %rsp, %rdi\n  and $-16, %rsp\n  call start_c\n  hlt\n");

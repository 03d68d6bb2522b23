/*
 * iobench: the in-guest side of bench/inguest.py (the same program under
 * pyvmm and under QEMU, so the two VMMs are compared on the same guest).
 *
 *   iobench disk DEV read|write BS COUNT   O_DIRECT I/O of BS bytes, COUNT times,
 *                                          sequential from offset 0
 *   iobench tcp HOST PORT BYTES            send BYTES to HOST:PORT, wait for the
 *                                          receiver's one-byte acknowledgement
 *
 * Prints one line "iobench: <what> bytes=N us=T" (T: microseconds on the
 * guest's CLOCK_MONOTONIC).  Built static by guests/build.sh.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

static long long now_us(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1000000LL + t.tv_nsec / 1000;
}

static int disk(const char *dev, int write_, size_t bs, long count)
{
    int fd = open(dev, (write_ ? O_WRONLY : O_RDONLY) | O_DIRECT);
    void *buf;
    if (fd < 0) {
        perror("iobench: open");
        return 1;
    }
    if (posix_memalign(&buf, 4096, bs)) {
        fprintf(stderr, "iobench: no memory\n");
        return 1;
    }
    memset(buf, 0x5a, bs);
    long long t0 = now_us();
    for (long i = 0; i < count; i++) {
        ssize_t n = write_ ? pwrite(fd, buf, bs, (off_t)(i * bs)) : pread(fd, buf, bs, (off_t)(i * bs));
        if (n != (ssize_t)bs) {
            perror("iobench: transfer");
            return 1;
        }
    }
    if (write_ && fdatasync(fd) < 0) {
        perror("iobench: fdatasync");
        return 1;
    }
    long long t1 = now_us();
    printf("iobench: disk %s bs=%zu count=%ld bytes=%lld us=%lld\n", write_ ? "write" : "read",
           bs, count, (long long)bs * count, t1 - t0);
    close(fd);
    return 0;
}

static int tcp(const char *host, int port, long long bytes)
{
    static char buf[65536];
    struct sockaddr_in a = {.sin_family = AF_INET, .sin_port = htons(port)};
    int s = socket(AF_INET, SOCK_STREAM, 0), one = 1;
    char ack;
    if (s < 0 || inet_pton(AF_INET, host, &a.sin_addr) != 1) {
        perror("iobench: socket");
        return 1;
    }
    setsockopt(s, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
    if (connect(s, (struct sockaddr *)&a, sizeof(a)) < 0) {
        perror("iobench: connect");
        return 1;
    }
    memset(buf, 0x42, sizeof(buf));
    long long t0 = now_us(), left = bytes;
    while (left > 0) {
        ssize_t n = send(s, buf, left < (long long)sizeof(buf) ? (size_t)left : sizeof(buf), 0);
        if (n <= 0) {
            perror("iobench: send");
            return 1;
        }
        left -= n;
    }
    shutdown(s, SHUT_WR);
    if (recv(s, &ack, 1, 0) != 1) {     /* the receiver got everything */
        perror("iobench: ack");
        return 1;
    }
    long long t1 = now_us();
    printf("iobench: tcp send bytes=%lld us=%lld\n", bytes, t1 - t0);
    close(s);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IONBF, 0);
    if (argc == 6 && !strcmp(argv[1], "disk"))
        return disk(argv[2], !strcmp(argv[3], "write"), (size_t)atol(argv[4]), atol(argv[5]));
    if (argc == 5 && !strcmp(argv[1], "tcp"))
        return tcp(argv[2], atoi(argv[3]), atoll(argv[4]));
    fprintf(stderr, "usage: iobench disk DEV read|write BS COUNT | iobench tcp HOST PORT BYTES\n");
    return 2;
}

/*
 * vsock: AF_VSOCK test program of the default guest (built static by
 * guests/build.sh).
 *
 *   vsock echo PORT            serve PORT: echo every stream back (a child per
 *                              connection), half-close after the peer's EOF
 *   vsock connect CID PORT MSG send MSG, half-close, print the reply
 *   vsock blast CID PORT N     send N pattern bytes, then close at once
 *
 * Each ends a connection with one line on stdout ("vsock-echo: ..."), so a
 * test reading the serial console sees how it went.
 */
#include <errno.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>
#include <linux/vm_sockets.h>

static int vsock_connect(unsigned cid, unsigned port)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = cid, .svm_port = port };
    if (fd < 0 || connect(fd, (struct sockaddr *)&a, sizeof(a)) < 0) {
        printf("vsock: connect %u:%u: %s\n", cid, port, strerror(errno));
        exit(1);
    }
    return fd;
}

static int write_all(int fd, const char *p, size_t n)
{
    while (n) {
        ssize_t w = write(fd, p, n);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return -1;
        p += w;
        n -= (size_t)w;
    }
    return 0;
}

static void echo_one(int c, unsigned port)
{
    static char buf[65536];
    unsigned long long total = 0;
    const char *how = "eof";
    for (;;) {
        ssize_t n = read(c, buf, sizeof(buf));
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            how = strerror(errno);
            break;
        }
        if (n == 0)
            break;
        if (write_all(c, buf, (size_t)n) < 0) {
            how = strerror(errno);
            break;
        }
        total += (unsigned long long)n;
    }
    shutdown(c, SHUT_WR);
    close(c);
    printf("vsock-echo: port %u: %llu bytes echoed, closed (%s)\n", port, total, how);
    fflush(stdout);
}

static int echo(unsigned port)
{
    int fd = socket(AF_VSOCK, SOCK_STREAM, 0);
    struct sockaddr_vm a = { .svm_family = AF_VSOCK, .svm_cid = VMADDR_CID_ANY, .svm_port = port };
    if (fd < 0 || bind(fd, (struct sockaddr *)&a, sizeof(a)) < 0 || listen(fd, 16) < 0) {
        printf("vsock-echo: listen on %u: %s\n", port, strerror(errno));
        return 1;
    }
    signal(SIGCHLD, SIG_IGN);            /* no zombies */
    signal(SIGPIPE, SIG_IGN);
    printf("vsock-echo: listening on port %u\n", port);
    fflush(stdout);
    for (;;) {
        int c = accept(fd, NULL, NULL);
        if (c < 0) {
            if (errno == EINTR)
                continue;
            printf("vsock-echo: accept: %s\n", strerror(errno));
            return 1;
        }
        pid_t pid = fork();
        if (pid == 0) {
            close(fd);
            echo_one(c, port);
            _exit(0);
        }
        close(c);
    }
}

static int client(unsigned cid, unsigned port, const char *msg)
{
    char buf[4096];
    size_t got = 0;
    int fd = vsock_connect(cid, port);
    if (write_all(fd, msg, strlen(msg)) < 0) {
        printf("vsock-connect: write: %s\n", strerror(errno));
        return 1;
    }
    shutdown(fd, SHUT_WR);
    for (;;) {
        ssize_t n = read(fd, buf + got, sizeof(buf) - 1 - got);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0 || (got += (size_t)n) == sizeof(buf) - 1)
            break;
    }
    buf[got] = 0;
    printf("vsock-connect: reply [%s]\n", buf);
    close(fd);
    return 0;
}

static int blast(unsigned cid, unsigned port, unsigned long long n)
{
    static char buf[65536];
    for (size_t i = 0; i < sizeof(buf); i++)
        buf[i] = (char)(i * 7 + 3);
    int fd = vsock_connect(cid, port);
    unsigned long long sent = 0;
    while (sent < n) {
        size_t k = n - sent < sizeof(buf) ? (size_t)(n - sent) : sizeof(buf);
        if (write_all(fd, buf, k) < 0) {
            printf("vsock-blast: write: %s\n", strerror(errno));
            return 1;
        }
        sent += k;
    }
    close(fd);                           /* at once: the host must see a clean EOF */
    printf("vsock-blast: sent %llu bytes and closed\n", sent);
    return 0;
}

int main(int argc, char **argv)
{
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (argc == 3 && !strcmp(argv[1], "echo"))
        return echo((unsigned)strtoul(argv[2], NULL, 0));
    if (argc == 5 && !strcmp(argv[1], "connect"))
        return client((unsigned)strtoul(argv[2], NULL, 0), (unsigned)strtoul(argv[3], NULL, 0),
                      argv[4]);
    if (argc == 5 && !strcmp(argv[1], "blast"))
        return blast((unsigned)strtoul(argv[2], NULL, 0), (unsigned)strtoul(argv[3], NULL, 0),
                     strtoull(argv[4], NULL, 0));
    fprintf(stderr, "usage: vsock echo PORT | connect CID PORT MSG | blast CID PORT N\n");
    return 2;
}

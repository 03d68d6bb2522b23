/* The guest side of bench/blk.py and bench/net.py's real-path figures: a
 * virtio driver loop in C, run on its own thread with the GIL released, so
 * it costs what a guest driver costs and never competes with pyvmm's I/O
 * thread for the interpreter.  Like Linux's virtio_ring it publishes
 * requests in the available ring, kicks only when the device asked for it
 * (VIRTIO_F_RING_EVENT_IDX, virtio 1.1 §2.6.7.2) by writing the queue's
 * notify eventfd (what KVM's ioeventfd does when a guest writes QueueNotify),
 * then sleeps on the interrupt eventfd the device signals (what KVM's irqfd
 * delivers), acknowledges the interrupt through the transport's registers
 * (a callback into Python: the MMIO/PIO exit a guest's interrupt handler
 * takes), and harvests the used ring.
 *
 * Slot k of a run is descriptor k, already laid out by Python: an indirect
 * table (blk: header, data, status) or one buffer (net).  Bench-only code:
 * compiled by bench/cdriver.py, not part of pyvmm. */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE              /* RUSAGE_THREAD, pipe2, CPU_SET */
#endif
#include <errno.h>
#include <fcntl.h>
#include <linux/futex.h>
#include <poll.h>
#include <sched.h>
#include <sys/syscall.h>
#include <sys/resource.h>
#include <pthread.h>
#include <sys/eventfd.h>
#include <time.h>
#include <stdint.h>
#include <string.h>
#include <unistd.h>

struct bd_ring {
    uint8_t *desc, *avail, *used;    /* host pointers of the three areas */
    uint32_t size;
    uint32_t event_idx;
    int notify_fd, irq_fd;
    uint16_t avail_idx, last_used;
    uint64_t kicks, interrupts;
};

struct bd_work {
    uint32_t mode;                   /* 0: blk requests, 1: net TX buffers, 2: net RX buffers */
    uint32_t depth;                  /* requests in flight */
    uint64_t n;                      /* requests (blk, net TX) or frames (net RX) */
    uint8_t *headers;                /* blk: 16 bytes per slot */
    uint8_t *status;                 /* blk: 1 byte per slot */
    uint32_t type;                   /* blk: T_IN / T_OUT */
    const uint64_t *sectors;         /* blk: sector of request i */
    int timeout_ms;                  /* give up when no interrupt comes this long */
    int (*ack)(void);                /* acknowledge the interrupt (transport registers) */
    uint64_t done, bytes, errors;
    uint32_t base;                   /* slots are descriptors base .. base+depth-1 */
    uint64_t spin_ns;                /* 0, or look at the used ring this long before sleeping */
    uint64_t spun;                   /* times the look found completions (no sleep) */
};

#define AVAIL_IDX(r) ((volatile uint16_t *)((r)->avail + 2))
#define AVAIL_RING(r, i) ((volatile uint16_t *)((r)->avail + 4 + 2 * (i)))
#define USED_EVENT(r) ((volatile uint16_t *)((r)->avail + 4 + 2 * (r)->size))
#define USED_IDX(r) ((volatile uint16_t *)((r)->used + 2))
#define USED_ELEM(r, i) ((volatile uint32_t *)((r)->used + 4 + 8 * (i)))
#define AVAIL_EVENT(r) ((volatile uint16_t *)((r)->used + 4 + 8 * (r)->size))
#define USED_F_NO_NOTIFY 1

static uint64_t mono_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* The driver-polls variant (w->spin_ns, an explicitly labelled row of
 * bench/blk.py, never the default): before sleeping, look at used.idx for
 * up to spin_ns, as a vCPU waiting for an interrupt does under KVM's
 * halt-polling (halt_poll_ns) or Linux's virtio-blk poll queues, and not
 * while this thread is being preempted (as KVM).  1 if completions came
 * meanwhile. */
static uint64_t bd_nivcsw, bd_contended_until;

/* KVM stops halt-polling when another task wants the core
 * (single_task_running()); the user-space stand-in, as in
 * native/src/fastpath.c: no spin for 10 ms after this thread was preempted. */
static int spin_contended(void)
{
    struct rusage ru;
    uint64_t now = mono_ns();
    if (now < bd_contended_until)
        return 1;
    if (getrusage(RUSAGE_THREAD, &ru) < 0)
        return 0;
    if ((uint64_t)ru.ru_nivcsw != bd_nivcsw) {
        if (bd_nivcsw)
            bd_contended_until = now + 10000000u;
        bd_nivcsw = (uint64_t)ru.ru_nivcsw;
    }
    return now < bd_contended_until;
}

static int spin_used(struct bd_ring *r, uint64_t spin_ns)
{
    if (spin_contended())
        return 0;
    uint64_t end = mono_ns() + spin_ns;
    do {
        for (int i = 0; i < 64; i++) {
            if (*USED_IDX(r) != r->last_used)
                return 1;
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
    } while (mono_ns() < end);
    return *USED_IDX(r) != r->last_used;
}

static void put(struct bd_ring *r, uint16_t head)
{
    *AVAIL_RING(r, r->avail_idx % r->size) = head;
    r->avail_idx++;
}

/* Publish and kick if needed (Linux virtqueue_kick_prepare). */
static int publish(struct bd_ring *r, uint16_t old)
{
    __atomic_thread_fence(__ATOMIC_RELEASE);
    *AVAIL_IDX(r) = r->avail_idx;
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int kick;
    if (r->event_idx) {
        uint16_t ev = *AVAIL_EVENT(r), nw = r->avail_idx;
        kick = (uint16_t)(nw - ev - 1) < (uint16_t)(nw - old);
    } else {
        kick = !(*(volatile uint16_t *)r->used & USED_F_NO_NOTIFY);
    }
    if (kick) {
        uint64_t one = 1;
        if (write(r->notify_fd, &one, 8) != 8)
            return -errno;
        r->kicks++;
    }
    return 0;
}

static void submit_blk(struct bd_ring *r, struct bd_work *w, uint32_t slot, uint64_t i)
{
    uint8_t *h = w->headers + 16 * slot;
    memcpy(h, &w->type, 4);
    memset(h + 4, 0, 4);
    memcpy(h + 8, &w->sectors[i], 8);
    w->status[slot] = 0xFF;
    put(r, (uint16_t)(slot + w->base));
}

/* Returns 0 when w->n requests (frames) completed, -ETIMEDOUT if the device
 * went quiet, or -errno. */
long bd_run(struct bd_ring *r, struct bd_work *w)
{
    uint64_t submitted = 0;
    uint32_t depth = w->depth < r->size ? w->depth : r->size;
    uint16_t old = r->avail_idx;
    w->done = w->bytes = w->errors = w->spun = 0;
    /* `depth` requests (blk), frames (TX) or buffers (RX) in flight, a new
     * one for each completed */
    /* RX: exactly n buffers are ever posted, so none is left for frames that
     * arrive before the next run (they wait in the tap until the clock runs) */
    for (uint32_t s = 0; s < depth && submitted < w->n; s++, submitted++) {
        if (w->mode == 0)
            submit_blk(r, w, s, submitted);
        else
            put(r, (uint16_t)(s + w->base));
    }
    if (r->event_idx)
        *USED_EVENT(r) = r->last_used;
    int e = publish(r, old);
    if (e < 0)
        return e;
    while (w->done < w->n) {
        struct pollfd p = {.fd = r->irq_fd, .events = POLLIN};
        /* Linux re-checks the used ring after re-enabling interrupts, so
         * only sleep when nothing is there */
        if (*USED_IDX(r) == r->last_used && w->spin_ns && spin_used(r, w->spin_ns)) {
            w->spun++;          /* taken as when the ring had them: no sleep, no ack */
        } else if (*USED_IDX(r) == r->last_used) {
            int k = poll(&p, 1, w->timeout_ms);
            if (k < 0 && errno == EINTR)
                continue;
            if (k < 0)
                return -errno;
            if (k == 0)
                return -ETIMEDOUT;
            uint64_t v;
            if (read(r->irq_fd, &v, 8) < 0 && errno != EAGAIN)
                return -errno;
            r->interrupts++;
            if (w->ack)
                w->ack();
        }
        old = r->avail_idx;
        for (;;) {
            uint16_t used = *USED_IDX(r);
            __atomic_thread_fence(__ATOMIC_ACQUIRE);
            while (r->last_used != used) {
                volatile uint32_t *el = USED_ELEM(r, r->last_used % r->size);
                uint32_t id = el[0] - w->base, len = el[1];
                r->last_used++;
                w->done++;
                w->bytes += len;
                if (id >= depth && w->mode == 0)
                    return -EPROTO;
                if (w->mode == 0) {
                    if (w->status[id] != 0)
                        w->errors++;
                    if (submitted < w->n)
                        submit_blk(r, w, id, submitted++);
                } else if (submitted < w->n) {
                    put(r, (uint16_t)(id + w->base));  /* RX: the buffer goes back; TX: next frame */
                    submitted++;
                }
            }
            if (r->event_idx)
                *USED_EVENT(r) = r->last_used;
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            if (*USED_IDX(r) == r->last_used)
                break;
        }
        if (r->avail_idx != old && (e = publish(r, old)) < 0)
            return e;
    }
    return 0;
}

/* the references ("limits") for net: n read()s or write()s on a tap, one
 * frame each, cycling through nslots buffers `stride` apart; returns frames
 * moved or -errno (a read that would block ends the loop) */
long bd_tap_loop(int fd, uint8_t *buf, uint64_t len, uint64_t n, int write_, uint64_t stride,
                 uint32_t nslots)
{
    uint64_t frames = 0;
    for (uint64_t i = 0; i < n; i++) {
        uint8_t *p = buf + (i % nslots) * stride;
        ssize_t r = write_ ? write(fd, p, len) : read(fd, p, len);
        if (r < 0) {
            if (errno == EINTR) {
                i--;
                continue;
            }
            if (errno == EAGAIN)
                break;
            return -errno;
        }
        frames++;
    }
    return (long)frames;
}

/* the QD1 reference for blk: n pread()s or pwrite()s of `len` at offsets[i]
 * into one buffer; returns requests done or -errno */
long bd_prw_loop(int fd, uint8_t *buf, uint64_t len, const uint64_t *offsets, uint64_t n,
                 int write_)
{
    for (uint64_t i = 0; i < n; i++) {
        ssize_t r = write_ ? pwrite(fd, buf, len, (off_t)offsets[i])
                           : pread(fd, buf, len, (off_t)offsets[i]);
        if (r < 0 && errno == EINTR) {
            i--;
            continue;
        }
        if (r < 0)
            return -errno;
    }
    return (long)n;
}

/* A limit at queue depth > 1 on a multi-core host: the pread/pwrite loop
 * on `threads` threads, thread t doing requests t, t+threads, ... (each
 * into its own `len` buffer at bufs + t*len), so up to `threads` are in
 * flight, as many cores as the device path's two threads use.  Returns
 * requests done or -errno. */
struct prw_arg { int fd; uint8_t *buf; uint64_t len; const uint64_t *offs; uint64_t n, step;
                 int write_; long r; };

static void *prw_thread(void *arg)
{
    struct prw_arg *a = arg;
    a->r = 0;
    for (uint64_t i = 0; i < a->n; i += a->step) {
        ssize_t r = a->write_ ? pwrite(a->fd, a->buf, a->len, (off_t)a->offs[i])
                              : pread(a->fd, a->buf, a->len, (off_t)a->offs[i]);
        if (r < 0 && errno == EINTR) {
            i -= a->step;
            continue;
        }
        if (r < 0) {
            a->r = -errno;
            break;
        }
    }
    return NULL;
}

long bd_prw_threads(int fd, uint8_t *bufs, uint64_t len, const uint64_t *offsets, uint64_t n,
                    int write_, uint32_t threads)
{
    pthread_t t[16];
    struct prw_arg a[16];
    uint32_t started = 0;
    long r = (long)n;
    if (threads < 1 || threads > 16)
        return -EINVAL;
    for (uint32_t k = 0; k < threads; k++) {
        a[k] = (struct prw_arg){fd, bufs + k * len, len, offsets + k, k < n ? n - k : 0, threads,
                                write_, 0};
        if (k && pthread_create(&t[k], NULL, prw_thread, &a[k])) {
            r = -EAGAIN;
            break;
        }
        started = k + 1;
    }
    if (started)
        prw_thread(&a[0]);      /* this thread is thread 0 */
    for (uint32_t k = 1; k < started; k++)
        pthread_join(t[k], NULL);
    for (uint32_t k = 0; k < started && r >= 0; k++)
        if (a[k].r < 0)
            r = a[k].r;
    return r;
}

/* The QD1 wake-up reference: `n` round trips between this thread and a
 * second one, a kick one way and an "interrupt" back, as between the driver
 * and pyvmm's I/O thread.  Returns the nanoseconds per round trip (after
 * `n / 10` untimed ones, so both threads are running and their stacks and
 * the kernel's wait queues warm), or -errno.  A request at queue depth 1
 * through any two-thread path costs at least this plus the I/O.
 *
 * mech: PP_EVENTFD  two eventfds, each side sleeping in poll() (what the
 *                   driver and the I/O loop do: irqfd/ioeventfd are eventfds);
 *       PP_FUTEX    one shared word per direction, FUTEX_WAIT / FUTEX_WAKE
 *                   (the cheapest blocking hand-off Linux has);
 *       PP_PIPE     two pipes, blocking read()/write();
 *       PP_SPIN     the same shared words, each side spinning (never
 *                   sleeps): the cost of the hand-off itself without a
 *                   wake-up, i.e. what polling on both sides buys (only
 *                   with PP_PIN_APART: two spinners sharing a CPU, under
 *                   SCHED_FIFO above all, would wait for each other).
 * pin:  PP_PIN_NONE the threads go where the scheduler puts them (as the
 *                   device runs: pyvmm pins neither its I/O thread nor a vCPU);
 *       PP_PIN_APART this thread on CPU 0, the peer on CPU 1;
 *       PP_PIN_SAME  both on CPU 0 (a wake-up is a local context switch,
 *                   no inter-processor interrupt).
 * The caller's CPU affinity is restored before returning. */
enum { PP_EVENTFD, PP_FUTEX, PP_PIPE, PP_SPIN };
enum { PP_PIN_NONE, PP_PIN_APART, PP_PIN_SAME };

struct pp {
    int mech, pin;
    int a, b;                   /* eventfds, or the read ends of the pipes */
    int aw, bw;                 /* pipes: the write ends */
    long n;
    uint32_t fa, fb;            /* futex / spin words: "a kick is waiting", "a reply is waiting" */
    int err;
};

static int pp_pin(int cpu)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    CPU_SET(cpu, &set);
    return sched_setaffinity(0, sizeof(set), &set) ? -errno : 0;
}

static int pp_wait(struct pp *p, int which)
{
    int fd = which ? p->b : p->a;
    uint32_t *w = which ? &p->fb : &p->fa;
    uint64_t v;
    switch (p->mech) {
    case PP_EVENTFD: {
        struct pollfd q = {.fd = fd, .events = POLLIN};
        for (;;) {
            int k = poll(&q, 1, 10000);
            if (k > 0)
                break;
            if (k == 0)
                return -ETIMEDOUT;
            if (errno != EINTR)
                return -errno;
        }
        return read(fd, &v, 8) == 8 ? 0 : -errno;
    }
    case PP_PIPE: {
        char c;
        ssize_t r;
        while ((r = read(fd, &c, 1)) < 0 && errno == EINTR)
            ;
        return r == 1 ? 0 : -EIO;
    }
    case PP_FUTEX:
        while (!__atomic_exchange_n(w, 0, __ATOMIC_ACQUIRE))
            if (syscall(SYS_futex, w, FUTEX_WAIT_PRIVATE, 0, NULL, NULL, 0) < 0 &&
                errno != EAGAIN && errno != EINTR)
                return -errno;
        return 0;
    default: {  /* PP_SPIN: give up after 1 s (the peer is not running) */
        uint64_t end = 0;
        for (uint32_t k = 1; !__atomic_exchange_n(w, 0, __ATOMIC_ACQUIRE); k++) {
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
            if (!(k & 0xffff)) {
                uint64_t now = mono_ns();
                if (!end)
                    end = now + 1000000000u;
                else if (now > end)
                    return -ETIMEDOUT;
            }
        }
        return 0;
    }
    }
}

static int pp_signal(struct pp *p, int which)
{
    uint64_t one = 1;
    uint32_t *w = which ? &p->fb : &p->fa;
    switch (p->mech) {
    case PP_EVENTFD:
        return write(which ? p->b : p->a, &one, 8) == 8 ? 0 : -errno;
    case PP_PIPE:
        return write(which ? p->bw : p->aw, "k", 1) == 1 ? 0 : -errno;
    case PP_FUTEX:
        __atomic_store_n(w, 1, __ATOMIC_RELEASE);
        return syscall(SYS_futex, w, FUTEX_WAKE_PRIVATE, 1, NULL, NULL, 0) < 0 ? -errno : 0;
    default:
        __atomic_store_n(w, 1, __ATOMIC_RELEASE);
        return 0;
    }
}

static void *pp_peer(void *arg)
{
    struct pp *p = arg;
    int e = p->pin == PP_PIN_APART ? pp_pin(1) : p->pin == PP_PIN_SAME ? pp_pin(0) : 0;
    for (long i = 0; i < p->n && !e; i++)
        if ((e = pp_wait(p, 0)) == 0)
            e = pp_signal(p, 1);
    p->err = e;
    return NULL;
}

long bd_pingpong2(long n, int mech, int pin)
{
    struct pp p = {.mech = mech, .pin = pin, .a = -1, .b = -1, .aw = -1, .bw = -1};
    long warm = n / 10, r = 0;
    cpu_set_t saved;
    pthread_t t;
    int fds[4] = {-1, -1, -1, -1};
    if (n < 1 || mech < PP_EVENTFD || mech > PP_SPIN || pin < PP_PIN_NONE || pin > PP_PIN_SAME ||
        (mech == PP_SPIN && pin != PP_PIN_APART))
        return -EINVAL;
    if (pin == PP_PIN_APART && sysconf(_SC_NPROCESSORS_ONLN) < 2)
        return -EINVAL;
    if (sched_getaffinity(0, sizeof(saved), &saved))
        return -errno;
    if (mech == PP_EVENTFD) {
        p.a = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        p.b = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (p.a < 0 || p.b < 0)
            r = -EIO;
    } else if (mech == PP_PIPE) {
        if (pipe2(fds, O_CLOEXEC) || pipe2(fds + 2, O_CLOEXEC))
            r = -EIO;
        p.a = fds[0], p.aw = fds[1], p.b = fds[2], p.bw = fds[3];
    }
    p.n = n + warm;
    if (!r && pin != PP_PIN_NONE)
        r = pp_pin(0);
    if (!r && pthread_create(&t, NULL, pp_peer, &p))
        r = -EAGAIN;
    if (r)
        goto out;
    struct timespec t0 = {0}, t1;
    for (long i = 0; i < n + warm && r == 0; i++) {
        if (i == warm)
            clock_gettime(CLOCK_MONOTONIC, &t0);
        if ((r = pp_signal(&p, 0)) == 0)
            r = pp_wait(&p, 1);
    }
    clock_gettime(CLOCK_MONOTONIC, &t1);
    if (r) {                    /* let the peer out of its wait */
        p.n = 0;
        pp_signal(&p, 0);
    }
    pthread_join(t, NULL);
    if (r == 0 && p.err)
        r = p.err;
    if (r == 0)
        r = ((t1.tv_sec - t0.tv_sec) * 1000000000L + (t1.tv_nsec - t0.tv_nsec)) / n;
out:
    sched_setaffinity(0, sizeof(saved), &saved);
    for (int k = 0; k < 4; k++)
        if (fds[k] >= 0)
            close(fds[k]);
    if (mech == PP_EVENTFD) {
        if (p.a >= 0)
            close(p.a);
        if (p.b >= 0)
            close(p.b);
    }
    return r;
}

/* The I/O thread's fast path: see native/include/pyvmm_fast.h and
 * vmm/virtio/fastpath.py.
 *
 * pv_fast_wait() is called by IoLoop._run with the GIL released (cffi drops
 * it around every call).  It sleeps in epoll_wait on the loop's own epoll
 * (the one Python registered every fd with, data.fd = the fd) and services
 * the fds it knows as fast queues itself: read the notify eventfd, run the
 * virtio-blk engine over the ring (budgeted, as from Python), raise the
 * interrupt.  Any other ready fd (the loop's wake eventfd for pause/stop/
 * call_soon, a tap, a timer, a disabled fast queue) ends the call: its fd
 * is handed back to Python, which runs the fd's Python handler.
 *
 * Handshake with Python (pv_fast_disable): the fast path sets `busy` then
 * checks `enabled`; Python clears `enabled` then waits for `busy` to drop,
 * both sequentially consistent, so once pv_fast_disable() returns the fast
 * path no longer touches the ring, the engine or the interrupt, and Python
 * may change or free them (reset, fault/limiter/tracing configuration,
 * DEVICE_NEEDS_RESET, close). */
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <sys/epoll.h>
#include <time.h>
#include <unistd.h>

#include "pyvmm_native.h"

#define MAX_EVENTS 32

static void poke(int fd)
{
    uint64_t one = 1;
    /* EAGAIN: the counter is saturated, the fd is readable anyway */
    while (write(fd, &one, 8) < 0 && errno == EINTR)
        ;
}

static void drain(int fd)
{
    uint64_t v;
    while (read(fd, &v, 8) < 0 && errno == EINTR)
        ;
}

void pv_fast_enable(struct pv_fast_queue *q)
{
    q->error = 0;
    __atomic_store_n(&q->enabled, 1, __ATOMIC_SEQ_CST);
}

void pv_fast_disable(struct pv_fast_queue *q)
{
    __atomic_store_n(&q->enabled, 0, __ATOMIC_SEQ_CST);
    /* at most one budgeted engine call (plus a bounded poll) to wait for;
     * a call stuck in a slow fdatasync sleeps us instead of spinning (the
     * Python path blocked on the transport's lock the same way) */
    for (unsigned spins = 0; __atomic_load_n(&q->busy, __ATOMIC_SEQ_CST); spins++) {
        if (spins < 1000) {
            sched_yield();
        } else {
            struct timespec ts = {0, 200000};
            nanosleep(&ts, NULL);
        }
    }
}

uint32_t pv_fast_isr_take(struct pv_fast_irq *irq)
{
    return __atomic_exchange_n(&irq->isr, 0, __ATOMIC_SEQ_CST);
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

#define POLL_MIN_NS 4000u

/* QEMU's adaptive polling (util/aio-posix.c, poll-max-ns): the window
 * starts at 0, doubles (from 4 us) whenever the thread slept for less than
 * the maximum (a longer poll would have caught the kick without a sleep),
 * halves when a poll found nothing or the sleep was longer than the
 * maximum; poll_us is the maximum (0: never poll).  So a device that is
 * kicked rarely never spins, and one that is kicked back to back polls. */
static uint64_t adapt_poll(struct pv_fast_queue *q)
{
    uint64_t max = (uint64_t)q->poll_us * 1000u;
    if (!max) {
        q->poll_ns = 0;
        return 0;
    }
    if (q->idle_since) {
        uint64_t slept = now_ns() - q->idle_since;
        if (slept < max)
            q->poll_ns = q->poll_ns ? q->poll_ns * 2 : POLL_MIN_NS;
        else
            q->poll_ns /= 2;
        if (q->poll_ns > max)
            q->poll_ns = max;
        if (q->poll_ns < POLL_MIN_NS / 2)
            q->poll_ns = 0;
    }
    return q->poll_ns;
}

/* One kick of one queue.  Returns 1 if handled here, 0 if Python must run
 * the fd's handler (the queue is disabled, or its engine just failed).
 *
 * SAFETY: q->vq, q->blk, q->chain and q->irq are valid while `enabled` is
 * set and `busy` is held (see the handshake above), and so is q->irq->fd:
 * with MSI-X it is the queue's vector's irqfd, which Python only hands over
 * while that vector is live (enabled, unmasked, routed) and changes only
 * after pv_fast_disable(), so no message goes out on a masked vector; every guest address the
 * engine reads from the ring is range-checked by pv_vq_pop() against the
 * pv_mem regions (native/src/virtq.c), so a hostile ring can break the
 * queue (error) but never make us touch memory outside guest RAM. */
int pv_fast_handle(struct pv_fast_queue *q)
{
    __atomic_store_n(&q->busy, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&q->enabled, __ATOMIC_SEQ_CST)) {
        __atomic_store_n(&q->busy, 0, __ATOMIC_SEQ_CST);
        return 0;
    }
    struct pv_blk_result res;
    drain(q->notify_fd);
    q->kicks++;
    int handled = 1;
    uint64_t deadline = 0, poll_ns = adapt_poll(q);
    for (;;) {
        pv_blk_process(q->vq, q->blk, q->chain, &res);
        q->requests += res.completed;
        q->ioerr += res.ioerr;
        if (res.interrupt) {
            /* isr_bit 0: an MSI-X vector's irqfd (modern virtio-pci), which
             * sets no ISR bit for a used buffer (§4.1.4.5) */
            if (q->isr_bit)
                __atomic_fetch_or(&q->irq->isr, q->isr_bit, __ATOMIC_SEQ_CST);
            __atomic_fetch_add(&q->irq->count, 1, __ATOMIC_RELAXED);
            poke(q->irq->fd);
        }
        if (res.error) {
            /* Python reports DEVICE_NEEDS_RESET (it owns the status) */
            q->error = res.error;
            __atomic_store_n(&q->enabled, 0, __ATOMIC_SEQ_CST);
            handled = 0;
            break;
        }
        if (res.more) {
            /* budget spent: come back after the loop's other fds, as the
             * Python path does (level-triggered epoll sees it again) */
            poke(q->notify_fd);
            break;
        }
        /* adaptive polling (QEMU's poll-max-ns): the ring is empty and
         * notifications are re-enabled; look at avail.idx for a little
         * while before sleeping, bounded by poll_us, so a busy driver's next
         * request is taken without a thread wake-up and an idle device
         * sleeps after at most poll_us */
        if (!poll_ns)
            break;
        if (!deadline)
            deadline = now_ns() + poll_ns;
        int found = 0;
        while (now_ns() < deadline) {
            if (pv_vq_avail_idx(q->vq) != q->vq->last_avail) {
                found = 1;
                break;
            }
#if defined(__x86_64__) || defined(__i386__)
            __builtin_ia32_pause();
#endif
        }
        if (!found) {
            /* the window ran out: polling was wasted this time */
            q->poll_ns = q->poll_ns / 2 < POLL_MIN_NS ? 0 : q->poll_ns / 2;
            break;
        }
        q->polled++;
        deadline = 0;
    }
    if (q->poll_us)
        q->idle_since = now_ns();
    __atomic_store_n(&q->busy, 0, __ATOMIC_SEQ_CST);
    return handled;
}

static struct pv_fast_queue *lookup(struct pv_fast_loop *l, int fd)
{
    uint32_t n = __atomic_load_n(&l->n, __ATOMIC_ACQUIRE);
    for (uint32_t i = 0; i < n && i < PV_FAST_MAX; i++)
        if (__atomic_load_n(&l->fds[i], __ATOMIC_ACQUIRE) == fd)
            return __atomic_load_n(&l->q[i], __ATOMIC_ACQUIRE);
    return NULL;
}

/* Wait for and service fast fds until some fd needs Python; returns how
 * many fds were written to `out` (at most max_out; an fd not returned stays
 * readable and is seen by the next wait), or -errno (EINTR: call again).
 *
 * SAFETY: the pv_fast_queue structs the table points to are kept alive by
 * the Python IoLoop for as long as it exists (never freed while a wait may
 * run); everything else is guarded by pv_fast_handle's handshake. */
int pv_fast_wait(struct pv_fast_loop *l, int32_t *out, int max_out)
{
    struct epoll_event ev[MAX_EVENTS];
    if (max_out > MAX_EVENTS)
        max_out = MAX_EVENTS;
    for (;;) {
        int n = epoll_wait(l->epfd, ev, max_out, -1);
        if (n < 0)
            return -errno;
        l->wakeups++;
        int k = 0;
        for (int i = 0; i < n; i++) {
            int fd = ev[i].data.fd;
            struct pv_fast_queue *q = lookup(l, fd);
            if (q && pv_fast_handle(q)) {
                l->handled++;
                continue;
            }
            out[k++] = fd;
        }
        if (k)
            return k;
    }
}

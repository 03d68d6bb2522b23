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
#define _GNU_SOURCE              /* RUSAGE_THREAD */
#include <errno.h>
#include <sched.h>
#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <time.h>
#include <unistd.h>

#include "pyvmm_native.h"
#include "fast_int.h"

#define MAX_EVENTS 32

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

/* QEMU's adaptive polling (util/aio-posix.c adjust_polling_time, with its
 * default poll-grow and poll-shrink): `blocked` is how long the thread
 * waited for this kick, from the moment the ring ran empty (the poll
 * window included).  Waited longer than poll_us: polling could not have
 * caught it, the window goes back to 0.  Waited less, and the window is
 * below poll_us: a longer poll would have caught it, the window doubles
 * (from 4 us), up to poll_us.  A kick caught by the poll itself never
 * sleeps and leaves the window as it is.  So a device that is kicked
 * rarely never spins, and one whose driver comes back within poll_us
 * polls just long enough.  (Halving the window on every poll that found
 * nothing, as this code did before, kept it at 2-4 us when the driver's
 * turnaround was 20-40 us: it never caught one and burned ~1 us a
 * request.) */
static uint64_t adapt_poll(struct pv_fast_queue *q)
{
    uint64_t max = (uint64_t)q->poll_us * 1000u;
    if (!max) {
        q->poll_ns = 0;
        return 0;
    }
    if (q->idle_since) {
        uint64_t blocked = now_ns() - q->idle_since;
        if (blocked > max)
            q->poll_ns = 0;
        else if (q->poll_ns < max)
            q->poll_ns = q->poll_ns ? q->poll_ns * 2 : POLL_MIN_NS;
        if (q->poll_ns > max)
            q->poll_ns = max;
    }
    return q->poll_ns;
}

#define CONTENDED_NS 10000000u      /* no polling for 10 ms after a preemption */

/* Is this thread competing for its core?  The user-space stand-in for the
 * single_task_running() test KVM's halt-polling makes: polling on a core
 * another runnable thread wants (the guest's vCPU above all, on a host with
 * fewer cores than busy threads) only delays that thread, and a yield then
 * costs this one a turn in the run queue.  Measured at load 8 on 2 cores:
 * the I/O thread is preempted ~30k times/s and polling made QD1 slower.
 * So: any involuntary context switch of this thread (a preemption, or a
 * yield that gave the core away) turns polling off for CONTENDED_NS; the
 * switches counted meanwhile renew it, so a loaded host never polls. */
static int contended(struct pv_fast_queue *q)
{
    struct rusage ru;
    if (q->poll_always)
        return 0;
    uint64_t now = now_ns();
    if (now < q->contended_until)
        return 1;               /* (no system call while polling is off) */
    if (getrusage(RUSAGE_THREAD, &ru) < 0)
        return 0;
    uint64_t n = (uint64_t)ru.ru_nivcsw;
    if (n != q->nivcsw) {
        if (q->nivcsw)
            q->contended_until = now + CONTENDED_NS;
        q->nivcsw = n;
    }
    return now < q->contended_until;
}

/* An early interrupt (see serve() below) if the driver has re-armed and
 * vring_need_event says so: for the io_uring engine's pass (fasturing.c).
 * SAFETY: as serve()'s. */
void pv_fast_early(struct pv_fast_queue *q)
{
    if (pv_driver_rearmed(q->vq) && pv_vq_need_interrupt(q->vq)) {
        pv_fast_raise_irq(q);
        q->early++;
    }
}

/* One budgeted pass over the ring: pv_blk_process()'s loop (native/src/
 * blk.c; both serve a chain with pv_blk_complete), with two differences
 * that keep the I/O thread and the driver working at the same time
 * instead of taking turns:
 *
 * - Early interrupts (EVENT_IDX only).  pv_blk_process decides on the
 *   interrupt once, after the pass, so the driver refills only when the
 *   ring has run dry and the device then sleeps until it does: at QD32
 *   one wake-up each way per 32 requests, with neither thread overlapping
 *   the other (measured: 1 kick and 1 interrupt per 32 requests, 0.6 CPUs
 *   busy on 2).  Here, once no more than a quarter of the most requests
 *   seen waiting in this pass are left, each completion asks
 *   vring_need_event (§2.6.7.2: has used.idx crossed the driver's
 *   used_event?), so the driver is woken while the device still has work,
 *   and refills before the ring is empty (or while the device polls).
 *   The driver's used_event limits it to one interrupt per time the driver
 *   has caught up; a driver without EVENT_IDX gets one per pass as before
 *   (it asked for no finer control).  A quarter, not a half: each
 *   interrupt that wakes a sleeping driver costs this thread ~5 us in
 *   eventfd_write (perf: 20% of its time at a half, 1 interrupt per 15
 *   requests); at a quarter it is 1 per 32, and 4 KiB reads at QD32 ran 5%
 *   faster (SCHED_FIFO A/B, load 9).
 * - Notifications are not re-armed here: the caller does that once it is
 *   about to sleep (pv_fast_handle).  While the device is busy or polling,
 *   avail_event stays where it was, below what the driver publishes, so
 *   the driver's vring_need_event says no kick (§2.6.7.1): no eventfd write
 *   for the driver, no wake-up for this thread.
 *
 * SAFETY: as pv_fast_handle's (the caller holds `busy` on an enabled
 * queue); every guest address comes through pv_vq_pop's range checks. */
static void serve(struct pv_fast_queue *q, struct pv_blk_result *res)
{
    struct pv_vq *vq = q->vq;
    uint32_t budget = q->blk->budget ? q->blk->budget : PV_BLK_BUDGET;
    int early = (vq->flags & PV_VQ_F_EVENT_IDX) != 0;
    uint16_t peak = 0;
    int r;
    memset(res, 0, sizeof(*res));
    while (res->completed < budget && (r = pv_vq_pop(vq, q->chain)) > 0) {
        /* requests still waiting behind this one (at most the queue size:
         * pv_vq_pop checked the index) */
        uint16_t left = (uint16_t)(pv_vq_avail_idx(vq) - vq->last_avail);
        if (left > peak)
            peak = left;
        if ((r = pv_blk_complete(vq, q->blk, q->chain, res)) < 0)
            break;
        if (early && left <= peak / 4 && pv_driver_rearmed(vq) && pv_vq_need_interrupt(vq)) {
            pv_fast_raise_irq(q);
            q->early++;
        }
    }
    if (r < 0)
        res->error = r;
    else if (res->completed >= budget)
        res->more = 1;
    if (res->completed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
}

/* A level INTx on a KVM resample irqfd (vmm/virtio/pci_intx.py): KVM
 * de-asserted the line at the guest's EOI and signalled q->notify_fd; if
 * the ISR still has bits (the shared word the queues OR into, or those
 * Python folded out of it and holds, mirrored in irq->held), assert it
 * again.  A bit OR-ed after these loads comes with its own irqfd write.
 *
 * SAFETY: no guest memory is touched; q->irq and its fd are valid while
 * the entry is enabled and `busy` is held, as for a queue (Python disables
 * it before Interrupt Disable, a reset or close changes them). */
static void resample(struct pv_fast_queue *q)
{
    pv_drain(q->notify_fd);
    q->kicks++;
    if (__atomic_load_n(&q->irq->isr, __ATOMIC_SEQ_CST)
            || __atomic_load_n(&q->irq->held, __ATOMIC_SEQ_CST)) {
        q->requests++;          /* (counts the re-assertions) */
        pv_poke(q->irq->fd);
    }
}

/* One kick of one queue.  Returns 1 if handled here, 0 if Python must run
 * the fd's handler (the queue is disabled, or its engine just failed).
 * Leaves notifications re-armed (or, budget spent, the notify eventfd
 * re-signalled), so whoever serves the queue next, C or Python, is kicked.
 *
 * SAFETY: q->vq, q->blk, q->chain and q->irq are valid while `enabled` is
 * set and `busy` is held (see the handshake above), and so is q->irq->fd:
 * with MSI-X it is the queue's vector's irqfd, which Python only hands over
 * while that vector is live (enabled, unmasked, routed) and changes only
 * after pv_fast_disable(), so no message goes out on a masked vector (legacy
 * virtio-pci: its INTx resample irqfd's trigger eventfd, closed only after
 * pv_fast_disable(), and the queues are disabled while the guest has set
 * Interrupt Disable); every guest address the
 * engine reads from the ring is range-checked by pv_vq_pop() against the
 * pv_mem regions (native/src/virtq.c), so a hostile ring can break the
 * queue (error) but never make us touch memory outside guest RAM. */
int pv_fast_handle(struct pv_fast_queue *q)
{
    return pv_fast_handle_fd(q, q->notify_fd);
}

/* pv_fast_handle for a ready `fd` of the queue: its notify eventfd (a kick)
 * or, io_uring engine, its completion eventfd (drained, counted as no kick). */
int pv_fast_handle_fd(struct pv_fast_queue *q, int fd)
{
    __atomic_store_n(&q->busy, 1, __ATOMIC_SEQ_CST);
    if (!__atomic_load_n(&q->enabled, __ATOMIC_SEQ_CST)) {
        __atomic_store_n(&q->busy, 0, __ATOMIC_SEQ_CST);
        return 0;
    }
    if (q->kind != PV_FAST_BLK || q->resample) {
        /* virtio-net (native/src/fastnet.c) or a legacy INTx resample */
        int handled = 1;
        if (q->kind != PV_FAST_BLK)
            handled = pv_fastnet_serve(q);
        else
            resample(q);
        __atomic_store_n(&q->busy, 0, __ATOMIC_SEQ_CST);
        return handled;
    }
    struct pv_blk_result res;
    pv_drain(fd);
    q->kicks += fd == q->notify_fd;
    int handled = 1;
    uint32_t budget = q->blk->budget ? q->blk->budget : PV_BLK_BUDGET, total = 0;
    uint64_t deadline = 0, poll_ns = adapt_poll(q);
    for (;;) {
        if (q->uring)
            pv_fast_uring_serve(q, &res);
        else
            serve(q, &res);
        total += res.completed;
        q->requests += res.completed;
        q->ioerr += res.ioerr;
        if (res.interrupt)
            pv_fast_raise_irq(q);
        if (res.error) {
            /* Python reports DEVICE_NEEDS_RESET (it owns the status) */
            q->error = res.error;
            __atomic_store_n(&q->enabled, 0, __ATOMIC_SEQ_CST);
            handled = 0;
            break;
        }
        if (res.more || total >= budget) {
            /* budget spent (in this pass, or in passes joined by polling):
             * come back after the loop's other fds (pause, stop, other
             * devices), as the Python path does (level-triggered epoll sees
             * it again); the next call re-arms if the ring is empty */
            pv_poke(q->notify_fd);
            break;
        }
        /* adaptive polling (QEMU's poll-max-ns): the ring is empty and,
         * notifications not yet re-armed, the driver does not kick; look
         * at avail.idx for a little while before sleeping, bounded by
         * poll_us, so a busy driver's next request is taken without a kick
         * or a thread wake-up, and an idle device sleeps after at most
         * poll_us */
        if (poll_ns && !deadline && contended(q)) {
            q->poll_skipped++;
            poll_ns = 0;
        }
        if (poll_ns) {
            if (!deadline) {
                q->idle_since = now_ns();   /* the wait starts here (adapt_poll) */
                deadline = q->idle_since + poll_ns;
            }
            int found = 0;
            for (unsigned spins = 1; now_ns() < deadline; spins++) {
                if (pv_vq_avail_idx(q->vq) != q->vq->last_avail ||
                    (q->uring && pv_fast_uring_ready(q))) {
                    found = 1;
                    break;
                }
#if defined(__x86_64__) || defined(__i386__)
                __builtin_ia32_pause();
#endif
                /* now and then a yield: should another thread want this
                 * core after all (contended() looked before the window),
                 * it gets it, and the switch ends polling for a while */
                if (!(spins % 64))
                    sched_yield();
            }
            if (found) {
                q->polled++;
                deadline = 0;
                continue;
            }
            poll_ns = 0;        /* the window ran out: adapt_poll decides at the next kick */
        }
        /* about to sleep: ask for a kick for the next request (§2.6.7.1),
         * then look once more, for one published just before */
        if (!pv_vq_enable_notify(q->vq))
            break;
    }
    if (q->poll_us && !deadline)
        q->idle_since = now_ns();   /* no poll this time: the wait starts now */
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
            if (q && pv_fast_handle_fd(q, fd)) {
                l->handled++;
                continue;
            }
            out[k++] = fd;
        }
        if (k)
            return k;
    }
}

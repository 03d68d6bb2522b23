/* libFuzzer target: the I/O loop's C fast path (native/src/fastpath.c):
 * pv_fast_handle() on a virtio-blk queue, with real notify and interrupt
 * eventfds, driven by the same guest inputs as fuzz_blk.c (byte layout:
 * fuzz_blk.c's; byte 15 bit0: the queue starts disabled, as Python leaves
 * it while the slow path runs; bit1: adaptive polling of 1 us on; bit2: the
 * interrupt is an MSI-X vector's irqfd, isr_bit 0: the ISR must stay 0;
 * bit3: the io_uring engine, native/src/fasturing.c, whose completions of
 * requests still in flight are served on its eventfd after each kick;
 * the kernel finishes them first, as fuzz_uring.c's, unless bit4 asks for
 * the free-running ring: fuzz_settle.h).
 * Invariants, besides fuzz_common.h's pop/push tracking and fuzz_blk's
 * memory checks:
 * - a disabled queue is not touched: no request, no eventfd read, returns 0;
 * - an enabled one: every kick drains the notify eventfd; used.idx moves
 *   by exactly the requests counted; the interrupt eventfd is written once
 *   per counted interrupt, each with the ISR bit set (none with MSI-X);
 * - a malformed ring: error recorded, queue disabled, returns 0 (Python
 *   takes over) and later kicks do nothing;
 * - at most the budget per kick (plus polled work), with the notify
 *   eventfd re-signalled when the budget ran out;
 * - the image never changes size;
 * - io_uring: nothing in flight once the completion eventfd was served (or,
 *   queue disabled, Python's waiting reap ran), none at the end. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <sys/stat.h>
#include <sys/eventfd.h>
#include <unistd.h>

#define FZ_TRACK_ENGINE
#include "fuzz_common.h"
#include "fuzz_image.h"
#include "fuzz_settle.h"

#define MAX_KICKS 8

static struct pv_chain chain;
static struct pv_blk blk;

static int notify_fd = -1, irq_fd = -1, done_fd = -1;
static struct pv_uring *ring;         /* 1024 entries: any queue's heads fit */

static uint64_t take_fd(int fd)
{
    uint64_t v = 0;
    if (read(fd, &v, 8) != 8)
        return 0;
    return v;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pv_vq vq;
    struct fz_in in;
    struct pv_fast_irq irq;
    struct pv_fast_queue q;

    open_image();
    reset_image();
    if (notify_fd < 0) {
        notify_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        irq_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        done_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (notify_fd < 0 || irq_fd < 0 || done_fd < 0) {
            perror("fuzz: eventfd");
            abort();
        }
    }
    take_fd(notify_fd);
    take_fd(irq_fd);
    take_fd(done_fd);
    fz_load_mem(data, size);
    fz_track_reset();
    fz_tr.status_last = 1;
    if (fz_setup_vq(&vq, data, size) < 0)
        return 0;
    uint32_t mode = (uint32_t)fz_hdr(data, size, 15, 1);
    uint32_t budget = fz_blk_from_header(&blk, data, size);

    memset(&irq, 0, sizeof(irq));
    irq.fd = irq_fd;
    memset(&q, 0, sizeof(q));
    q.notify_fd = notify_fd;
    q.vq = &vq;
    q.blk = &blk;
    q.chain = &chain;
    q.irq = &irq;
    q.isr_bit = mode & 4 ? 0 : 1;    /* 0: an MSI-X vector's irqfd (no ISR bit) */
    q.poll_us = mode & 2 ? 1 : 0;
    if (mode & 8) {
        int err;
        if (!ring && !(ring = pv_uring_new(1024, done_fd, &err))) {
            fprintf(stderr, "fuzz_fast: no io_uring here (errno %d)\n", err);
            abort();
        }
        q.uring = ring;
    }
    if (!(mode & 1))
        pv_fast_enable(&q);

    fz_ops_init(&in, data, size);
    hook_in = &in;
    pv_blk_seg_hook = seg_hook;
    for (int kick = 0; kick < MAX_KICKS && fz_ops_left(&in); kick++) {
        uint8_t op = (uint8_t)fz_take(&in, 1);
        if (op & 1) {
            fz_op_guest_write(&in);
            continue;
        }
        if (op & 2) {               /* Python toggles the queue */
            if (q.enabled)
                pv_fast_disable(&q);
            else if (!q.error)
                pv_fast_enable(&q);
            continue;
        }
        uint16_t from = vq.used_idx;
        uint64_t req0 = q.requests, irq0 = irq.count, kicks0 = q.kicks;
        int was = (int)q.enabled, broken = vq.broken;
        uint64_t one = 1;
        FZ_CHECK(write(notify_fd, &one, 8) == 8, "kick");
        fz_tr.call_pops = 0;
        fz_tr.pop_limit = q.poll_us ? 0 : budget;
        int handled = pv_fast_handle(&q);
        fz_tr.pop_limit = 0;
        if (q.uring && !(mode & 0x10))
            fz_uring_settle(ring, q.error != 0);
        uint32_t pydone = 0;             /* reaped by "Python" (the queue is off) */
        int async = q.uring && pv_uring_inflight(ring);
        if (q.uring && pv_uring_inflight(ring)) {
            /* requests in flight: their completion wakes the loop, which
             * serves the queue on the eventfd (or Python reaps: disabled).
             * Settled, every one of them has its CQE posted by now, so the
             * signal is due at once (the completing thread writes it right
             * after); free-running, it waits for the kernel too */
            struct pollfd pfd = {.fd = done_fd, .events = POLLIN};
            FZ_CHECK(poll(&pfd, 1, 10000) == 1, "no completion eventfd signal: %u in flight, "
                     "%u CQEs posted", pv_uring_inflight(ring), fz_uring_ready(ring));
            if (q.enabled) {
                fz_tr.call_pops = 0;            /* a pass of its own, budgeted */
                fz_tr.pop_limit = q.poll_us ? 0 : budget;
                int h = pv_fast_handle_fd(&q, done_fd);
                fz_tr.pop_limit = 0;
                if (!(mode & 0x10))
                    fz_uring_settle(ring, q.error != 0);
                /* handed back only when that pass found the ring broken */
                FZ_CHECK(h == 1 || (vq.broken && !q.enabled && q.error), "completion handed back");
                handled = handled && h;
            }
            if (!q.enabled && pv_uring_inflight(ring)) {
                struct pv_blk_result res;
                take_fd(done_fd);
                pv_blk_uring_reap(&vq, &blk, ring, 1, &res);
                pydone = res.completed;
            }
            FZ_CHECK(!pv_uring_inflight(ring) || q.enabled, "%u in flight after a waiting reap",
                     pv_uring_inflight(ring));
        }
        uint32_t done = (uint32_t)(q.requests - req0);
        FZ_CHECK(!q.busy, "busy left set");
        FZ_CHECK(image_size() == IMG_SECTORS * 512, "image grew to %lld bytes",
                 (long long)image_size());
        fz_allow_used(&vq, from, done + pydone);
        fz_allow_avail_event(&vq);
        uint64_t irqs = take_fd(irq_fd);
        FZ_CHECK(irqs == irq.count - irq0, "irq eventfd %llu vs counted %llu",
                 (unsigned long long)irqs, (unsigned long long)(irq.count - irq0));
        uint32_t isr = pv_fast_isr_take(&irq);
        if (q.isr_bit)
            FZ_CHECK(!!isr == !!irqs && (isr & ~1u) == 0, "isr 0x%x irqs %llu", isr,
                     (unsigned long long)irqs);
        else
            FZ_CHECK(isr == 0, "MSI-X queue set ISR 0x%x", isr);
        uint64_t rekick = take_fd(notify_fd);
        if (!was) {
            FZ_CHECK(!handled && done == 0 && q.kicks == kicks0 && rekick == 1,
                     "disabled queue touched");
            continue;
        }
        FZ_CHECK(q.kicks == kicks0 + 1, "kicks");
        if (broken)
            FZ_CHECK(done == 0, "broken queue processed requests");
        if (vq.broken) {
            FZ_CHECK(!handled && q.error == -(int)vq.broken && !q.enabled,
                     "error %d broken %u enabled %u handled %d", q.error, vq.broken,
                     q.enabled, handled);
            continue;
        }
        FZ_CHECK(handled, "healthy queue handed back");
        if (q.uring) {
            /* completions of earlier kicks count here too, and a pass
             * budgets what it pops: only "the ring is empty unless the
             * budget ran out" holds, and only when nothing completed after
             * the pass (an in-flight read may land on the ring itself) */
            if (!rekick && !async)
                FZ_CHECK(pv_vq_avail_idx(&vq) == vq.last_avail, "kick left requests behind");
        } else if (!q.poll_us) {
            FZ_CHECK(done <= budget, "done %u budget %u", done, budget);
            FZ_CHECK(rekick == (done == budget), "re-kick %llu done %u budget %u",
                     (unsigned long long)rekick, done, budget);
            if (done < budget)
                FZ_CHECK(pv_vq_avail_idx(&vq) == vq.last_avail, "kick left requests behind");
        }
    }
    pv_blk_seg_hook = NULL;
    hook_in = NULL;
    if (q.uring) {          /* what is still in flight completes (Python's finish) */
        struct pv_blk_result res;
        uint16_t from = vq.used_idx;
        pv_blk_uring_reap(&vq, &blk, ring, 1, &res);
        fz_allow_used(&vq, from, res.completed);
        FZ_CHECK(pv_uring_inflight(ring) == 0, "%u in flight at the end", pv_uring_inflight(ring));
        take_fd(done_fd);
    }
    fz_track_check_mem();
    return 0;
}

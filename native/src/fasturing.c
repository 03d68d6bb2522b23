/* The io_uring disk engine on the I/O loop's C fast path (io_engine=io_uring
 * with native/src/fastpath.c): the same ring and slots as the Python-driven
 * engine (native/src/uring.c, vmm/virtio/blk_uring.py), served in C.
 *
 * A pass (pv_fast_uring_serve, called by pv_fast_handle in place of the sync
 * engine's serve()) first reaps what completed since the last one, then pops
 * the available chains in batches of up to URING_BATCH, hands each batch to
 * the kernel with one io_uring_enter and reaps at once what completed inside
 * it (page-cache hits do), pushing used elements as the CQEs come.  Requests
 * still in flight complete later: the ring's completion eventfd is in the
 * loop's epoll set, mapped to the same queue (vmm/virtio/blk_uring.py
 * attach_fast), so its wake-up runs the next pass.  While the queue is off
 * the fast path the eventfd's Python handler reaps instead: the ring's state
 * lives in struct pv_uring, shared by both, so nothing is in flight that
 * either side does not know about.
 *
 * Interrupts follow the sync engine's rules (fastpath.c serve()): with
 * EVENT_IDX an early interrupt once no more than a quarter of the requests
 * seen in the pass are left (waiting in the ring or in flight), else one per
 * pass if pv_vq_need_interrupt says so.  Flush ordering is the engine's
 * (IOSQE_IO_DRAIN: uring.c pv_uring_prep), short transfers and errors too
 * (pv_uring_complete). */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "uring_int.h"

/* Chains popped per io_uring_enter.  Larger batches mean fewer system calls;
 * smaller ones let completions (and so the early interrupt that wakes the
 * driver) start before the whole ring is read. */
#define URING_BATCH 8

int pv_fast_uring_ready(const struct pv_fast_queue *q)
{
    const struct pv_uring *u = q->uring;
    return *u->cq_head != __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
}

/* requests of this pass not yet completed: waiting in the ring or in flight */
static uint32_t pending(struct pv_vq *vq, struct pv_uring *u)
{
    return (uint16_t)(pv_vq_avail_idx(vq) - vq->last_avail) + u->inflight;
}

/* the early-interrupt rule, checked after each completion (reap below) */
struct reap_ctx {
    struct pv_fast_queue *q;
    uint32_t *peak;
};

static void after_one(void *arg)
{
    struct reap_ctx *c = arg;
    if (pending(c->q->vq, c->q->uring) <= *c->peak / 4)
        pv_fast_early(c->q);
}

/* Every CQE posted so far: the request finished (pv_uring_complete), and,
 * with EVENT_IDX, the early-interrupt rule checked after each.
 *
 * SAFETY: pv_uring_reap_each's (uring.c): a CQE whose slot is not busy is
 * not ours and is skipped, so a slot is completed once. */
static void reap(struct pv_fast_queue *q, struct pv_blk_result *res, int early, uint32_t *peak)
{
    struct reap_ctx c = {q, peak};
    pv_uring_reap_each(q->vq, q->blk, q->uring, res, early ? after_one : NULL, &c);
}

/* One budgeted pass (see the top of the file); `res` as serve()'s.
 *
 * SAFETY: the caller (pv_fast_handle) holds `busy` on an enabled queue, so
 * q->vq, q->blk, q->chain and q->uring are valid and Python is not using the
 * ring (vmm/virtio/blk_uring.py takes it only while the queue is disabled);
 * every guest address comes through pv_vq_pop's range checks, and the
 * pointers the kernel writes through stay valid until the request is reaped
 * (guest RAM is unmapped only after the ring is drained: uring.c). */
void pv_fast_uring_serve(struct pv_fast_queue *q, struct pv_blk_result *res)
{
    struct pv_vq *vq = q->vq;
    struct pv_uring *u = q->uring;
    uint32_t budget = q->blk->budget ? q->blk->budget : PV_BLK_BUDGET, taken = 0;
    int early = (vq->flags & PV_VQ_F_EVENT_IDX) != 0;
    uint32_t peak = pending(vq, u);
    int r = 0, submitted = 0;
    memset(res, 0, sizeof(*res));
    reap(q, res, early, &peak);
    for (;;) {
        uint32_t batch = 0;
        while (taken < budget && batch < URING_BATCH && (r = pv_vq_pop(vq, q->chain)) > 0) {
            uint32_t p = pending(vq, u) + 1;
            if (p > peak)
                peak = p;
            taken++;
            batch++;
            if ((r = pv_uring_prep(vq, q->blk, u, q->chain, res)) < 0)
                break;
        }
        /* what was prepared goes in even when the ring just broke: an SQE
         * written but never submitted would be "in flight" for ever (a
         * later waiting reap would sleep on it) */
        if (u->to_submit) {
            int e = pv_uring_flush_sq(u);
            submitted = 1;
            if (e < 0 && r >= 0)
                r = e;
        }
        if (r < 0)
            break;
        reap(q, res, early, &peak);
        if (!batch)
            break;
        if (taken >= budget) {
            res->more = 1;
            break;
        }
    }
    if (r < 0)
        res->error = r;
    /* Inline completions signalled the eventfd too; with nothing in flight
     * that signal can only wake the loop for nothing, so consume it (none
     * can be lost: no completion is pending).  With requests in flight it
     * stays, and the wake-up it causes reaps them or nothing. */
    if (submitted && !u->inflight && u->efd >= 0) {
        uint64_t v;
        while (read(u->efd, &v, sizeof(v)) < 0 && errno == EINTR)
            ;
    }
    if (res->completed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
}

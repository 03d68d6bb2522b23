/* Letting the kernel finish what an io_uring engine handed it, before the
 * next step of an input (fuzz_uring.c, fuzz_fast.c).
 *
 * Requests go to a real io_uring: a page-cache read may complete inside
 * io_uring_enter or a moment later on an io-wq thread (a FLUSH, which goes in
 * with IOSQE_IO_DRAIN, always does, and so does everything after it).  Left
 * alone, which requests a later reap finds finished depends on the host's
 * load, so one input takes different paths from run to run: a report then
 * may not replay, and CI's fuzz pass fails at random.  Settled (the
 * default), the harness waits after each device call until the kernel has
 * posted a completion for every request in flight -- without reaping them:
 * the device still finds them at its next reap, exactly as if the kernel had
 * been fast -- so an input runs the same way every time.  An input can ask
 * for the free-running ring (a header bit) to reach the partial reaps too;
 * the checks hold on either (fuzz_common.h's status check never counts on
 * the kernel's timing).
 *
 * White-box: this reads the ring's private state (native/src/uring_int.h). */
#ifndef FUZZ_SETTLE_H
#define FUZZ_SETTLE_H

#include <errno.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "../src/uring_int.h"

/* CQEs posted and not yet reaped */
static unsigned fz_uring_ready(const struct pv_uring *u)
{
    return __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE) - *u->cq_head;
}

/* Wait until every request the engine holds in flight has its CQE posted
 * (io_uring_enter(2) waits for min_complete CQEs in the ring, reaped or
 * not, so nothing is taken from the device).  An SQE still queued
 * (to_submit) never completes: a device call that returns without an error
 * has handed every one to the kernel (checked here); after an error the
 * ring is left as it is (the final waiting reap submits them). */
static void fz_uring_settle(struct pv_uring *u, int call_failed)
{
    if (u->to_submit) {
        FZ_CHECK(call_failed, "%u SQEs prepared but not handed to the kernel", u->to_submit);
        return;
    }
    while (fz_uring_ready(u) < u->inflight) {
        long r = syscall(__NR_io_uring_enter, u->fd, 0, u->inflight, IORING_ENTER_GETEVENTS,
                         NULL, 0);
        FZ_CHECK(r >= 0 || errno == EINTR || errno == EAGAIN || errno == EBUSY,
                 "io_uring_enter: errno %d", errno);
    }
}

#endif

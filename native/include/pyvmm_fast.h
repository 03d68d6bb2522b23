/* The I/O thread's fast path (native/src/fastpath.c): the epoll wait and the
 * common case of a queue kick (drain the notify eventfd, run the C engine,
 * signal the interrupt eventfd) in C with the GIL released, so a kick costs
 * no Python.  Python keeps everything else: other fds, pause/stop, faults,
 * tracing, limiters, io_uring, errors (a queue returns to Python by being
 * disabled). */
#ifndef PYVMM_FAST_H
#define PYVMM_FAST_H

#include <stdint.h>
#include "pyvmm_virtq.h"
#include "pyvmm_net.h"

struct pv_uring;                     /* native/src/uring.c */

#define PV_FAST_MAX 64               /* fast queues per I/O loop */

/* a transport's interrupt as the fast path raises it: ISR bits OR-ed into
 * `isr` (Python folds them into its interrupt_status), an 8-byte 1 to `fd`
 * (a KVM irqfd) */
struct pv_fast_irq {
    uint32_t isr;
    int32_t fd;
    uint64_t count;                  /* interrupts signalled by the fast path */
    uint32_t held;                   /* level INTx: ISR bits Python holds (pv_fast_handle) */
};

struct pv_fast_queue {
    int32_t notify_fd;
    uint32_t enabled;                /* Python: the fields below are valid */
    uint32_t busy;                   /* the fast path is using them */
    int32_t error;                   /* -PV_VQ_E_* seen (the queue is then disabled) */
    struct pv_vq *vq;
    struct pv_blk *blk;
    struct pv_chain *chain;
    struct pv_fast_irq *irq;
    uint64_t kicks, requests, ioerr; /* counted by the fast path */
    uint32_t isr_bit;                /* bit OR-ed into irq->isr (INT_USED) */
    uint32_t poll_us;                /* adaptive polling: the longest window (0: off) */
    uint64_t polled;                 /* requests found by polling (no kick) */
    uint64_t poll_ns;                /* current adaptive window (<= poll_us) */
    uint64_t idle_since;             /* when the last handle ended (CLOCK_MONOTONIC ns) */
    uint64_t early;                  /* interrupts raised before a pass ended */
    uint64_t poll_skipped;           /* windows not polled: the thread was being preempted */
    uint64_t nivcsw, contended_until;/* the I/O thread's involuntary switches, seen when */
    uint32_t poll_always;            /* poll even then (tests) */
    uint32_t resample;               /* not a queue: notify_fd is a level INTx's KVM
                                      * resample eventfd (only irq is used; kicks counts
                                      * resamples, requests re-assertions) */
    struct pv_uring *uring;          /* io_uring engine (native/src/fasturing.c), or NULL */
    uint32_t kind;                   /* PV_FAST_*: which engine serves this fd */
    struct pv_fast_net *fnet;        /* PV_FAST_NET_*: the queue pair */
};

/* pv_fast_queue.kind: what a ready fd means (native/src/fastnet.c for net) */
#define PV_FAST_BLK 0                /* a virtio-blk queue's notify eventfd */
#define PV_FAST_NET_RX 1             /* a virtio-net receive queue's notify eventfd */
#define PV_FAST_NET_TX 2             /* a virtio-net transmit queue's notify eventfd */
#define PV_FAST_NET_TAP 3            /* a virtio-net queue pair's tap fd is readable */

/* One virtio-net queue pair as its three fast fds share it (rx kick, tx
 * kick, tap).  The tap is in the I/O loop's epoll while the guest has
 * receive buffers; the fast path takes it out when they run out (tap_off)
 * and puts it back once a receive kick brought some, as the Python path
 * does with IoLoop.remove/add (vmm/virtio/net.py _set_polling). */
struct pv_fast_net {
    struct pv_net *net;
    struct pv_vq *rx, *tx;
    struct pv_chain *rx_chain, *tx_chain;
    struct pv_fast_queue *rxq, *txq; /* whose interrupts the frames raise */
    int32_t epfd;                    /* the I/O loop's epoll */
    int32_t tap_fd;
    uint32_t tap_off;                /* the fast path took the tap out of epoll */
    uint32_t early_div;              /* early interrupts at 1/early_div of the ring left (0: off) */
    uint64_t tap_changes;            /* times it did (or put it back) */
    uint64_t early;                  /* interrupts raised before a pass ended */
};

struct pv_fast_loop {
    int32_t epfd;
    uint32_t n;
    int32_t fds[PV_FAST_MAX];        /* -1: free slot */
    struct pv_fast_queue *q[PV_FAST_MAX];
    uint64_t wakeups, handled;
};

int pv_fast_wait(struct pv_fast_loop *l, int32_t *out, int max_out);
void pv_fast_disable(struct pv_fast_queue *q);
void pv_fast_enable(struct pv_fast_queue *q);
uint32_t pv_fast_isr_take(struct pv_fast_irq *irq);
int pv_fast_handle(struct pv_fast_queue *q);
/* fastnet.c for fastpath.c: a net queue's ready fd, enabled and busy held */
int pv_fastnet_serve(struct pv_fast_queue *q);
int pv_fast_handle_fd(struct pv_fast_queue *q, int fd);
/* fastpath.c for fasturing.c */
void pv_fast_early(struct pv_fast_queue *q);
/* the io_uring engine's pass and its "a completion is waiting" (fasturing.c) */
void pv_fast_uring_serve(struct pv_fast_queue *q, struct pv_blk_result *res);
int pv_fast_uring_ready(const struct pv_fast_queue *q);

#endif

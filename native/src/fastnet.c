/* virtio-net on the I/O loop's C fast path (native/src/fastpath.c calls
 * pv_fastnet_serve for a queue whose kind is PV_FAST_NET_*; Python side:
 * vmm/virtio/fastpath.py and NetDevice.fast_engine in vmm/virtio/net.py).
 *
 * A queue pair has three fds in the loop's epoll: the receive queue's
 * notify eventfd, the transmit queue's, and the tap.  Each is one struct
 * pv_fast_queue (same enabled/busy handshake as virtio-blk's, so
 * pv_fast_disable() stops each one), all three pointing at the pair's
 * struct pv_fast_net.  They are served on the one I/O thread, so never two
 * at once; Python disables all three before it touches the pair.
 *
 * - TX kick: drain the eventfd, one budgeted pass of frames to the tap
 *   (native/src/net.c pv_net_tx_frame), the interrupt; budget spent: the
 *   eventfd is re-signalled, so the loop's other fds (pause, stop, the tap,
 *   other devices) come first and the pass continues after (bench/starve.py).
 * - tap readable, or RX kick (buffers came): one budgeted pass of frames
 *   into receive buffers (pv_net_rx_frame, MRG_RXBUF held frames included),
 *   the interrupt.  Out of buffers: the tap leaves epoll (EPOLL_CTL_DEL,
 *   tap_off) until an RX kick brings buffers, as vmm/virtio/net.py does
 *   with IoLoop.remove/add: a level-triggered tap with frames waiting would
 *   otherwise wake the thread for nothing.  Python folds tap_off back into
 *   its own view whenever it takes the pair over (NetDevice.fast_stopped).
 *
 * Interrupts follow fastpath.c's rules: EVENT_IDX suppression
 * (pv_vq_need_interrupt, §2.6.7.2) once a pass ends, and early interrupts
 * while a pass still has a quarter of its most-seen backlog left, when the
 * driver has caught up since the last one: the driver refills the ring
 * (TX: new frames; RX: buffers) while the device is still working, and
 * since notifications are only re-armed once the ring is empty, the
 * device takes them in the same pass without a kick. */
#define _GNU_SOURCE
#include <errno.h>
#include <string.h>
#include <sys/epoll.h>
#include <unistd.h>

#include "pyvmm_native.h"
#include "fast_int.h"

/* After a frame: the early interrupt, if due.  `peak` is the most
 * buffers (RX) or frames (TX) seen waiting in this pass.
 * SAFETY: avail.idx is guest-controlled; `left` only steers when the
 * interrupt goes out (pv_vq_pop checks the index itself). */
static void maybe_early(struct pv_fast_net *f, struct pv_vq *vq, struct pv_fast_queue *irq_q,
                        uint16_t *peak)
{
    uint16_t left = (uint16_t)(pv_vq_avail_idx(vq) - vq->last_avail);
    if (left > *peak)
        *peak = left;
    if (f->early_div && (vq->flags & PV_VQ_F_EVENT_IDX) && left <= *peak / f->early_div
        && pv_driver_rearmed(vq) && pv_vq_need_interrupt(vq)) {
        pv_fast_raise_irq(irq_q);
        f->early++;
    }
}

/* maybe_early() as net.c's per-frame hook. */
struct early_arg {
    struct pv_fast_net *f;
    struct pv_vq *vq;
    struct pv_fast_queue *irq_q;
    uint16_t peak;
};

static void early_hook(void *p)
{
    struct early_arg *a = p;
    maybe_early(a->f, a->vq, a->irq_q, &a->peak);
}

/* One budgeted transmit pass: pv_net_tx()'s loop with early interrupts.
 * SAFETY: f's pointers are valid while the calling queue is enabled and
 * busy (pv_fast_disable handshake); every guest address comes through
 * pv_vq_pop's range checks, every chain through pv_net_tx_frame's. */
static void tx_pass(struct pv_fast_net *f, struct pv_net_result *res)
{
    struct early_arg a = {f, f->tx, f->txq, 0};
    if (f->tx->broken) {
        memset(res, 0, sizeof(*res));
        res->error = -f->tx->broken;
        return;
    }
    pv_net_tx_each(f->tx, f->net, f->tx_chain, res, early_hook, &a);
}

/* One budgeted receive pass: pv_net_rx()'s loop with early interrupts.
 * SAFETY: as tx_pass; readv targets are chains checked by pv_vq_pop and
 * rx_chain_ok (native/src/net.c), plus the device's own sink. */
static void rx_pass(struct pv_fast_net *f, struct pv_net_result *res)
{
    struct early_arg a = {f, f->rx, f->rxq, 0};
    pv_net_rx_each(f->rx, f->net, f->rx_chain, res, early_hook, &a);
}

/* The tap in the loop's epoll or not (see the top).  A failed
 * EPOLL_CTL_ADD (ENOMEM) leaves tap_off set: the next RX kick retries. */
static void tap_watch(struct pv_fast_net *f, int on)
{
    if (on == !f->tap_off)
        return;
    if (on) {
        struct epoll_event ev;
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN;
        ev.data.fd = f->tap_fd;         /* as Python's select.epoll registers it */
        if (epoll_ctl(f->epfd, EPOLL_CTL_ADD, f->tap_fd, &ev) < 0 && errno != EEXIST)
            return;
        f->tap_off = 0;
    } else {
        epoll_ctl(f->epfd, EPOLL_CTL_DEL, f->tap_fd, NULL);    /* ENOENT: already out */
        f->tap_off = 1;
    }
    f->tap_changes++;
}

/* One ready fd of a net queue pair, called by pv_fast_handle_fd with the
 * queue enabled and `busy` held.  Returns 1 if handled here, 0 if Python
 * must run the fd's handler (the ring just turned out malformed: error
 * recorded, queue disabled).
 *
 * SAFETY: q->fnet and everything it points to (rings, chains, pv_net and
 * its sink, the interrupts' fds) are valid while q is enabled and `busy`
 * is held: Python changes or frees them only after pv_fast_disable(q) on
 * every queue of the pair (vmm/virtio/fastpath.py).  With MSI-X the irqfds
 * are the live vectors' (handed over only while live).  Guest addresses
 * are range-checked by pv_vq_pop (native/src/virtq.c). */
int pv_fastnet_serve(struct pv_fast_queue *q)
{
    struct pv_fast_net *f = q->fnet;
    struct pv_net_result res;
    int handled = 1;
    if (q->kind == PV_FAST_NET_TX) {
        pv_drain(q->notify_fd);
        q->kicks++;
        tx_pass(f, &res);
        q->requests += res.completed;
        if (res.interrupt)
            pv_fast_raise_irq(f->txq);
        if (!res.error && res.state)
            pv_poke(q->notify_fd);         /* budget spent: again after the other fds */
    } else {
        if (q->kind == PV_FAST_NET_RX) {
            pv_drain(q->notify_fd);
            q->kicks++;
        }
        rx_pass(f, &res);
        q->requests += res.completed;
        if (res.interrupt)
            pv_fast_raise_irq(f->rxq);
        /* budget spent (MORE): the tap stays readable in epoll, so the
         * loop comes back after its other fds */
        if (!res.error)
            tap_watch(f, res.state != PV_NET_RX_NOBUF);
    }
    if (res.error) {
        /* Python reports DEVICE_NEEDS_RESET (it owns the status) */
        q->error = res.error;
        __atomic_store_n(&q->enabled, 0, __ATOMIC_SEQ_CST);
        handled = 0;
    }
    return handled;
}

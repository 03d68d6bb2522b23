/* libFuzzer target: the virtio-net data path (native/src/net.c, virtio 1.1
 * §5.1.6), receive and transmit, against a datagram socketpair standing in
 * for the tap (each datagram is one frame with its virtio_net_hdr).
 *
 * Header bytes 0..11 set up the queue (fz_setup_vq); byte 12: bit0
 * MRG_RXBUF, bit1 the 10-byte legacy header (without MRG_RXBUF), bit2 the queue is
 * the transmit queue (else receive), bit3 the engine runs through the I/O
 * loop's fast path (native/src/fastnet.c, through pv_fast_handle: on the
 * queue's kick, or on the tap for a receive queue, with real notify and
 * interrupt eventfds and the tap in an epoll set), bit4 (fast) the
 * interrupt is an MSI-X vector's (no ISR bit); byte 13: the per-call
 * budget (0: the default).  Ops: inject a frame from the peer (any length up to 128 KiB),
 * run the engine (rx or tx), hand a frame to pv_net_rx_held as the slow
 * path (vmm/virtio/intercept.py) does, or rewrite guest memory.
 * Invariants, besides fuzz_common.h's pop/push tracking:
 * - used.idx advances by exactly res.completed, never more than the budget
 *   (tx); an error leaves the queue broken;
 * - a frame held for more buffers fits the sink;
 * - transmit: the peer gets exactly tx_packets new frames carrying
 *   tx_bytes payload bytes;
 * - guest memory changes only in the popped chains' writable segments and
 *   the used ring (a transmit chain is never written);
 * - fast path: a disabled queue is not touched (returns 0, the kick stays
 *   unread); an enabled one drains its kick, counts what it completed
 *   (used.idx moves by that), writes the interrupt eventfd once per counted
 *   interrupt with the ISR bit set (never with MSI-X); a transmit budget
 *   spent re-signals the kick; the tap is in the epoll set exactly when
 *   tap_off is clear; a malformed ring disables the queue with its error
 *   and hands it back (returns 0). */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/epoll.h>
#include <sys/eventfd.h>
#include <sys/socket.h>
#include <unistd.h>

#define FZ_TRACK_ENGINE
#include "fuzz_common.h"

#define MAX_OPS 16
#define MAX_FRAME (2 * 65536)

static struct pv_chain chain;
static struct pv_net net;
static uint8_t sink[PV_NET_SINK_SIZE];
static uint8_t frame[MAX_FRAME];
static int sv[2] = {-1, -1};          /* [0] the device's "tap", [1] the peer */
static int epfd = -1, kick_fd = -1, irq_fd = -1;

static uint64_t take_fd(int fd)
{
    uint64_t v = 0;
    if (read(fd, &v, 8) != 8)
        return 0;
    return v;
}

/* Is the tap in the epoll set?  (EPOLL_CTL_MOD fails with ENOENT if not.) */
static int tap_watched(void)
{
    struct epoll_event ev;
    memset(&ev, 0, sizeof(ev));
    ev.events = EPOLLIN;
    ev.data.fd = sv[0];
    return epoll_ctl(epfd, EPOLL_CTL_MOD, sv[0], &ev) == 0;
}

/* One kick (or tap wake-up) through pv_fast_handle (fastnet.c), with its checks;
 * fills res as pv_net_tx/pv_net_rx would (completed, error). */
static int fast_call(struct pv_vq *vq, struct pv_fast_queue *q, struct pv_fast_queue *tap,
                     struct pv_fast_irq *irq, int tx, int use_tap, uint32_t budget,
                     struct pv_net_result *res)
{
    struct pv_fast_queue *h = use_tap ? tap : q;
    uint64_t one = 1, req0 = h->requests, irq0 = irq->count, kicks0 = h->kicks;
    int was = (int)h->enabled;
    memset(res, 0, sizeof(*res));
    if (!use_tap)
        FZ_CHECK(write(kick_fd, &one, 8) == 8, "kick");
    int handled = pv_fast_handle(h);          /* dispatches on h->kind */
    FZ_CHECK(!h->busy, "busy left set");
    res->completed = (uint32_t)(h->requests - req0);
    uint64_t irqs = take_fd(irq_fd);
    FZ_CHECK(irqs == irq->count - irq0, "irq eventfd %llu vs counted %llu",
             (unsigned long long)irqs, (unsigned long long)(irq->count - irq0));
    uint32_t isr = pv_fast_isr_take(irq);
    if (q->isr_bit)
        FZ_CHECK(!!isr == !!irqs && (isr & ~1u) == 0, "isr 0x%x irqs %llu", isr,
                 (unsigned long long)irqs);
    else
        FZ_CHECK(isr == 0, "MSI-X queue set ISR 0x%x", isr);
    uint64_t rekick = take_fd(kick_fd);
    FZ_CHECK(tap_watched() == !q->fnet->tap_off, "tap_off %u but watched %d",
             q->fnet->tap_off, tap_watched());
    if (!was) {
        FZ_CHECK(!handled && res->completed == 0 && h->kicks == kicks0
                 && rekick == (uint64_t)!use_tap, "disabled queue touched");
        return 0;
    }
    FZ_CHECK(h->kicks == kicks0 + !use_tap, "kicks");
    if (vq->broken && !handled) {
        FZ_CHECK(h->error == -(int)vq->broken && !h->enabled, "error %d broken %u", h->error,
                 vq->broken);
        res->error = h->error;
        return res->error;
    }
    FZ_CHECK(handled && !vq->broken, "healthy queue handed back (%d, %u)", handled, vq->broken);
    if (tx) {
        FZ_CHECK(rekick == (res->completed >= budget), "re-kick %llu done %u budget %u",
                 (unsigned long long)rekick, res->completed, budget);
        if (res->completed < budget)
            FZ_CHECK(pv_vq_avail_idx(vq) == vq->last_avail, "kick left frames behind");
    } else {
        FZ_CHECK(rekick == 0, "receive kick re-signalled");
    }
    return 0;
}

static void drain(int fd)
{
    while (recv(fd, frame, sizeof(frame), MSG_DONTWAIT | MSG_TRUNC) >= 0)
        ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pv_vq vq;
    struct fz_in in;
    struct pv_net_result res;
    struct pv_fast_irq irq;
    struct pv_fast_queue q, tapq;
    struct pv_fast_net fnet;

    if (sv[0] < 0) {
        if (socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv)) {
            perror("fuzz: socketpair");
            abort();
        }
        epfd = epoll_create1(EPOLL_CLOEXEC);
        kick_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        irq_fd = eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC);
        if (epfd < 0 || kick_fd < 0 || irq_fd < 0) {
            perror("fuzz: epoll/eventfd");
            abort();
        }
    }
    drain(sv[0]);
    drain(sv[1]);
    take_fd(kick_fd);
    take_fd(irq_fd);
    fz_load_mem(data, size);
    fz_track_reset();
    if (fz_setup_vq(&vq, data, size) < 0)
        return 0;
    uint32_t f = (uint32_t)fz_hdr(data, size, 12, 1);
    int tx = (f >> 2) & 1;
    memset(&net, 0, sizeof(net));
    net.fd = sv[0];
    net.mrg_rxbuf = f & 1;
    /* as NetDevice.activate: 12 with VERSION_1 or MRG_RXBUF, else 10 */
    net.hdr_len = (f & 2) && !net.mrg_rxbuf ? 10 : 12;
    net.budget = (uint32_t)fz_hdr(data, size, 13, 1);
    net.sink = sink;
    uint32_t budget = net.budget ? net.budget : PV_NET_BUDGET;
    int fast = (f >> 3) & 1;
    if (fast) {
        /* the pair's fast queues: this ring as the receive or transmit one,
         * the tap watched (as Python leaves it at enable time) */
        struct epoll_event ev;
        memset(&ev, 0, sizeof(ev));
        ev.events = EPOLLIN;
        ev.data.fd = sv[0];
        if (epoll_ctl(epfd, EPOLL_CTL_ADD, sv[0], &ev) < 0 && errno != EEXIST)
            abort();
        memset(&irq, 0, sizeof(irq));
        irq.fd = irq_fd;
        memset(&fnet, 0, sizeof(fnet));
        fnet.net = &net;
        fnet.rx = fnet.tx = &vq;
        fnet.rx_chain = fnet.tx_chain = &chain;
        fnet.rxq = fnet.txq = &q;
        fnet.epfd = epfd;
        fnet.tap_fd = sv[0];
        fnet.early_div = 4;
        memset(&q, 0, sizeof(q));
        q.notify_fd = kick_fd;
        q.kind = tx ? PV_FAST_NET_TX : PV_FAST_NET_RX;
        q.fnet = &fnet;
        q.irq = &irq;
        q.isr_bit = (f >> 4) & 1 ? 0 : 1;
        tapq = q;
        tapq.kind = PV_FAST_NET_TAP;
        tapq.notify_fd = sv[0];
        pv_fast_enable(&q);
        pv_fast_enable(&tapq);
    }

    fz_ops_init(&in, data, size);
    for (int step = 0; step < MAX_OPS && fz_ops_left(&in); step++) {
        uint8_t op = (uint8_t)fz_take(&in, 1);
        switch (op % 4) {
        case 0: {                                  /* the peer sends a frame */
            uint32_t len = (uint32_t)fz_take(&in, 2) | (op & 0x80 ? 0x10000u : 0);
            memset(frame, (int)fz_take(&in, 1), len);
            if (len >= 12)
                memset(frame, 0, 12);              /* a plain virtio_net_hdr */
            (void)send(sv[1], frame, len, MSG_DONTWAIT);
            break;
        }
        case 3:                                    /* the slow path hands over a frame */
            if (fast && (op & 0x20)) {             /* Python takes the pair / gives it back */
                if (q.enabled) {
                    pv_fast_disable(&q);
                    pv_fast_disable(&tapq);
                } else if (!vq.broken) {
                    pv_fast_enable(&q);
                    pv_fast_enable(&tapq);
                }
                break;
            }
            if (tx || fast || !(op & 0x40)) {
                fz_op_guest_write(&in);
                break;
            }
            net.pending = (uint32_t)fz_take(&in, 3) % (PV_NET_SINK_SIZE + 1);
            memset(sink, (int)fz_take(&in, 1), net.pending);
            /* fall through: deliver it with pv_net_rx_held */
        case 1: {                                  /* a kick / a readable tap */
            uint16_t from = vq.used_idx;
            int broken = vq.broken;
            uint64_t pk = net.tx_packets, by = net.tx_bytes;
            int r = fast ? fast_call(&vq, &q, &tapq, &irq, tx, !tx && (op & 0x10), budget, &res)
                  : tx ? pv_net_tx(&vq, &net, &chain, &res)
                       : op % 4 == 3 ? pv_net_rx_held(&vq, &net, &chain, &res)
                                     : pv_net_rx(&vq, &net, &chain, &res);
            FZ_CHECK(r == res.error, "return %d vs res.error %d", r, res.error);
            fz_allow_used(&vq, from, res.completed);
            fz_allow_avail_event(&vq);
            FZ_CHECK(net.pending <= PV_NET_SINK_SIZE, "pending %u", net.pending);
            if (broken && !fast)
                FZ_CHECK(res.completed == 0 && r == -broken, "broken queue used");
            if (broken && fast)
                FZ_CHECK(res.completed == 0, "broken queue used");
            if (r < 0)
                FZ_CHECK(vq.broken == -r, "error %d but queue not broken", r);
            if (tx) {
                FZ_CHECK(res.completed <= budget, "tx completed %u > budget %u",
                         res.completed, budget);
                uint64_t n = 0, bytes = 0;
                ssize_t got;
                while ((got = recv(sv[1], frame, sizeof(frame), MSG_DONTWAIT)) >= 0) {
                    n++;
                    bytes += (uint64_t)got - net.hdr_len;
                }
                FZ_CHECK(n == net.tx_packets - pk && bytes == net.tx_bytes - by,
                         "peer got %llu frames / %llu bytes, device counted %llu / %llu",
                         (unsigned long long)n, (unsigned long long)bytes,
                         (unsigned long long)(net.tx_packets - pk),
                         (unsigned long long)(net.tx_bytes - by));
            } else {
                FZ_CHECK(res.state <= PV_NET_RX_MORE, "rx state %u", res.state);
            }
            break;
        }
        default:                                   /* a second vCPU writes guest memory */
            fz_op_guest_write(&in);
        }
    }
    if (tx)
        fz_tr.nranges = 0;                         /* transmit never writes guest buffers */
    fz_track_check_mem();
    if (fast)
        epoll_ctl(epfd, EPOLL_CTL_DEL, sv[0], NULL);
    return 0;
}

/* virtio-net data path (virtio 1.1 §5.1.6) over a tap fd opened with
 * IFF_VNET_HDR and TUNSETVNETHDRSZ = hdr_len, so the virtio_net_hdr the guest
 * writes is exactly what the tap reads, and the other way round: frames go
 * between the tap and guest buffers with one readv/writev each, no copy.
 *
 * Receive (§5.1.6.3, §5.1.6.4): a frame is read straight into the next
 * receive chain, with PV_NET_OVERFLOW bytes of a scratch "sink" after it so a
 * frame larger than the chain is seen (not silently truncated).  Such a frame
 * is, with MRG_RXBUF, spread over as many chains as needed (num_buffers) or
 * held until the guest adds them; without MRG_RXBUF it is dropped and
 * counted.  With no receive buffer at all we stop: the caller stops polling
 * the tap until the driver kicks the receive queue (the tap's own queue
 * holds frames meanwhile, and counts its drops).
 *
 * Transmit (§5.1.6.2): each chain (header + frame, device-readable) is one
 * writev.  A frame the tap refuses is counted and completed anyway. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/uio.h>
#include <unistd.h>
#include <net/if.h>

#include "pyvmm_native.h"

#define NUM_BUFFERS_OFF 10           /* §5.1.6: le16 num_buffers after the 10-byte header */

/* Write `len` bytes at byte offset `off` of the chain's (writable) segments. */
static void chain_put(const struct pv_chain *c, uint64_t off, const void *src, uint64_t len)
{
    const uint8_t *p = src;
    for (uint32_t i = 0; i < c->nseg && len; i++) {
        uint64_t l = c->iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        uint64_t take = l - off < len ? l - off : len;
        memcpy((uint8_t *)c->iov[i].iov_base + off, p, take);
        p += take;
        len -= take;
        off = 0;
    }
}

/* Read the chain's bytes [0, len) into dst. */
static void chain_get(const struct pv_chain *c, void *dst, uint64_t len)
{
    uint8_t *p = dst;
    for (uint32_t i = 0; i < c->nseg && len; i++) {
        uint64_t take = c->iov[i].iov_len < len ? c->iov[i].iov_len : len;
        memcpy(p, c->iov[i].iov_base, take);
        p += take;
        len -= take;
    }
}

/* Host address of byte `off` of the chain (off < write_len). */
static uint8_t *chain_ptr(const struct pv_chain *c, uint64_t off)
{
    for (uint32_t i = 0; i < c->nseg; i++) {
        if (off < c->iov[i].iov_len)
            return (uint8_t *)c->iov[i].iov_base + off;
        off -= c->iov[i].iov_len;
    }
    return NULL;
}

static void set_num_buffers(const struct pv_chain *c, uint16_t n)
{
    chain_put(c, NUM_BUFFERS_OFF, &n, 2);   /* little-endian host */
}

/* §5.1.6.3: receive buffers are device-writable and hold at least a header. */
static int rx_chain_ok(const struct pv_net *net, const struct pv_chain *c)
{
    return c->nread == 0 && c->write_len >= net->hdr_len && c->nseg < IOV_MAX;
}

/* Give back the last `n` chains popped (they stay available to us). */
static void unpop(struct pv_vq *vq, uint16_t n)
{
    vq->last_avail = (uint16_t)(vq->last_avail - n);
}

/* Deliver the frame held in the sink (MRG_RXBUF, §5.1.6.4): fill chains in
 * order, publish them all with num_buffers in the first header, or, if the
 * ring runs out, give every chain back and keep the frame.
 * Returns 1 delivered, 0 no buffers, -PV_VQ_E_* on a malformed chain. */
static int rx_deliver_held(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c)
{
    static __thread struct { uint16_t head; uint32_t len; } used[PV_VQ_MAX_SIZE];
    uint8_t *nb[2] = {NULL, NULL};           /* the num_buffers bytes of the first chain */
    uint32_t k = 0, off = 0, len = net->pending;
    while (off < len) {
        int r = k < PV_VQ_MAX_SIZE ? pv_vq_pop(vq, c) : 0;
        if (r < 0)
            return r;
        if (r == 0) {                        /* out of buffers: give them all back */
            unpop(vq, (uint16_t)k);
            if (k < vq->size)
                return 0;
            net->rx_drops++;                 /* the whole ring could not hold it */
            net->pending = 0;
            return 1;
        }
        if (!rx_chain_ok(net, c)) {
            vq->broken = PV_VQ_E_REQ;
            return -PV_VQ_E_REQ;
        }
        uint32_t take = len - off < c->write_len ? len - off : (uint32_t)c->write_len;
        chain_put(c, 0, net->sink + off, take);
        if (k == 0) {
            nb[0] = chain_ptr(c, NUM_BUFFERS_OFF);
            nb[1] = chain_ptr(c, NUM_BUFFERS_OFF + 1);
        }
        used[k].head = c->head;
        used[k].len = take;
        k++;
        off += take;
    }
    *nb[0] = (uint8_t)k;                     /* hdr_len 12: both bytes are in the chain */
    *nb[1] = (uint8_t)(k >> 8);
    for (uint32_t i = 0; i < k; i++)
        pv_vq_push(vq, used[i].head, used[i].len);
    net->rx_packets++;
    net->rx_bytes += len - net->hdr_len;
    net->pending = 0;
    return 1;
}

/* rx_deliver_held, and when the ring holds too few buffers for the frame,
 * ask the driver to kick at its next addition (with EVENT_IDX the kick
 * would otherwise never come: avail_event is behind the driver's index) and
 * retry if buffers arrived meanwhile. */
static int rx_deliver_held_or_wait(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c)
{
    for (;;) {
        int r = rx_deliver_held(vq, net, c);
        if (r != 0 || !pv_vq_notify_on_next(vq))
            return r;
    }
}

/* One frame into the chain just popped.  Returns 1 delivered (or dropped
 * and counted: go on), 0 nothing to read / no buffers (chain given back,
 * *state set), -PV_VQ_E_* malformed. */
static int rx_one(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c, uint32_t *state)
{
    struct iovec iov[IOV_MAX];
    if (!rx_chain_ok(net, c)) {
        vq->broken = PV_VQ_E_REQ;
        return -PV_VQ_E_REQ;
    }
    memcpy(iov, c->iov, c->nseg * sizeof(*iov));
    iov[c->nseg].iov_base = net->sink;
    iov[c->nseg].iov_len = PV_NET_OVERFLOW;
    ssize_t n;
    do
        n = readv(net->fd, iov, (int)c->nseg + 1);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        unpop(vq, 1);
        *state = PV_NET_RX_IDLE;
        if (errno != EAGAIN) {               /* e.g. EBADFD: tap detached */
            net->rx_errors++;
            net->last_errno = errno;
            /* stop polling (level-triggered EPOLLERR would spin the I/O
             * thread) until the guest kicks the receive queue again */
            *state = PV_NET_RX_NOBUF;
        }
        return 0;
    }
    if ((uint64_t)n <= c->write_len) {       /* fits: the common case */
        if ((uint64_t)n < net->hdr_len) {    /* not a tap; nothing to hand over */
            net->rx_drops++;
            unpop(vq, 1);
            return 1;
        }
        if (net->hdr_len > NUM_BUFFERS_OFF) /* §5.1.6.4: the tap leaves it unset */
            set_num_buffers(c, 1);
        pv_vq_push(vq, c->head, (uint32_t)n);
        net->rx_packets++;
        net->rx_bytes += (uint64_t)n - net->hdr_len;
        return 1;
    }
    unpop(vq, 1);
    uint64_t over = (uint64_t)n - c->write_len;
    if (!net->mrg_rxbuf || over >= PV_NET_OVERFLOW || (uint64_t)n > PV_NET_SINK_SIZE) {
        net->rx_drops++;                     /* larger than the buffers: counted */
        return 1;
    }
    /* whole frame into the sink (tail is there already), then spread it */
    memmove(net->sink + c->write_len, net->sink, over);
    chain_get(c, net->sink, c->write_len);
    net->pending = (uint32_t)n;
    int r = rx_deliver_held_or_wait(vq, net, c);
    if (r == 0)
        *state = PV_NET_RX_NOBUF;
    return r;
}

/* SAFETY: the chain was popped by pv_vq_pop (every segment range-checked
 * against guest RAM); rx_one checks it is device-writable and holds a
 * header before the readv into it. */
int pv_net_rx_frame(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c, uint32_t *state)
{
    int r = pv_vq_pop(vq, c);
    if (r == 0) {
        /* §2.6.7.1: ask for a kick when buffers come, then re-check */
        if (pv_vq_enable_notify(vq))
            return 1;
        *state = PV_NET_RX_NOBUF;
        return 0;
    }
    return r > 0 ? rx_one(vq, net, c, state) : r;
}

/* SAFETY: as pv_net_rx_frame; `pending` never exceeds PV_NET_SINK_SIZE (rx_one). */
int pv_net_rx_held_frame(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c, uint32_t *state)
{
    int r = rx_deliver_held_or_wait(vq, net, c);
    if (r == 0)
        *state = PV_NET_RX_NOBUF;
    return r;
}

int pv_net_rx(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c,
              struct pv_net_result *res)
{
    return pv_net_rx_each(vq, net, c, res, NULL, NULL);
}

/* pv_net_rx's loop, calling after(arg) once a frame has used buffers
 * (fastnet.c: its early interrupts).
 * SAFETY: as pv_net_rx_frame's; after() gets no guest pointer. */
int pv_net_rx_each(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c,
                   struct pv_net_result *res, void (*after)(void *), void *arg)
{
    uint32_t budget = net->budget ? net->budget : PV_NET_BUDGET, frames = 0;
    uint16_t used_before = vq->used_idx;
    int r = 0;
    memset(res, 0, sizeof(*res));
    res->state = PV_NET_RX_MORE;
    if (vq->broken) {
        res->error = -vq->broken;
        return res->error;
    }
    if (net->pending)
        r = pv_net_rx_held_frame(vq, net, c, &res->state);
    while (r >= 0 && res->state == PV_NET_RX_MORE && frames < budget) {
        uint16_t before = vq->used_idx;
        r = pv_net_rx_frame(vq, net, c, &res->state);
        frames++;
        if (after && vq->used_idx != before)
            after(arg);
    }
    if (r < 0)
        res->error = r;
    res->completed = (uint16_t)(vq->used_idx - used_before);
    if (res->completed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
    return res->error;
}

/* One transmit chain just popped: header + frame, all device-readable
 * (§5.1.6.2), one writev, completed (a frame the tap refuses is counted).
 * Returns 1, or -PV_VQ_E_REQ for a malformed chain (the queue is broken).
 * SAFETY: the chain comes from pv_vq_pop (segments range-checked against
 * guest RAM); at most IOV_MAX segments reach writev. */
int pv_net_tx_frame(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c)
{
    if (c->nread != c->nseg || c->read_len < net->hdr_len || c->nseg > IOV_MAX) {
        vq->broken = PV_VQ_E_REQ;
        return -PV_VQ_E_REQ;
    }
    ssize_t n;
    do
        n = writev(net->fd, c->iov, (int)c->nseg);
    while (n < 0 && errno == EINTR);
    if (n < 0) {
        net->last_errno = errno;
        if (errno == EAGAIN || errno == ENOBUFS || errno == EIO)
            net->tx_drops++;                 /* full, or the interface is down */
        else
            net->tx_errors++;                /* e.g. EINVAL: a bad header from the guest */
    } else {
        net->tx_packets++;
        net->tx_bytes += c->read_len - net->hdr_len;
    }
    pv_vq_push(vq, c->head, 0);
    return 1;
}

int pv_net_tx(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c,
              struct pv_net_result *res)
{
    return pv_net_tx_each(vq, net, c, res, NULL, NULL);
}

/* pv_net_tx's loop, calling after(arg) after each frame (fastnet.c: its
 * early interrupts).
 * SAFETY: as pv_net_tx_frame's; after() gets no guest pointer. */
int pv_net_tx_each(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c,
                   struct pv_net_result *res, void (*after)(void *), void *arg)
{
    uint32_t budget = net->budget ? net->budget : PV_NET_BUDGET;
    int r = 0;
    memset(res, 0, sizeof(*res));
    for (;;) {
        while (res->completed < budget && (r = pv_vq_pop(vq, c)) > 0) {
            if ((r = pv_net_tx_frame(vq, net, c)) < 0)
                break;
            res->completed++;
            if (after)
                after(arg);
        }
        if (r < 0) {
            res->error = r;
            break;
        }
        if (res->completed >= budget) {
            res->state = 1;
            break;
        }
        if (!pv_vq_enable_notify(vq))
            break;
    }
    if (res->completed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
    return res->error;
}

/* The slow path's receive (vmm/virtio/intercept.py: faults, traces, hooks,
 * rate limits): Python reads and alters a frame, copies it into the sink
 * with `pending` = its length, and this delivers it (or keeps holding it
 * until buffers come, state PV_NET_RX_NOBUF).  Without MRG_RXBUF a frame
 * must fit one chain, else it is dropped and counted, as in rx_one.
 * SAFETY: `pending` is set by the VMM (never above PV_NET_SINK_SIZE, checked
 * here); chains are bounds-checked by pv_vq_pop and rx_chain_ok. */
int pv_net_rx_held(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c,
                   struct pv_net_result *res)
{
    uint16_t used_before = vq->used_idx;
    int r = 1;
    memset(res, 0, sizeof(*res));
    res->state = PV_NET_RX_MORE;
    if (vq->broken) {
        res->error = -vq->broken;
        return res->error;
    }
    if (net->pending > PV_NET_SINK_SIZE || (net->pending && net->pending < net->hdr_len)) {
        net->rx_drops++;
        net->pending = 0;
    }
    if (net->pending && !net->mrg_rxbuf) {
        r = pv_vq_pop(vq, c);
        if (r == 0 && pv_vq_enable_notify(vq))
            r = pv_vq_pop(vq, c);
        if (r > 0 && !rx_chain_ok(net, c)) {
            vq->broken = PV_VQ_E_REQ;
            r = -PV_VQ_E_REQ;
        }
        if (r > 0) {
            if (net->pending > c->write_len) {
                unpop(vq, 1);
                net->rx_drops++;
            } else {
                chain_put(c, 0, net->sink, net->pending);
                if (net->hdr_len > NUM_BUFFERS_OFF)
                    set_num_buffers(c, 1);
                pv_vq_push(vq, c->head, net->pending);
                net->rx_packets++;
                net->rx_bytes += net->pending - net->hdr_len;
            }
            net->pending = 0;
        } else if (r == 0) {
            res->state = PV_NET_RX_NOBUF;
        }
    } else if (net->pending) {
        r = rx_deliver_held_or_wait(vq, net, c);
        if (r == 0)
            res->state = PV_NET_RX_NOBUF;
    }
    if (r < 0)
        res->error = r;
    res->completed = (uint16_t)(vq->used_idx - used_before);
    if (res->completed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
    return res->error;
}

long pv_tap_setiff(int fd, const char *name, int flags, char *name_out)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    strncpy(ifr.ifr_name, name, IFNAMSIZ - 1);
    ifr.ifr_flags = (short)flags;
    if (ioctl(fd, TUNSETIFF, &ifr) < 0)
        return -errno;
    memcpy(name_out, ifr.ifr_name, IFNAMSIZ);
    return 0;
}

long pv_tap_getiff_flags(int fd)
{
    struct ifreq ifr;
    memset(&ifr, 0, sizeof(ifr));
    if (ioctl(fd, TUNGETIFF, &ifr) < 0)
        return -errno;
    return (unsigned short)ifr.ifr_flags;
}

/* n read()s or write()s of `len` bytes, buffer i at buf + (i % nslots) * stride
 * (the same buffers the device uses, so both see the same caches). */
long pv_bench_tap(int fd, void *buf, uint64_t len, uint32_t n, int write_,
                  uint64_t stride, uint32_t nslots)
{
    long total = 0;
    for (uint32_t i = 0; i < n; i++) {
        uint8_t *p = (uint8_t *)buf + (uint64_t)(i % (nslots ? nslots : 1)) * stride;
        ssize_t r = write_ ? write(fd, p, len) : read(fd, p, len);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            return -errno;
        }
        total += r;
    }
    return total;
}

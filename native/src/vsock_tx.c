/* virtio-vsock transmit queue (guest -> host, virtio 1.1 §5.10.6) for
 * Firecracker's hybrid vsock; the receive side, host socket events and the
 * connection table are in native/src/vsock.c.
 *
 * Transmit queue (guest -> host): each chain is a 44-byte header followed by
 * the payload, all device-readable, in any number of descriptors.  RW packets
 * of established connections and CREDIT_UPDATEs are handled here.  An RW
 * chain is held (kept out of the used ring, §2.6: buffers may be used in
 * any order) until the host socket took its payload, and the chains of one
 * connection a batch brought go out with one sendmsg straight from guest
 * memory; when the socket is full they wait for EPOLLOUT.  Our credit
 * (§5.10.6.3) bounds what a connection can have waiting: fwd_cnt only
 * counts bytes the socket really took.  So that a host program that stops
 * reading cannot take the ring from the other connections, a connection
 * holds at most PV_VSOCK_HOLD_CONN chains and the device half the ring's
 * descriptors; beyond that (and for chains of many segments, and before a
 * snapshot) the oldest held payload is copied into the connection's `pend`
 * ring (buf_alloc bytes, exactly the credit we advertised) and the chain
 * completed.  Any other packet stops the batch and is handed to Python
 * (res->hdr) so ordering is preserved.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <sys/timerfd.h>
#include <sys/uio.h>
#include <unistd.h>

#include "pyvmm_native.h"
#include "vsock_int.h"

#define FLUSH_IOV 64                     /* iovecs per sendmsg of a connection's backlog */

static struct pv_vsock_conn *find_conn(struct pv_vsock *vs, uint32_t local, uint32_t peer)
{
    static __thread uint32_t last;
    if (last < vs->nslots) {
        struct pv_vsock_conn *k = &vs->conns[last];
        if (k->state != PV_VSOCK_ST_FREE && k->local_port == local && k->peer_port == peer)
            return k;
    }
    for (uint32_t i = 0; i < vs->nslots; i++) {
        struct pv_vsock_conn *k = &vs->conns[i];
        if (k->state != PV_VSOCK_ST_FREE && k->local_port == local && k->peer_port == peer) {
            last = i;
            return k;
        }
    }
    return NULL;
}

/* --- held transmit chains (see the top of the file) --- */

static void held_init(struct pv_vsock *vs)
{
    if (vs->held_ready)
        return;
    for (uint32_t i = 0; i < PV_VSOCK_HOLD_MAX; i++)
        vs->held[i].next = i + 1 < PV_VSOCK_HOLD_MAX ? i + 1 : PV_VSOCK_NONE;
    vs->held_free = 0;
    vs->held_ready = 1;
}

/* Complete k's oldest held chain: its payload went to the socket (or the
 * stream was reset).  Without a live transmit queue it is only forgotten.
 * SAFETY: e->head was popped from vs->txq (< its size); the owner sets txq
 * to NULL before that queue goes, so no other ring is ever written. */
static void held_pop(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    uint32_t i = k->held_first;
    struct pv_vsock_held *e = &vs->held[i];
    k->held_first = e->next;
    k->held_n--;
    k->held_bytes -= e->len - e->off;
    vs->nheld--;
    vs->held_desc -= e->nseg;
    if (vs->txq && !vs->txq->broken) {
        pv_vq_push(vs->txq, e->head, 0);
        vs->tx_pushed++;
    }
    e->next = vs->held_free;
    vs->held_free = i;
}

void pv_vsock__held_drop(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    while (k->held_n)
        held_pop(vs, k);
}

/* Append `len` bytes of the buffers iov[0, n) (from byte `off`) to `pend`.
 * SAFETY: the buffers were resolved by pv_vq_pop (inside guest RAM) and we
 * only read them; the caller accounted `len` in rx_cnt, and
 * pend_len + held_bytes == rx_cnt - fwd_cnt <= buf_alloc, so the ring has
 * room for all of it. */
static void pend_append(struct pv_vsock_conn *k, const struct iovec *iov, uint32_t n,
                        uint64_t off, uint32_t len)
{
    uint32_t tail = (uint32_t)(((uint64_t)k->pend_head + k->pend_len) % k->buf_alloc);
    uint32_t first = k->buf_alloc - tail < len ? k->buf_alloc - tail : len;
    segs_get(iov, n, off, k->pend + tail, first);
    segs_get(iov, n, off + first, k->pend, len - first);
    k->pend_len += len;
}

/* Copy k's oldest held chain's unsent payload to the end of `pend` (it
 * follows everything there in the stream) and complete the chain.
 * SAFETY: as pend_append; the held iovecs lie inside guest RAM (pv_vq_pop)
 * and the owner drops held chains before the queue or guest RAM go. */
static void held_to_pend(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    struct pv_vsock_held *e = &vs->held[k->held_first];
    uint32_t left = e->len - e->off;
    k->held_bytes -= left;               /* moves from the chain to pend */
    pend_append(k, e->iov, e->niov, e->off, left);
    vs->backlog_bytes += left;
    e->off = e->len;
    held_pop(vs, k);
}

/* Keep chain c (an RW packet whose `len` payload bytes follow the header)
 * as k's newest held chain, within the bounds above; returns 0 when it
 * must be copied instead (k then holds nothing, so `pend` is its tail).
 * SAFETY: c was resolved by pv_vq_pop on vs->txq (inside guest RAM). */
static int held_push(struct pv_vsock *vs, struct pv_vq *vq, struct pv_vsock_conn *k,
                     const struct pv_chain *c, uint32_t len)
{
    struct iovec iov[PV_VSOCK_HOLD_IOV];
    int niov = segs_slice(c->iov, c->nread, PV_VSOCK_HDR_LEN, len, iov, PV_VSOCK_HOLD_IOV);
    if (niov <= 0 || vs->txq != vq) {
        while (k->held_n)
            held_to_pend(vs, k);
        return 0;
    }
    held_init(vs);
    if (k->held_n >= PV_VSOCK_HOLD_CONN)
        held_to_pend(vs, k);
    while (vs->held_free == PV_VSOCK_NONE || vs->held_desc + c->nseg > vq->size / 2) {
        if (!k->held_n)
            return 0;                    /* other connections hold the device's share */
        held_to_pend(vs, k);
    }
    uint32_t i = vs->held_free;
    struct pv_vsock_held *e = &vs->held[i];
    vs->held_free = e->next;
    e->next = PV_VSOCK_NONE;
    e->head = c->head;
    e->niov = (uint16_t)niov;
    e->nseg = c->nseg;
    e->len = len;
    e->off = 0;
    memcpy(e->iov, iov, sizeof(iov[0]) * (size_t)niov);
    if (k->held_n)
        vs->held[k->held_last].next = i;
    else
        k->held_first = i;
    k->held_last = i;
    k->held_n++;
    k->held_bytes += len;
    vs->nheld++;
    vs->held_desc += c->nseg;
    vs->held_chains++;
    return 1;
}

/* Once the guest shut its sending side and everything reached the socket:
 * pass the end of stream on (SHUT_WR), and if it shut both ways, finish
 * with RST (what Linux's close() waits for). */
static void after_flush(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    if (k->pend_len || k->held_n)
        return;
    if (k->flags & PV_VSOCK_C_PEER_SHUT_SEND && !(k->flags & PV_VSOCK_C_WR_SHUT)) {
        shutdown(k->fd, SHUT_WR);
        k->flags |= PV_VSOCK_C_WR_SHUT;
    }
    if (k->flags & PV_VSOCK_C_CLOSE_AFTER_FLUSH)
        conn_reset(vs, k);
}

/* The socket took n bytes of k's backlog: from pend first, then the held
 * chains in order (each one emptied is completed). */
static void backlog_sent(struct pv_vsock *vs, struct pv_vsock_conn *k, uint64_t n)
{
    k->fwd_cnt += (uint32_t)n;
    uint32_t take = n < k->pend_len ? (uint32_t)n : k->pend_len;
    k->pend_head = (uint32_t)(((uint64_t)k->pend_head + take) % k->buf_alloc);
    k->pend_len -= take;
    n -= take;
    while (n && k->held_n) {
        struct pv_vsock_held *e = &vs->held[k->held_first];
        uint32_t t = e->len - e->off < n ? e->len - e->off : (uint32_t)n;
        e->off += t;
        k->held_bytes -= t;
        n -= t;
        if (e->off == e->len)
            held_pop(vs, k);
    }
}

/* Write as much of k's backlog (pend, then the held chains) as the socket
 * takes, several chains per sendmsg.  On a socket error the connection is
 * reset.
 * SAFETY: the held iovecs lie inside guest RAM (pv_vq_pop) and stay mapped
 * while held (the owner drops held chains before the queue or RAM go);
 * sendmsg only reads them. */
void pv_vsock__flush_conn(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    static __thread struct iovec iov[FLUSH_IOV];
    k->flags &= ~PV_VSOCK_C_HELD_NEW;
    if (k->pending & PV_VSOCK_P_RST) {   /* the stream is over: nothing more is delivered */
        pv_vsock__held_drop(vs, k);
        return;
    }
    while (k->pend_len || k->held_n) {
        uint32_t n = 0;
        uint64_t want = 0;
        if (k->pend_len) {
            uint32_t first = k->buf_alloc - k->pend_head;
            if (first > k->pend_len)
                first = k->pend_len;
            iov[n].iov_base = k->pend + k->pend_head;
            iov[n++].iov_len = first;
            if (k->pend_len > first) {
                iov[n].iov_base = k->pend;
                iov[n++].iov_len = k->pend_len - first;
            }
            want = k->pend_len;
        }
        uint32_t i = k->held_first;
        for (uint32_t j = 0; j < k->held_n && n + PV_VSOCK_HOLD_IOV <= FLUSH_IOV; j++) {
            struct pv_vsock_held *e = &vs->held[i];
            n += (uint32_t)segs_slice(e->iov, e->niov, e->off, e->len - e->off, iov + n,
                                      PV_VSOCK_HOLD_IOV);
            want += e->len - e->off;
            i = e->next;
        }
        struct msghdr m = { .msg_iov = iov, .msg_iovlen = n };
        ssize_t r = sendmsg(k->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            if (errno == EAGAIN)
                break;
            conn_reset(vs, k);           /* the host end is gone (EPIPE, ECONNRESET) */
            return;
        }
        backlog_sent(vs, k, (uint64_t)r);
        if ((uint64_t)r < want)
            break;                       /* the socket is full: EPOLLOUT tells when not */
    }
    maybe_credit_update(vs, k);
    int want_out = k->pend_len || k->held_n;
    if (!!(k->flags & PV_VSOCK_C_EPOLLOUT) != want_out && k->flags & PV_VSOCK_C_IN_EPOLL)
        ep_set(vs, k, want_out);
    after_flush(vs, k);
}

/* End of a transmit batch for k: send what it brought, unless the socket
 * is known to be full (EPOLLOUT armed: pv_vsock_poll flushes when it is
 * not; a sendmsg now would only return EAGAIN). */
static void batch_done(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    if (k->flags & PV_VSOCK_C_EPOLLOUT && !(k->pending & PV_VSOCK_P_RST))
        k->flags &= ~PV_VSOCK_C_HELD_NEW;
    else
        pv_vsock__flush_conn(vs, k);
}

/* One RW packet of an established connection.  Returns 1 when the chain is
 * held (the caller must not complete it), 0 when it is done with.
 * SAFETY: `c` was resolved by pv_vq_pop (every segment lies inside guest
 * RAM) and has at least PV_VSOCK_HDR_LEN + h->len readable bytes (checked by
 * the caller); we only read from it. */
static int tx_rw(struct pv_vsock *vs, struct pv_vq *vq, struct pv_vsock_conn *k,
                 const struct pv_chain *c, const struct hdr *h)
{
    uint32_t len = h->len;
    if (k->flags & PV_VSOCK_C_PEER_SHUT_SEND ||
        (uint64_t)(uint32_t)(k->rx_cnt - k->fwd_cnt) + len > k->buf_alloc) {
        vs->malformed++;                 /* data after SHUTDOWN(SEND) or beyond our credit */
        conn_reset(vs, k);
        return 0;
    }
    k->rx_cnt += len;
    vs->rx_pkts++;
    vs->rx_bytes += len;
    if (len == 0)
        return 0;
    if (held_push(vs, vq, k, c, len)) {
        k->flags |= PV_VSOCK_C_HELD_NEW; /* sent with the batch's others (flush_conn) */
        return 1;
    }
    /* copied: straight to the socket if nothing waits, the rest to pend */
    uint32_t sent = 0;
    if (k->pend_len == 0) {
        static __thread struct iovec iov[PV_VQ_MAX_SIZE];
        struct msghdr m = { .msg_iov = iov };
        m.msg_iovlen = (size_t)segs_slice(c->iov, c->nread, PV_VSOCK_HDR_LEN, len, iov,
                                          PV_VQ_MAX_SIZE);
        ssize_t n;
        do
            n = sendmsg(k->fd, &m, MSG_NOSIGNAL | MSG_DONTWAIT);
        while (n < 0 && errno == EINTR);
        if (n < 0 && errno != EAGAIN) {
            conn_reset(vs, k);           /* the host end is gone (EPIPE, ECONNRESET) */
            return 0;
        }
        sent = n > 0 ? (uint32_t)n : 0;
        k->fwd_cnt += sent;
    }
    if (sent < len) {
        vs->backlog_bytes += len - sent;
        pend_append(k, c->iov, c->nread, PV_VSOCK_HDR_LEN + (uint64_t)sent, len - sent);
        pv_vsock__flush_conn(vs, k);     /* an older backlog may go now; arms EPOLLOUT */
    } else {
        maybe_credit_update(vs, k);
    }
    return 0;
}

int pv_vsock_tx(struct pv_vq *vq, struct pv_vsock *vs, struct pv_chain *c,
                struct pv_vsock_result *res)
{
    int r = 0;
    uint16_t used_before = vq->used_idx;
    struct pv_vsock_conn *batch = NULL;  /* holds chains of this batch not yet sent */
    memset(res, 0, sizeof(*res));
    for (;;) {
        uint32_t done = 0;
        while (done < PV_VSOCK_BUDGET && (r = pv_vq_pop(vq, c)) > 0) {
            done++;
            /* §5.10.6.2: header then payload, all device-readable */
            if (c->nread != c->nseg || c->read_len < PV_VSOCK_HDR_LEN) {
                vq->broken = PV_VQ_E_REQ;
                r = -PV_VQ_E_REQ;
                break;
            }
            struct hdr h;
            segs_get(c->iov, c->nread, 0, &h, sizeof(h));
            uint64_t avail = c->read_len - PV_VSOCK_HDR_LEN;
            struct pv_vsock_conn *k = NULL;
            if (h.src_cid == vs->guest_cid && h.dst_cid == PV_VSOCK_HOST_CID &&
                h.type == PV_VSOCK_TYPE_STREAM)
                k = find_conn(vs, h.dst_port, h.src_port);
            if (k && (h.op == PV_VSOCK_OP_RW || h.op == PV_VSOCK_OP_CREDIT_UPDATE) &&
                k->state == PV_VSOCK_ST_ESTABLISHED && h.len <= avail) {
                k->peer_buf_alloc = h.buf_alloc;   /* every packet carries credit */
                k->peer_fwd_cnt = h.fwd_cnt;
                k->flags &= ~PV_VSOCK_C_CREDIT_ASKED;
                if (batch && batch != k) {
                    batch_done(vs, batch);
                    batch = NULL;
                }
                /* (data is dropped if we are resetting the stream) */
                if (h.op == PV_VSOCK_OP_RW && !(k->pending & PV_VSOCK_P_RST) &&
                    tx_rw(vs, vq, k, c, &h)) {
                    batch = k;
                    continue;
                }
                pv_vq_push(vq, c->head, 0);
                continue;
            }
            if (batch) {                 /* its data first: Python may act on the stream */
                batch_done(vs, batch);
                batch = NULL;
            }
            pv_vq_push(vq, c->head, 0);
            memcpy(res->hdr, &h, sizeof(h));       /* Python decides */
            res->payload = (uint32_t)(avail < UINT32_MAX ? avail : UINT32_MAX);
            res->state = 1;
            goto out;
        }
        if (batch) {
            batch_done(vs, batch);
            batch = NULL;
        }
        if (r < 0) {
            res->error = r;
            break;
        }
        if (done >= PV_VSOCK_BUDGET) {
            res->state = 2;
            break;
        }
        if (!pv_vq_enable_notify(vq))
            break;
    }
out:
    res->completed = (uint16_t)(vq->used_idx - used_before);
    if (res->completed || vs->tx_pushed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
    vs->tx_pushed = 0;                   /* decided here */
    return res->error;
}

long pv_vsock_flush(struct pv_vsock *vs, uint32_t slot)
{
    if (slot >= vs->nslots || vs->conns[slot].state != PV_VSOCK_ST_ESTABLISHED)
        return -EINVAL;
    struct pv_vsock_conn *k = &vs->conns[slot];
    pv_vsock__flush_conn(vs, k);
    return k->pending & PV_VSOCK_P_RST ? -1 : 0;
}

/* SAFETY: as held_to_pend (held iovecs inside guest RAM, pend has room). */
uint32_t pv_vsock_unhold(struct pv_vsock *vs)
{
    uint32_t n = 0;
    for (uint32_t i = 0; i < vs->nslots; i++)
        for (struct pv_vsock_conn *k = &vs->conns[i]; k->held_n; n++)
            held_to_pend(vs, k);
    return n;
}


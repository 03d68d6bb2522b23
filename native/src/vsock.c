/* virtio-vsock data path (virtio 1.1 §5.10.6) for Firecracker's hybrid
 * vsock: guest streams are mapped 1:1 onto host Unix stream sockets.
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
 *
 * Receive queue (host -> guest): one pump over the connections emits, per
 * connection and in this order, REQUEST/RESPONSE, data read from the socket
 * straight into receive chains (never beyond the guest's credit:
 * peer_buf_alloc - (tx_cnt - peer_fwd_cnt)), CREDIT_UPDATE/CREDIT_REQUEST,
 * SHUTDOWN and RST; then RSTs for packets that had no connection.
 *
 * Host sockets are in an epoll set edge-triggered, so a socket we cannot
 * read for lack of credit or buffers does not make the I/O thread spin; the
 * WANT_READ flag remembers it until a read returns EAGAIN. */
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

struct hdr {
    uint64_t src_cid, dst_cid;
    uint32_t src_port, dst_port, len;
    uint16_t type, op;
    uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct hdr) == PV_VSOCK_HDR_LEN, "virtio_vsock_hdr is 44 bytes");

#define FLUSH_IOV 64                     /* iovecs per sendmsg of a connection's backlog */

/* Copy `len` bytes from byte offset `off` of the buffers iov[0, n).
 * SAFETY (segs_get, segs_put, segs_slice): the iovecs are a chain's, as
 * pv_vq_pop resolved them (each inside guest RAM), or a held chain's copy
 * of them; nothing beyond their lengths is touched. */
static void segs_get(const struct iovec *iov, uint32_t n, uint64_t off, void *dst, uint64_t len)
{
    uint8_t *p = dst;
    for (uint32_t i = 0; i < n && len; i++) {
        uint64_t l = iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        uint64_t take = l - off < len ? l - off : len;
        memcpy(p, (uint8_t *)iov[i].iov_base + off, take);
        p += take;
        len -= take;
        off = 0;
    }
}

static void segs_put(const struct iovec *iov, uint32_t n, uint64_t off, const void *src,
                     uint64_t len)
{
    const uint8_t *p = src;
    for (uint32_t i = 0; i < n && len; i++) {
        uint64_t l = iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        uint64_t take = l - off < len ? l - off : len;
        memcpy((uint8_t *)iov[i].iov_base + off, p, take);
        p += take;
        len -= take;
        off = 0;
    }
}

/* out = the buffers iov[0, n) from byte `off`, at most `len` bytes, in at
 * most `max` iovecs.  Returns the number of iovecs, or -1 if `max` is too
 * few. */
static int segs_slice(const struct iovec *iov, uint32_t n, uint64_t off, uint64_t len,
                      struct iovec *out, uint32_t max)
{
    uint32_t k = 0;
    for (uint32_t i = 0; i < n && len; i++) {
        uint64_t l = iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        if (k == max)
            return -1;
        uint64_t take = l - off < len ? l - off : len;
        out[k].iov_base = (uint8_t *)iov[i].iov_base + off;
        out[k].iov_len = take;
        k++;
        len -= take;
        off = 0;
    }
    return (int)k;
}

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

static uint32_t slot_of(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    return (uint32_t)(k - vs->conns);
}

static void ep_set(struct pv_vsock *vs, struct pv_vsock_conn *k, int out)
{
    struct epoll_event ev = {
        .events = EPOLLIN | EPOLLRDHUP | EPOLLET | (out ? EPOLLOUT : 0),
        .data.u64 = PV_VSOCK_EP_CONN | slot_of(vs, k),
    };
    int op = k->flags & PV_VSOCK_C_IN_EPOLL ? EPOLL_CTL_MOD : EPOLL_CTL_ADD;
    if (epoll_ctl(vs->epfd, op, k->fd, &ev) == 0) {
        k->flags |= PV_VSOCK_C_IN_EPOLL;
        k->flags = out ? k->flags | PV_VSOCK_C_EPOLLOUT : k->flags & ~PV_VSOCK_C_EPOLLOUT;
    }
}

static void ep_del(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    if (k->flags & PV_VSOCK_C_IN_EPOLL)
        epoll_ctl(vs->epfd, EPOLL_CTL_DEL, k->fd, NULL);
    k->flags &= ~(PV_VSOCK_C_IN_EPOLL | PV_VSOCK_C_EPOLLOUT);
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

static void held_drop(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    while (k->held_n)
        held_pop(vs, k);
}

/* Send RST and forget the connection (Python closes the socket when it
 * reaps); what it had not delivered yet is dropped, its chains completed. */
static void conn_reset(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    k->pending = PV_VSOCK_P_RST;
    held_drop(vs, k);
}

static void mark_dead(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    ep_del(vs, k);
    if (k->state != PV_VSOCK_ST_DEAD) {
        k->state = PV_VSOCK_ST_DEAD;
        vs->ndead++;
    }
}

static void maybe_credit_update(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    if ((uint32_t)(k->fwd_cnt - k->last_fwd_sent) >= vs->credit_threshold)
        k->pending |= PV_VSOCK_P_CREDIT_UPDATE;
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
static void flush_conn(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    static __thread struct iovec iov[FLUSH_IOV];
    k->flags &= ~PV_VSOCK_C_HELD_NEW;
    if (k->pending & PV_VSOCK_P_RST) {   /* the stream is over: nothing more is delivered */
        held_drop(vs, k);
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
        flush_conn(vs, k);
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
        flush_conn(vs, k);               /* an older backlog may go now; arms EPOLLOUT */
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

/* The next receive chain, or 0.  -PV_VQ_E_* when malformed. */
static int rx_pop(struct pv_vq *vq, struct pv_chain *c)
{
    for (;;) {
        int r = pv_vq_pop(vq, c);
        if (r < 0)
            return r;
        if (r > 0) {
            /* §5.10.6.1: receive buffers are device-writable, header first */
            if (c->nread != 0 || c->write_len < PV_VSOCK_HDR_LEN) {
                vq->broken = PV_VQ_E_REQ;
                return -PV_VQ_E_REQ;
            }
            return 1;
        }
        if (!pv_vq_enable_notify(vq))    /* ask for a kick when buffers come */
            return 0;
    }
}

static void fill_hdr(struct pv_vsock *vs, struct hdr *h, uint32_t src_port, uint32_t dst_port,
                     uint16_t op)
{
    memset(h, 0, sizeof(*h));
    h->src_cid = PV_VSOCK_HOST_CID;
    h->dst_cid = vs->guest_cid;
    h->src_port = src_port;
    h->dst_port = dst_port;
    h->type = PV_VSOCK_TYPE_STREAM;
    h->op = op;
}

/* Emit a header-only packet of connection k (its credit in the header).
 * Returns 1 sent, 0 no buffer, <0 malformed queue. */
static int rx_ctl(struct pv_vq *vq, struct pv_vsock *vs, struct pv_chain *c,
                  struct pv_vsock_conn *k, uint16_t op, uint32_t flags)
{
    int r = rx_pop(vq, c);
    if (r <= 0)
        return r;
    struct hdr h;
    fill_hdr(vs, &h, k->local_port, k->peer_port, op);
    h.flags = flags;
    h.buf_alloc = k->buf_alloc;
    h.fwd_cnt = k->fwd_cnt;
    k->last_fwd_sent = k->fwd_cnt;
    segs_put(c->iov, c->nseg, 0, &h, sizeof(h));
    pv_vq_push(vq, c->head, PV_VSOCK_HDR_LEN);
    return 1;
}

/* Read from the host socket into receive chains while the guest has credit
 * and buffers.  Returns 1 to go on, 0 out of buffers, <0 malformed queue.
 * SAFETY: chains come from rx_pop (writable, >= header, inside guest RAM);
 * readv never gets more than write_len - header bytes of iovecs. */
static int rx_data(struct pv_vq *vq, struct pv_vsock *vs, struct pv_chain *c,
                   struct pv_vsock_conn *k)
{
    static __thread struct iovec iov[PV_VQ_MAX_SIZE];
    while (k->flags & PV_VSOCK_C_WANT_READ) {
        uint32_t in_flight = k->tx_cnt - k->peer_fwd_cnt;
        uint32_t credit = in_flight < k->peer_buf_alloc ? k->peer_buf_alloc - in_flight : 0;
        if (credit == 0) {
            /* the guest's buffer is full: ask once where it stands (§5.10.6.3) */
            if (!(k->flags & PV_VSOCK_C_CREDIT_ASKED)) {
                k->flags |= PV_VSOCK_C_CREDIT_ASKED;
                k->pending |= PV_VSOCK_P_CREDIT_REQUEST;
            }
            return 1;
        }
        int r = rx_pop(vq, c);
        if (r <= 0)
            return r;
        uint64_t want = c->write_len - PV_VSOCK_HDR_LEN;
        if (want == 0) {
            /* §5.10.6.1 allows a receive buffer that holds just a header:
             * no room for data, and readv() of nothing returns 0, which
             * would read as the host's end of stream.  It carries a
             * CREDIT_UPDATE instead (found by fuzz_vsock's invariant). */
            struct hdr h;
            fill_hdr(vs, &h, k->local_port, k->peer_port, PV_VSOCK_OP_CREDIT_UPDATE);
            h.buf_alloc = k->buf_alloc;
            h.fwd_cnt = k->fwd_cnt;
            k->last_fwd_sent = k->fwd_cnt;
            k->pending &= ~PV_VSOCK_P_CREDIT_UPDATE;
            segs_put(c->iov, c->nseg, 0, &h, sizeof(h));
            pv_vq_push(vq, c->head, PV_VSOCK_HDR_LEN);
            continue;
        }
        if (want > credit)
            want = credit;
        if (want > PV_VSOCK_MAX_PKT)
            want = PV_VSOCK_MAX_PKT;
        int n_iov = segs_slice(c->iov, c->nseg, PV_VSOCK_HDR_LEN, want, iov, PV_VQ_MAX_SIZE);
        ssize_t n;
        do
            n = readv(k->fd, iov, n_iov);
        while (n < 0 && errno == EINTR);
        if (n <= 0) {
            vq->last_avail--;            /* give the chain back */
            k->flags &= ~PV_VSOCK_C_WANT_READ;
            if (n == 0) {                /* end of stream from the host */
                k->flags |= PV_VSOCK_C_HOST_EOF;
                k->shut_flags |= PV_VSOCK_SHUT_SEND |
                                 (k->flags & PV_VSOCK_C_HOST_HUP ? PV_VSOCK_SHUT_RCV : 0);
                k->pending |= PV_VSOCK_P_SHUTDOWN;
            } else if (errno != EAGAIN) {
                conn_reset(vs, k);
            }
            return 1;
        }
        struct hdr h;
        fill_hdr(vs, &h, k->local_port, k->peer_port, PV_VSOCK_OP_RW);
        h.len = (uint32_t)n;
        h.buf_alloc = k->buf_alloc;
        h.fwd_cnt = k->fwd_cnt;
        k->last_fwd_sent = k->fwd_cnt;
        k->pending &= ~PV_VSOCK_P_CREDIT_UPDATE;
        segs_put(c->iov, c->nseg, 0, &h, sizeof(h));
        pv_vq_push(vq, c->head, PV_VSOCK_HDR_LEN + (uint32_t)n);
        k->tx_cnt += (uint32_t)n;
        vs->tx_pkts++;
        vs->tx_bytes += (uint64_t)n;
    }
    return 1;
}

/* Everything connection k has to say.  Returns 1 done, 0 out of buffers. */
static int rx_conn(struct pv_vq *vq, struct pv_vsock *vs, struct pv_chain *c,
                   struct pv_vsock_conn *k)
{
    static const struct { uint32_t bit; uint16_t op; } ctl[] = {
        { PV_VSOCK_P_REQUEST, PV_VSOCK_OP_REQUEST },
        { PV_VSOCK_P_RESPONSE, PV_VSOCK_OP_RESPONSE },
        { 0, 0 },                        /* data goes here */
        { PV_VSOCK_P_CREDIT_UPDATE, PV_VSOCK_OP_CREDIT_UPDATE },
        { PV_VSOCK_P_CREDIT_REQUEST, PV_VSOCK_OP_CREDIT_REQUEST },
        { PV_VSOCK_P_SHUTDOWN, PV_VSOCK_OP_SHUTDOWN },
        { PV_VSOCK_P_RST, PV_VSOCK_OP_RST },
    };
    if (k->pending & PV_VSOCK_P_RST)     /* nothing else matters any more */
        k->pending = PV_VSOCK_P_RST;
    for (unsigned i = 0; i < sizeof(ctl) / sizeof(ctl[0]); i++) {
        int r;
        if (ctl[i].bit == 0) {
            if (k->state != PV_VSOCK_ST_ESTABLISHED || k->pending & PV_VSOCK_P_RST ||
                k->flags & (PV_VSOCK_C_HOST_EOF | PV_VSOCK_C_PEER_SHUT_RCV))
                continue;
            r = rx_data(vq, vs, c, k);
        } else if (k->pending & ctl[i].bit) {
            r = rx_ctl(vq, vs, c, k, ctl[i].op,
                       ctl[i].op == PV_VSOCK_OP_SHUTDOWN ? k->shut_flags : 0);
            if (r > 0) {
                k->pending &= ~ctl[i].bit;
                if (ctl[i].op == PV_VSOCK_OP_RST) {
                    vs->rst_sent++;
                    mark_dead(vs, k);
                }
                if (ctl[i].op == PV_VSOCK_OP_CREDIT_UPDATE || ctl[i].op == PV_VSOCK_OP_RW)
                    k->pending &= ~PV_VSOCK_P_CREDIT_UPDATE;
            }
        } else {
            continue;
        }
        if (r <= 0)
            return r;
    }
    return 1;
}

int pv_vsock_rx(struct pv_vq *vq, struct pv_vsock *vs, struct pv_chain *c,
                struct pv_vsock_result *res)
{
    uint16_t used_before = vq->used_idx;
    int r = 1;
    memset(res, 0, sizeof(*res));
    if (vq->broken) {
        res->error = -vq->broken;
        return res->error;
    }
    uint32_t n = vs->nslots;
    for (uint32_t j = 0; j < n && r > 0; j++) {
        uint32_t i = (vs->rr + j) % n;
        struct pv_vsock_conn *k = &vs->conns[i];
        if (k->state == PV_VSOCK_ST_FREE || k->state == PV_VSOCK_ST_DEAD)
            continue;
        r = rx_conn(vq, vs, c, k);
        if (r == 0)
            vs->rr = i;                  /* start here when buffers come */
    }
    while (r > 0 && vs->rst_len) {
        struct pv_vsock_rst *q = &vs->rstq[vs->rst_head];
        r = rx_pop(vq, c);
        if (r <= 0)
            break;
        struct hdr h;
        fill_hdr(vs, &h, q->src_port, q->dst_port, PV_VSOCK_OP_RST);
        segs_put(c->iov, c->nseg, 0, &h, sizeof(h));
        pv_vq_push(vq, c->head, PV_VSOCK_HDR_LEN);
        vs->rst_sent++;
        vs->rst_head = (vs->rst_head + 1) % PV_VSOCK_RSTQ;
        vs->rst_len--;
    }
    if (r < 0)
        res->error = r;
    else if (r == 0)
        res->state = 1;
    res->completed = (uint16_t)(vq->used_idx - used_before);
    if (res->completed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
    return res->error;
}

/* SAFETY: flushes read held chains' payloads in guest RAM (flush_conn). */
int pv_vsock_poll(struct pv_vsock *vs, struct pv_vsock_result *res)
{
    struct epoll_event ev[PV_VSOCK_MAX_EVENTS];
    memset(res, 0, sizeof(*res));
    int n = epoll_wait(vs->epfd, ev, PV_VSOCK_MAX_EVENTS, 0);
    if (n < 0)
        return errno == EINTR ? 0 : -errno;
    for (int i = 0; i < n; i++) {
        uint64_t d = ev[i].data.u64;
        if (!(d & PV_VSOCK_EP_CONN)) {   /* Python's own fd (listener, CONNECT line) */
            res->event_fd[res->nevents] = (int32_t)(uint32_t)d;
            res->event_mask[res->nevents++] = ev[i].events;
            continue;
        }
        uint32_t slot = (uint32_t)d;
        if (slot >= vs->nslots)
            continue;
        struct pv_vsock_conn *k = &vs->conns[slot];
        if (k->state != PV_VSOCK_ST_ESTABLISHED)
            continue;
        if (ev[i].events & EPOLLHUP)
            k->flags |= PV_VSOCK_C_HOST_HUP;
        if (ev[i].events & (EPOLLIN | EPOLLRDHUP | EPOLLHUP | EPOLLERR))
            k->flags |= PV_VSOCK_C_WANT_READ;
        if (k->flags & PV_VSOCK_C_HOST_EOF && ev[i].events & EPOLLHUP &&
            !(k->shut_flags & PV_VSOCK_SHUT_RCV)) {
            /* closed both ways after a half close: tell the guest it may not send */
            k->shut_flags |= PV_VSOCK_SHUT_RCV;
            k->pending |= PV_VSOCK_P_SHUTDOWN;
        }
        if (ev[i].events & (EPOLLOUT | EPOLLERR | EPOLLHUP) && (k->pend_len || k->held_n))
            flush_conn(vs, k);           /* completions: the owner checks vs->tx_pushed */
    }
    return n;
}

long pv_vsock_watch(struct pv_vsock *vs, int fd, int on)
{
    /* data.u64 = the fd with the high half clear: not PV_VSOCK_EP_CONN */
    struct epoll_event ev = { .events = EPOLLIN, .data.u64 = (uint32_t)fd };
    if (epoll_ctl(vs->epfd, on ? EPOLL_CTL_ADD : EPOLL_CTL_DEL, fd, &ev) < 0)
        return -errno;
    return 0;
}

long pv_vsock_conn_open(struct pv_vsock *vs, uint32_t slot, int fd, uint32_t local_port,
                        uint32_t peer_port, uint32_t state, uint32_t buf_alloc)
{
    if (slot >= vs->max_slots || buf_alloc == 0)
        return -EINVAL;
    struct pv_vsock_conn *k = &vs->conns[slot];
    if (k->state != PV_VSOCK_ST_FREE)
        return -EBUSY;
    /* untouched malloc'd pages cost no memory until data is held back */
    uint8_t *pend = malloc(buf_alloc);
    if (!pend)
        return -ENOMEM;
    memset(k, 0, sizeof(*k));
    k->fd = fd;
    k->local_port = local_port;
    k->peer_port = peer_port;
    k->buf_alloc = buf_alloc;
    k->pend = pend;
    k->state = state;
    if (slot >= vs->nslots)
        vs->nslots = slot + 1;
    return 0;
}

long pv_vsock_conn_start(struct pv_vsock *vs, uint32_t slot)
{
    if (slot >= vs->nslots)
        return -EINVAL;
    struct pv_vsock_conn *k = &vs->conns[slot];
    k->state = PV_VSOCK_ST_ESTABLISHED;
    k->flags |= PV_VSOCK_C_WANT_READ;    /* data may be there already (edge-triggered) */
    ep_set(vs, k, k->pend_len != 0 || k->held_n != 0);
    return k->flags & PV_VSOCK_C_IN_EPOLL ? 0 : -errno;
}

void pv_vsock_conn_free(struct pv_vsock *vs, uint32_t slot)
{
    if (slot >= vs->nslots)
        return;
    struct pv_vsock_conn *k = &vs->conns[slot];
    if (k->state == PV_VSOCK_ST_FREE)
        return;
    ep_del(vs, k);
    held_drop(vs, k);                    /* completed if the queue is live */
    free(k->pend);
    memset(k, 0, sizeof(*k));
    k->fd = -1;
    while (vs->nslots && vs->conns[vs->nslots - 1].state == PV_VSOCK_ST_FREE)
        vs->nslots--;
}

long pv_vsock_flush(struct pv_vsock *vs, uint32_t slot)
{
    if (slot >= vs->nslots || vs->conns[slot].state != PV_VSOCK_ST_ESTABLISHED)
        return -EINVAL;
    struct pv_vsock_conn *k = &vs->conns[slot];
    flush_conn(vs, k);
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

void pv_vsock_queue_rst(struct pv_vsock *vs, uint32_t src_port, uint32_t dst_port)
{
    if (vs->rst_len == PV_VSOCK_RSTQ) {
        vs->rst_dropped++;               /* a guest flooding bad packets loses RSTs */
        return;
    }
    struct pv_vsock_rst *q = &vs->rstq[(vs->rst_head + vs->rst_len) % PV_VSOCK_RSTQ];
    q->src_port = src_port;
    q->dst_port = dst_port;
    vs->rst_len++;
}

/* §5.10.6.6: one struct virtio_vsock_event (le32 id) into the event queue.
 * Returns 1 delivered, 0 no buffer, <0 malformed. */
int pv_vsock_event(struct pv_vq *vq, struct pv_chain *c, uint32_t id)
{
    int r = pv_vq_pop(vq, c);
    if (r <= 0)
        return r;
    if (c->nread != 0 || c->write_len < 4) {
        vq->broken = PV_VQ_E_REQ;
        return -PV_VQ_E_REQ;
    }
    segs_put(c->iov, c->nseg, 0, &id, 4);
    pv_vq_push(vq, c->head, 4);
    return 1;
}

long pv_timerfd_create(void)
{
    int fd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    return fd < 0 ? -errno : fd;
}

long pv_timerfd_arm(int fd, uint64_t ms)
{
    struct itimerspec t;
    memset(&t, 0, sizeof(t));
    t.it_value.tv_sec = (time_t)(ms / 1000);
    t.it_value.tv_nsec = (long)(ms % 1000) * 1000000;
    if (ms == 0)
        t.it_value.tv_nsec = 1;          /* 0 would disarm it */
    return timerfd_settime(fd, 0, &t, NULL) < 0 ? -errno : 0;
}

long pv_bench_stream(int fd, void *buf, uint64_t len, uint64_t total, int write_,
                      uint64_t stride, uint32_t nslots)
{
    uint64_t done = 0;
    for (uint32_t i = 0; done < total; i++) {
        uint64_t want = total - done < len ? total - done : len;
        uint8_t *p = (uint8_t *)buf + (uint64_t)(i % (nslots ? nslots : 1)) * stride;
        ssize_t r = write_ ? write(fd, p, want) : read(fd, p, want);
        if (r < 0) {
            if (errno == EINTR)
                continue;
            return -errno;
        }
        if (r == 0)
            break;
        done += (uint64_t)r;
    }
    return (long)done;
}

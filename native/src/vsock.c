/* virtio-vsock data path (virtio 1.1 §5.10.6) for Firecracker's hybrid
 * vsock: guest streams are mapped 1:1 onto host Unix stream sockets.
 *
 * Transmit queue (guest -> host): native/src/vsock_tx.c (RW chains held
 * until the host socket takes them, the backlog, CREDIT_UPDATEs; other
 * packets go to Python).
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
#include "vsock_int.h"

static void mark_dead(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    ep_del(vs, k);
    if (k->state != PV_VSOCK_ST_DEAD) {
        k->state = PV_VSOCK_ST_DEAD;
        vs->ndead++;
    }
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
            pv_vsock__flush_conn(vs, k);   /* completions: the owner checks tx_pushed */
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
    pv_vsock__held_drop(vs, k);          /* completed if the queue is live */
    free(k->pend);
    memset(k, 0, sizeof(*k));
    k->fd = -1;
    while (vs->nslots && vs->conns[vs->nslots - 1].state == PV_VSOCK_ST_FREE)
        vs->nslots--;
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


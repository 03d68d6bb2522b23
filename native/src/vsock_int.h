/* Internals shared by native/src/vsock.c (receive side, host socket events,
 * the connection table) and native/src/vsock_tx.c (transmit side: held
 * chains, the backlog); not part of the cffi interface. */
#ifndef PYVMM_VSOCK_INT_H
#define PYVMM_VSOCK_INT_H

#include <stdint.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/uio.h>

#include "pyvmm_native.h"

struct hdr {
    uint64_t src_cid, dst_cid;
    uint32_t src_port, dst_port, len;
    uint16_t type, op;
    uint32_t flags, buf_alloc, fwd_cnt;
} __attribute__((packed));

_Static_assert(sizeof(struct hdr) == PV_VSOCK_HDR_LEN, "virtio_vsock_hdr is 44 bytes");

/* Copy `len` bytes between `buf` and byte offset `off` of the buffers
 * iov[0, n): out of them (segs_get), or into them (segs_put, into_segs).
 * SAFETY (segs_copy, segs_get, segs_put, segs_slice): the iovecs are a chain's, as
 * pv_vq_pop resolved them (each inside guest RAM), or a held chain's copy
 * of them; nothing beyond their lengths is touched. */
static inline void segs_copy(const struct iovec *iov, uint32_t n, uint64_t off, uint8_t *buf,
                             uint64_t len, int into_segs)
{
    for (uint32_t i = 0; i < n && len; i++) {
        uint64_t l = iov[i].iov_len;
        if (off >= l) {
            off -= l;
            continue;
        }
        uint64_t take = l - off < len ? l - off : len;
        uint8_t *seg = (uint8_t *)iov[i].iov_base + off;
        if (into_segs)
            memcpy(seg, buf, take);
        else
            memcpy(buf, seg, take);
        buf += take;
        len -= take;
        off = 0;
    }
}

static inline void segs_get(const struct iovec *iov, uint32_t n, uint64_t off, void *dst, uint64_t len)
{
    segs_copy(iov, n, off, dst, len, 0);
}

static inline void segs_put(const struct iovec *iov, uint32_t n, uint64_t off, const void *src,
                            uint64_t len)
{
    segs_copy(iov, n, off, (uint8_t *)src, len, 1);     /* only read when into_segs */
}

/* out = the buffers iov[0, n) from byte `off`, at most `len` bytes, in at
 * most `max` iovecs.  Returns the number of iovecs, or -1 if `max` is too
 * few. */
static inline int segs_slice(const struct iovec *iov, uint32_t n, uint64_t off, uint64_t len,
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

static inline uint32_t slot_of(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    return (uint32_t)(k - vs->conns);
}

static inline void ep_set(struct pv_vsock *vs, struct pv_vsock_conn *k, int out)
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

static inline void ep_del(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    if (k->flags & PV_VSOCK_C_IN_EPOLL)
        epoll_ctl(vs->epfd, EPOLL_CTL_DEL, k->fd, NULL);
    k->flags &= ~(PV_VSOCK_C_IN_EPOLL | PV_VSOCK_C_EPOLLOUT);
}

static inline void maybe_credit_update(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    if ((uint32_t)(k->fwd_cnt - k->last_fwd_sent) >= vs->credit_threshold)
        k->pending |= PV_VSOCK_P_CREDIT_UPDATE;
}

/* vsock_tx.c: complete (or, without a live queue, forget) k's held chains;
 * write k's backlog to its socket (see there). */
void pv_vsock__held_drop(struct pv_vsock *vs, struct pv_vsock_conn *k);
void pv_vsock__flush_conn(struct pv_vsock *vs, struct pv_vsock_conn *k);

/* Send RST and forget the connection (Python closes the socket when it
 * reaps); what it had not delivered yet is dropped, its chains completed. */
static inline void conn_reset(struct pv_vsock *vs, struct pv_vsock_conn *k)
{
    k->pending = PV_VSOCK_P_RST;
    pv_vsock__held_drop(vs, k);
}

#endif

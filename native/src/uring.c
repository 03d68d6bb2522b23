/* virtio-blk over io_uring (io_engine=io_uring): the I/O thread submits reads,
 * writes and flushes without waiting for them, and reaps their completions
 * here, in C, when the ring's eventfd fires.
 *
 * Raw system calls (io_uring_setup(2), io_uring_enter(2), io_uring_register(2))
 * and <linux/io_uring.h> from linux-libc-dev: no liburing, so the native build
 * needs nothing new.  One ring per disk, as many entries as the virtqueue:
 * every request in flight holds a descriptor head, so the submission queue
 * can never overflow and the head doubles as the request's slot (user_data).
 *
 * Ordering (virtio 1.1 §5.2.6.4 / Linux's blk-mq): the device may complete
 * requests in any order, but a FLUSH must cover every write completed before
 * it was submitted.  A FLUSH goes in with IOSQE_IO_DRAIN: io_uring starts it
 * only after every earlier submission has completed, and starts later ones
 * only after it. */
#define _GNU_SOURCE
#include <errno.h>
#include <limits.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <unistd.h>
#include <linux/io_uring.h>

#include "uring_int.h"

/* Test seam: called with each SQE just before it is handed to the kernel
 * (NULL in production).  A FLUSH's ordering rests on IOSQE_IO_DRAIN, which a
 * test cannot observe on a page-cache file (every write completes at once),
 * so tests/unit/virtio/test_virtio_blk_uring.py checks the flags here. */
void (*pv_uring_sqe_hook)(uint8_t opcode, uint8_t flags, uint64_t user_data);

static long sys_setup(unsigned entries, struct io_uring_params *p)
{
    return syscall(__NR_io_uring_setup, entries, p);
}

static long sys_enter(int fd, unsigned submit, unsigned min_complete, unsigned flags)
{
    return syscall(__NR_io_uring_enter, fd, submit, min_complete, flags, NULL, 0);
}

void pv_uring_free(struct pv_uring *u)
{
    if (!u)
        return;
    pv_uring_drain(u);
    if (u->sqes && u->sqes != MAP_FAILED)
        munmap(u->sqes, u->sqes_len);
    if (u->cq_ring && u->cq_ring != MAP_FAILED)
        munmap(u->cq_ring, u->cq_len);
    if (u->sq_ring && u->sq_ring != MAP_FAILED)
        munmap(u->sq_ring, u->sq_len);
    if (u->fd >= 0)
        close(u->fd);
    if (u->slots)
        for (uint32_t i = 0; i < u->entries; i++)
            free(u->slots[i].iov);
    free(u->slots);
    free(u);
}

/* A ring of `entries` (the queue size, a power of two); completions signal
 * `efd` (an eventfd the I/O loop watches) when efd >= 0.  NULL with *err =
 * errno when io_uring is unavailable (old kernel, io_uring_disabled, seccomp). */
struct pv_uring *pv_uring_new(uint32_t entries, int efd, int *err)
{
    struct io_uring_params p;
    struct pv_uring *u = calloc(1, sizeof(*u));
    *err = ENOMEM;
    if (!u)
        return NULL;
    u->fd = -1;
    memset(&p, 0, sizeof(p));
    long fd = sys_setup(entries, &p);
    if (fd < 0) {
        *err = errno;
        goto fail;
    }
    u->fd = (int)fd;
    u->entries = p.sq_entries;
    u->sq_len = p.sq_off.array + p.sq_entries * sizeof(unsigned);
    u->cq_len = p.cq_off.cqes + p.cq_entries * sizeof(struct io_uring_cqe);
    u->sqes_len = p.sq_entries * sizeof(struct io_uring_sqe);
    u->sq_ring = mmap(NULL, u->sq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      u->fd, IORING_OFF_SQ_RING);
    u->cq_ring = mmap(NULL, u->cq_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                      u->fd, IORING_OFF_CQ_RING);
    u->sqes = mmap(NULL, u->sqes_len, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE,
                   u->fd, IORING_OFF_SQES);
    if (u->sq_ring == MAP_FAILED || u->cq_ring == MAP_FAILED || u->sqes == MAP_FAILED) {
        *err = errno;
        goto fail;
    }
    uint8_t *sq = u->sq_ring, *cq = u->cq_ring;
    u->sq_head = (unsigned *)(sq + p.sq_off.head);
    u->sq_tail = (unsigned *)(sq + p.sq_off.tail);
    u->sq_mask = (unsigned *)(sq + p.sq_off.ring_mask);
    u->sq_array = (unsigned *)(sq + p.sq_off.array);
    u->cq_head = (unsigned *)(cq + p.cq_off.head);
    u->cq_tail = (unsigned *)(cq + p.cq_off.tail);
    u->cq_mask = (unsigned *)(cq + p.cq_off.ring_mask);
    u->cqes = (struct io_uring_cqe *)(cq + p.cq_off.cqes);
    u->slots = calloc(u->entries, sizeof(*u->slots));
    if (!u->slots)
        goto fail;
    if (efd >= 0 && syscall(__NR_io_uring_register, u->fd, IORING_REGISTER_EVENTFD, &efd, 1) < 0) {
        *err = errno;
        goto fail;
    }
    u->efd = efd;
    *err = 0;
    return u;
fail:
    pv_uring_free(u);
    return NULL;
}

uint32_t pv_uring_inflight(const struct pv_uring *u)
{
    return u->inflight;
}

int pv_uring_flush_sq(struct pv_uring *u)
{
    while (u->to_submit) {
        long n = sys_enter(u->fd, u->to_submit, 0, 0);
        if (n < 0) {
            if (errno == EINTR || errno == EAGAIN || errno == EBUSY)
                continue;
            return -errno;
        }
        u->to_submit -= (uint32_t)n;
    }
    return 0;
}

/* Finish a transfer the kernel cut short (a read at the end of the file
 * reads zeros, as the sync engine does); 0 or -1. */
static int finish_short(int fd, struct uring_slot *s, uint64_t done, int write)
{
    struct iovec *iov = s->iov;
    uint32_t cnt = s->nvec;
    uint64_t off = s->off + done;
    while (cnt && done >= iov->iov_len) {
        done -= iov->iov_len;
        iov++;
        cnt--;
    }
    if (cnt) {
        iov->iov_base = (uint8_t *)iov->iov_base + done;
        iov->iov_len -= done;
    }
    while (cnt) {
        ssize_t n = write ? pwritev(fd, iov, (int)(cnt > IOV_MAX ? IOV_MAX : cnt), (off_t)off)
                          : preadv(fd, iov, (int)(cnt > IOV_MAX ? IOV_MAX : cnt), (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0 || (n == 0 && write))
            return -1;
        if (n == 0) {
            for (uint32_t i = 0; i < cnt; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        off += (uint64_t)n;
        while (cnt && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

/* SAFETY: a slot's status and iov point into guest RAM, checked to lie inside
 * one region by pv_vq_pop when the chain was popped; guest RAM stays mapped
 * until the device is closed, and close/reset drain the ring first
 * (pv_uring_drain), so the kernel never writes to memory that went away.
 * The guest may rewrite those bytes while the I/O is in flight: that only
 * changes what it reads back, as on real hardware. */
void pv_uring_complete(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u,
                       uint16_t head, int32_t r, struct pv_blk_result *res)
{
    struct uring_slot *s = &u->slots[head];
    uint32_t used_len = 1;
    int st = S_OK;
    if (r < 0)
        st = S_IOERR;
    else if (s->type != T_FLUSH && (uint64_t)r < s->len &&
             finish_short(blk->fd, s, (uint64_t)r, s->type == T_OUT) < 0)
        st = S_IOERR;
    if (st == S_OK && s->type == T_IN)
        used_len = (uint32_t)(s->len + 1);
    *s->status = (uint8_t)st;
    s->busy = 0;
    u->inflight--;
    res->ioerr += st == S_IOERR;
    pv_vq_push(vq, head, used_len);
    res->completed++;
}

/* SAFETY: user_data is a head this engine wrote; a CQE whose slot is not
 * busy (or out of range) is not ours and is skipped, so a slot is completed
 * (or, vq NULL, dropped) once. */
int pv_uring_reap_each(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u,
                       struct pv_blk_result *res, void (*after)(void *), void *arg)
{
    int n = 0;
    unsigned head = *u->cq_head;
    unsigned tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
    while (head != tail) {
        struct io_uring_cqe *cqe = &u->cqes[head & *u->cq_mask];
        uint64_t id = cqe->user_data;
        int32_t r = cqe->res;
        head++;
        n++;
        if (id >= u->entries || !u->slots[id].busy)
            continue;
        if (vq) {
            pv_uring_complete(vq, blk, u, (uint16_t)id, r, res);
            if (after)
                after(arg);
        } else {                      /* draining: drop it */
            u->slots[id].busy = 0;
            u->inflight--;
        }
    }
    __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
    return n;
}

static int reap(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u, struct pv_blk_result *res)
{
    return pv_uring_reap_each(vq, blk, u, res, NULL, NULL);
}

/* Completed requests so far: push them to the used ring (wait_all: first
 * wait until nothing is in flight). */
int pv_blk_uring_reap(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u, int wait_all,
                      struct pv_blk_result *res)
{
    memset(res, 0, sizeof(*res));
    int e = wait_all ? pv_uring_flush_sq(u) : 0;   /* nothing waited for unsubmitted */
    if (e < 0)
        res->error = e;
    for (;;) {
        reap(vq, blk, u, res);
        if (!wait_all || !u->inflight || res->error)
            break;
        if (sys_enter(u->fd, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) {
            res->error = -errno;
            break;
        }
    }
    if (res->completed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
    return 0;
}

/* Wait for everything in flight and drop the results (device reset or close:
 * the rings are going away, the guest gets no completion). */
int pv_uring_drain(struct pv_uring *u)
{
    struct pv_blk_result res;
    if (u->fd < 0 || !u->slots)
        return 0;
    pv_uring_flush_sq(u);
    while (u->inflight) {
        memset(&res, 0, sizeof(res));
        reap(NULL, NULL, u, &res);
        if (!u->inflight)
            break;
        if (sys_enter(u->fd, 0, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR && errno != EAGAIN)
            return -errno;
    }
    return 0;
}

static int slot_iov(struct uring_slot *s, uint32_t n)
{
    if (n > s->cap) {
        struct iovec *p = realloc(s->iov, n * sizeof(*p));
        if (!p)
            return -1;
        s->iov = p;
        s->cap = n;
    }
    s->nvec = n;
    return 0;
}

/* SAFETY: `c` was just popped by pv_vq_pop, so every segment lies inside one
 * guest RAM region (native/src/virtq.c); the header and the status byte are
 * found by walking those segments, never by trusting the guest's lengths
 * beyond them, and c->head < the ring's size (= u->entries: the ring was
 * made as large as the queue) indexes the slot.  See pv_uring_complete() for the
 * lifetime of the pointers kept in the slot. */
int pv_uring_prep(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u, struct pv_chain *c,
                  struct pv_blk_result *res)
{
    uint8_t hdr[16];
    uint32_t type = 0xFFFFFFFF;
    uint64_t sector = 0;
    if (c->read_len >= 16 && c->write_len >= 1) {
        /* the 16-byte header may be split across segments (§2.6.4) */
        uint64_t got = 0;
        for (uint32_t i = 0; i < c->nread && got < 16; i++) {
            uint64_t l = c->iov[i].iov_len < 16 - got ? c->iov[i].iov_len : 16 - got;
            memcpy(hdr + got, c->iov[i].iov_base, l);
            got += l;
        }
        memcpy(&type, hdr, 4);
        memcpy(&sector, hdr + 8, 8);
    }
    uint64_t in_len = c->read_len - 16, out_len = c->write_len - 1;
    uint32_t k = 0;
    int async = 0;
    if (type == T_IN && !in_len)
        async = out_len % SECTOR == 0 && sector <= blk->capacity &&
                out_len / SECTOR <= blk->capacity - sector;
    else if (type == T_OUT && !out_len)
        async = !blk->readonly && in_len % SECTOR == 0 && sector <= blk->capacity &&
                in_len / SECTOR <= blk->capacity - sector;
    else if (type == T_FLUSH && !in_len && !out_len)
        async = 1;
    struct uring_slot *s = c->head < u->entries ? &u->slots[c->head] : NULL;
    if (async && (!s || s->busy))
        async = 0;            /* cannot happen with a sane ring: do it inline */
    if (async) {
        /* data segments: the chain minus the 16-byte header (reads
         * side) or minus the status byte (write side) */
        const struct iovec *src = type == T_OUT ? c->iov : c->iov + c->nread;
        uint32_t nsrc = type == T_OUT ? c->nread : c->nseg - c->nread;
        uint64_t skip = type == T_OUT ? 16 : 0, len = type == T_OUT ? in_len : out_len;
        if (type != T_FLUSH && slot_iov(s, nsrc) < 0)
            async = 0;
        for (uint32_t i = 0; async && type != T_FLUSH && i < nsrc && len; i++) {
            uint64_t l = src[i].iov_len;
            if (skip >= l) {
                skip -= l;
                continue;
            }
            uint64_t take = l - skip < len ? l - skip : len;
            s->iov[k].iov_base = (uint8_t *)src[i].iov_base + skip;
            s->iov[k].iov_len = take;
            k++;
            len -= take;
            skip = 0;
        }
    }
    if (async) {
        /* the status byte: the last byte of the writable part */
        uint64_t pos = c->write_len - 1;
        const struct iovec *w = c->iov + c->nread;
        for (uint32_t i = 0; i < c->nseg - c->nread; i++) {
            if (pos < w[i].iov_len) {
                s->status = (uint8_t *)w[i].iov_base + pos;
                break;
            }
            pos -= w[i].iov_len;
        }
        s->nvec = k;
        s->type = (uint8_t)type;
        s->off = sector * SECTOR;
        s->len = type == T_OUT ? in_len : type == T_IN ? out_len : 0;
        unsigned tail = *u->sq_tail;
        unsigned idx = tail & *u->sq_mask;
        struct io_uring_sqe *sqe = &u->sqes[idx];
        memset(sqe, 0, sizeof(*sqe));
        sqe->fd = blk->fd;
        sqe->user_data = c->head;
        if (type == T_FLUSH) {
            sqe->opcode = IORING_OP_FSYNC;
            sqe->fsync_flags = IORING_FSYNC_DATASYNC;
            sqe->flags = IOSQE_IO_DRAIN;
        } else if (k == 1) {
            /* one segment (the common 4 KiB page): the plain opcode, no
             * iovec for the kernel to import */
            sqe->opcode = type == T_IN ? IORING_OP_READ : IORING_OP_WRITE;
            sqe->addr = (uint64_t)(uintptr_t)s->iov[0].iov_base;
            sqe->len = (uint32_t)s->iov[0].iov_len;
            sqe->off = s->off;
        } else {
            sqe->opcode = type == T_IN ? IORING_OP_READV : IORING_OP_WRITEV;
            sqe->addr = (uint64_t)(uintptr_t)s->iov;
            sqe->len = k;
            sqe->off = s->off;
        }
        u->sq_array[idx] = idx;
        if (pv_uring_sqe_hook)
            pv_uring_sqe_hook(sqe->opcode, sqe->flags, sqe->user_data);
        __atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
        u->to_submit++;
        s->busy = 1;
        u->inflight++;
        return 1;
    }
    int st = pv_blk_complete(vq, blk, c, res);     /* served at once, as the sync engine */
    return st < 0 ? st : 0;
}

/* Take every available chain: reads, writes and flushes go to the ring; every
 * other request (GET_ID, DISCARD, WRITE_ZEROES, out-of-range, unsupported)
 * is done at once by pv_blk_request, as the sync engine does.  Then hand the
 * new entries to the kernel and reap whatever already completed (page-cache
 * hits complete inside io_uring_enter). */
int pv_blk_uring_submit(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u,
                        struct pv_chain *c, struct pv_blk_result *res)
{
    struct pv_blk_result done;
    int r = 0;
    uint32_t budget = blk->budget ? blk->budget : PV_BLK_BUDGET, taken = 0;
    memset(res, 0, sizeof(*res));
    for (;;) {
        /* at most `budget` requests per call (issue #14), as pv_blk_process */
        while (taken < budget && (r = pv_vq_pop(vq, c)) > 0) {
            taken++;
            if ((r = pv_uring_prep(vq, blk, u, c, res)) < 0)
                break;
        }
        if (r < 0) {
            res->error = r;
            break;
        }
        if (taken >= budget) {
            res->more = 1;            /* the transport calls again later */
            break;
        }
        if (!pv_vq_enable_notify(vq))
            break;
    }
    int e = pv_uring_flush_sq(u);
    if (e < 0 && !res->error)
        res->error = e;
    memset(&done, 0, sizeof(done));
    reap(vq, blk, u, &done);
    res->completed += done.completed;
    res->ioerr += done.ioerr;
    /* Page-cache hits complete inside io_uring_enter and were reaped just
     * now; with nothing left in flight their eventfd signals can only wake
     * the I/O loop for nothing, so consume them (no completion can be
     * pending, so none is lost; the eventfd is non-blocking). */
    if (!u->inflight && u->efd >= 0) {
        uint64_t v;
        if (read(u->efd, &v, sizeof(v)) < 0 && errno != EAGAIN)
            res->error = res->error ? res->error : -errno;
    }
    if (res->completed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
    return res->error;
}

/* the io_uring reference of bench/blk.py: n reads (or writes) of `len` bytes
 * at offsets[i], `depth` in flight, buffers bufs + (i % depth) * len.
 * Returns bytes moved or -errno. */
long pv_bench_uring(int fd, uint8_t *bufs, uint64_t len, const uint64_t *offsets, uint32_t n,
                    uint32_t depth, int write)
{
    int err;
    struct pv_uring *u = pv_uring_new(depth < 2 ? 2 : depth, -1, &err);
    long total = 0;
    uint32_t next = 0, done = 0;
    if (!u)
        return -err;
    while (done < n) {
        while (next < n && u->inflight < depth) {
            unsigned tail = *u->sq_tail, idx = tail & *u->sq_mask;
            struct io_uring_sqe *sqe = &u->sqes[idx];
            memset(sqe, 0, sizeof(*sqe));
            sqe->opcode = write ? IORING_OP_WRITE : IORING_OP_READ;
            sqe->fd = fd;
            sqe->addr = (uint64_t)(uintptr_t)(bufs + (uint64_t)(next % depth) * len);
            sqe->len = (uint32_t)len;
            sqe->off = offsets[next];
            sqe->user_data = next;
            u->sq_array[idx] = idx;
            __atomic_store_n(u->sq_tail, tail + 1, __ATOMIC_RELEASE);
            u->inflight++;
            next++;
        }
        unsigned submit = *u->sq_tail - __atomic_load_n(u->sq_head, __ATOMIC_ACQUIRE);
        if (sys_enter(u->fd, submit, 1, IORING_ENTER_GETEVENTS) < 0 && errno != EINTR) {
            total = -errno;
            break;
        }
        unsigned head = *u->cq_head, tail = __atomic_load_n(u->cq_tail, __ATOMIC_ACQUIRE);
        for (; head != tail; head++) {
            int32_t r = u->cqes[head & *u->cq_mask].res;
            if (r < 0 && total >= 0)
                total = r;
            else if (total >= 0)
                total += r;
            u->inflight--;
            done++;
        }
        __atomic_store_n(u->cq_head, head, __ATOMIC_RELEASE);
    }
    u->inflight = 0;
    pv_uring_free(u);
    return total;
}

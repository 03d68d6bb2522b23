/* virtio-blk request engine (virtio 1.1 §5.2.6) over a raw image fd.
 *
 * A request is a chain: a 16-byte device-readable header (type, reserved,
 * sector), a payload, and one device-writable status byte at the very end.
 * Framing is free (§2.6.4): header, payload and status may be split across
 * or share descriptors, so everything works on byte offsets into the
 * chain's iovec.  A chain that cannot hold a request, or whose payload is in
 * the wrong direction for its type, is malformed (-PV_VQ_E_REQ): nothing is
 * written, to the image or to guest memory. */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <string.h>
#include <unistd.h>
#include <linux/falloc.h>

#include "pyvmm_native.h"

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define T_GET_ID 8
#define T_DISCARD 11
#define T_WRITE_ZEROES 13
#define S_OK 0
#define S_IOERR 1
#define S_UNSUPP 2
#define SECTOR 512ull
#define WZ_F_UNMAP 1u
#define ID_BYTES 20

/* Copy out of / into the chain's segments [first, first+n) starting `skip`
 * bytes in: a sub-iovec of exactly `len` bytes (zero-length entries dropped). */
static int iov_slice(const struct iovec *src, uint32_t n, uint64_t skip, uint64_t len,
                     struct iovec *dst)
{
    int k = 0;
    for (uint32_t i = 0; i < n && len; i++) {
        uint64_t l = src[i].iov_len;
        if (skip >= l) {
            skip -= l;
            continue;
        }
        uint64_t take = l - skip < len ? l - skip : len;
        dst[k].iov_base = (uint8_t *)src[i].iov_base + skip;
        dst[k].iov_len = take;
        k++;
        len -= take;
        skip = 0;
    }
    return k;
}

static void iov_copy_out(const struct iovec *iov, int n, void *buf, uint64_t len)
{
    uint8_t *p = buf;
    for (int i = 0; i < n && len; i++) {
        uint64_t l = iov[i].iov_len < len ? iov[i].iov_len : len;
        memcpy(p, iov[i].iov_base, l);
        p += l;
        len -= l;
    }
}

static void iov_copy_in(const struct iovec *iov, int n, const void *buf, uint64_t len)
{
    const uint8_t *p = buf;
    for (int i = 0; i < n && len; i++) {
        uint64_t l = iov[i].iov_len < len ? iov[i].iov_len : len;
        memcpy(iov[i].iov_base, p, l);
        p += l;
        len -= l;
    }
}

/* preadv/pwritev until done (short transfers and EINTR); a read past the end
 * of the file reads zeros.  Consumes the iovec. */
static int rw_all(int fd, struct iovec *iov, int cnt, uint64_t off, int write)
{
    while (cnt > 0) {
        int batch = cnt > IOV_MAX ? IOV_MAX : cnt;
        ssize_t n;
        if (batch == 1)     /* the common case: pread/pwrite skip the iovec import */
            n = write ? pwrite(fd, iov->iov_base, iov->iov_len, (off_t)off)
                      : pread(fd, iov->iov_base, iov->iov_len, (off_t)off);
        else
            n = write ? pwritev(fd, iov, batch, (off_t)off) : preadv(fd, iov, batch, (off_t)off);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {
            if (write)
                return -1;
            for (int i = 0; i < cnt; i++)
                memset(iov[i].iov_base, 0, iov[i].iov_len);
            return 0;
        }
        off += (uint64_t)n;
        while (cnt > 0 && (size_t)n >= iov->iov_len) {
            n -= (ssize_t)iov->iov_len;
            iov++;
            cnt--;
        }
        if (cnt > 0) {
            iov->iov_base = (uint8_t *)iov->iov_base + n;
            iov->iov_len -= (size_t)n;
        }
    }
    return 0;
}

static int in_range(const struct pv_blk *blk, uint64_t sector, uint64_t nsectors)
{
    return sector <= blk->capacity && nsectors <= blk->capacity - sector;
}

static int write_zeros(int fd, uint64_t off, uint64_t len)
{
    static const uint8_t zeros[65536];
    while (len) {
        size_t l = len < sizeof(zeros) ? len : sizeof(zeros);
        ssize_t n = pwrite(fd, zeros, l, (off_t)off);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            return -1;
        off += (uint64_t)n;
        len -= (uint64_t)n;
    }
    return 0;
}

/* Test seam: called once the segments are checked and before any is applied
 * (NULL in production).  tests/native uses it to rewrite guest memory at the
 * moment a second vCPU could, and shows the checked copy is what is used. */
void (*pv_blk_seg_hook)(void *arg);
void *pv_blk_seg_hook_arg;

struct blk_seg {
    uint64_t sector;
    uint32_t num;
    uint32_t flags;
};

/* §5.2.6.2: an array of {le64 sector; le32 num_sectors; le32 flags}.
 * SAFETY: `iov` points into guest memory that other vCPUs may change at any
 * time, so the segments are copied out exactly once into `segs` and only
 * that private copy is checked and then applied: a guest cannot swap in an
 * out-of-range sector after the check (which would grow the image file).
 * All segments are checked before any is applied. */
static int discard_wz(struct pv_blk *blk, const struct iovec *iov, int n, uint64_t len, int type)
{
    struct blk_seg segs[PV_BLK_MAX_SEGS];
    uint32_t max_seg = type == T_DISCARD ? blk->max_discard_seg : blk->max_write_zeroes_seg;
    uint32_t max_sec = type == T_DISCARD ? blk->max_discard_sectors : blk->max_write_zeroes_sectors;
    if (blk->readonly || len % 16)
        return S_IOERR;
    uint64_t nseg = len / 16;
    if (nseg > max_seg || nseg > PV_BLK_MAX_SEGS)
        return S_IOERR;
    uint8_t raw[16];
    struct iovec tmp[PV_VQ_MAX_SIZE];
    for (uint64_t s = 0; s < nseg; s++) {
        int k = iov_slice(iov, (uint32_t)n, 16 * s, 16, tmp);
        iov_copy_out(tmp, k, raw, 16);
        memcpy(&segs[s].sector, raw, 8);
        memcpy(&segs[s].num, raw + 8, 4);
        memcpy(&segs[s].flags, raw + 12, 4);
        const struct blk_seg *g = &segs[s];
        if (g->flags & ~WZ_F_UNMAP)
            return S_UNSUPP;
        if (type == T_DISCARD && (g->flags & WZ_F_UNMAP))
            return S_UNSUPP;
        /* in_range bounds sector + num by the capacity, which the Python
         * side keeps below 2^63 / 512, so the byte offsets cannot overflow */
        if (g->num > max_sec || !in_range(blk, g->sector, g->num) || g->sector > PV_BLK_MAX_SECTOR)
            return S_IOERR;
    }
    if (pv_blk_seg_hook)
        pv_blk_seg_hook(pv_blk_seg_hook_arg);
    for (uint64_t s = 0; s < nseg; s++) {
        const struct blk_seg *g = &segs[s];
        off_t off = (off_t)(g->sector * SECTOR), l = (off_t)((uint64_t)g->num * SECTOR);
        if (!l)
            continue;
        if (type == T_DISCARD) {
            /* advisory: a file system without punch-hole still succeeds */
            if (fallocate(blk->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, l) < 0 &&
                errno != EOPNOTSUPP && errno != ENOSYS)
                return S_IOERR;
            continue;
        }
        if ((g->flags & WZ_F_UNMAP) &&
            fallocate(blk->fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, off, l) == 0)
            continue;
        if (!blk->no_zero_range) {
            if (fallocate(blk->fd, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, off, l) == 0)
                continue;
            if (errno != EOPNOTSUPP && errno != ENOSYS && errno != EINVAL)
                return S_IOERR;
            blk->no_zero_range = 1;
        }
        if (write_zeros(blk->fd, (uint64_t)off, (uint64_t)l) < 0)
            return S_IOERR;
    }
    return S_OK;
}

/* Perform one request.  Returns the status written (>= 0) with *used_len
 * the bytes written into the chain, or -PV_VQ_E_REQ if the chain is not a
 * request (then nothing was written). */
int pv_blk_request(struct pv_blk *blk, struct pv_chain *c, uint32_t *used_len)
{
    struct iovec tmp[PV_VQ_MAX_SIZE];
    uint8_t hdr[16];
    const struct iovec *rd = c->iov, *wr = c->iov + c->nread;
    uint32_t nwr = c->nseg - c->nread;
    if (c->read_len < 16 || c->write_len < 1)
        return -PV_VQ_E_REQ;
    uint64_t in_len = c->read_len - 16;      /* payload the driver gave us */
    uint64_t out_len = c->write_len - 1;     /* room for data before the status */
    int k = iov_slice(rd, c->nread, 0, 16, tmp);
    iov_copy_out(tmp, k, hdr, 16);
    uint32_t type;
    uint64_t sector;
    memcpy(&type, hdr, 4);
    memcpy(&sector, hdr + 8, 8);
    k = iov_slice(wr, nwr, out_len, 1, tmp);
    uint8_t *status = tmp[0].iov_base;
    int s;
    *used_len = 1;
    switch (type) {
    case T_IN:
        if (in_len)
            return -PV_VQ_E_REQ;
        if (out_len % SECTOR || !in_range(blk, sector, out_len / SECTOR)) {
            s = S_IOERR;
            break;
        }
        k = iov_slice(wr, nwr, 0, out_len, tmp);
        s = rw_all(blk->fd, tmp, k, sector * SECTOR, 0) < 0 ? S_IOERR : S_OK;
        if (s == S_OK)      /* exact: pv_vq_pop bounds a chain below 2^32 bytes */
            *used_len = (uint32_t)(out_len + 1);
        break;
    case T_OUT:
        if (out_len)
            return -PV_VQ_E_REQ;
        if (blk->readonly || in_len % SECTOR || !in_range(blk, sector, in_len / SECTOR)) {
            s = S_IOERR;
            break;
        }
        k = iov_slice(rd, c->nread, 16, in_len, tmp);
        s = rw_all(blk->fd, tmp, k, sector * SECTOR, 1) < 0 ? S_IOERR : S_OK;
        break;
    case T_FLUSH:
        if (in_len || out_len)
            return -PV_VQ_E_REQ;
        if (pv_blk_flush_hook)
            pv_blk_flush_hook(blk->fd);
        s = fdatasync(blk->fd) < 0 ? S_IOERR : S_OK;
        break;
    case T_GET_ID: {
        if (in_len)
            return -PV_VQ_E_REQ;
        uint64_t n = out_len < ID_BYTES ? out_len : ID_BYTES;
        k = iov_slice(wr, nwr, 0, n, tmp);
        iov_copy_in(tmp, k, blk->id, n);
        *used_len = (uint32_t)(n + 1);
        s = S_OK;
        break;
    }
    case T_DISCARD:
    case T_WRITE_ZEROES:
        if (out_len)
            return -PV_VQ_E_REQ;
        k = iov_slice(rd, c->nread, 16, in_len, tmp);
        s = discard_wz(blk, tmp, k, in_len, (int)type);
        break;
    default:
        s = S_UNSUPP;
    }
    *status = (uint8_t)s;
    return s;
}

/* Test seam: called just before a FLUSH's fdatasync (NULL in production).
 * tests/unit uses it to make one disk's flush block and shows that the other
 * devices, each on its own I/O thread, still complete requests. */
void (*pv_blk_flush_hook)(int fd);

/* Perform at most `budget` available chains and push them; if the budget
 * ran out with chains still available, set res->more and return without
 * re-arming notifications: the caller re-queues the work (signals the notify
 * eventfd again, so the I/O thread comes back after its other fds and can be
 * stopped in between).  Otherwise re-arm notifications (EVENT_IDX) and go
 * on if the driver raced us.  A guest can thus make one call do at most
 * `budget` requests, each bounded by the chain limit (< 4 GiB). */
/* SAFETY: `c` is the chain pv_vq_pop() just returned from `vq` (its
 * guest ranges checked there); pv_blk_request() checks the rest. */
int pv_blk_complete(struct pv_vq *vq, struct pv_blk *blk, struct pv_chain *c,
                    struct pv_blk_result *res)
{
    uint32_t used_len;
    int s = pv_blk_request(blk, c, &used_len);
    if (s < 0) {
        vq->broken = (uint8_t)-s;
        return s;
    }
    res->ioerr += s == S_IOERR;
    pv_vq_push(vq, c->head, used_len);
    res->completed++;
    return 1;
}

int pv_blk_process(struct pv_vq *vq, struct pv_blk *blk, struct pv_chain *c,
                   struct pv_blk_result *res)
{
    uint32_t budget = blk->budget ? blk->budget : PV_BLK_BUDGET;
    int r = 0;
    memset(res, 0, sizeof(*res));
    for (;;) {
        while (res->completed < budget && (r = pv_vq_pop(vq, c)) > 0)
            if ((r = pv_blk_complete(vq, blk, c, res)) < 0)
                break;
        if (r < 0) {
            res->error = r;
            break;
        }
        if (res->completed >= budget) {
            /* more may be there (or not: then the next call finds the ring
             * empty and re-arms notifications) */
            res->more = 1;
            break;
        }
        if (!pv_vq_enable_notify(vq))
            break;
    }
    if (res->completed)
        res->interrupt = (uint32_t)pv_vq_need_interrupt(vq);
    return res->error;
}

long pv_bench_pread(int fd, void *buf, uint64_t len, const uint64_t *offsets, uint32_t n)
{
    long total = 0;
    for (uint32_t i = 0; i < n; i++) {
        ssize_t r = pread(fd, buf, len, (off_t)offsets[i]);
        if (r < 0)
            return -errno;
        total += r;
    }
    return total;
}

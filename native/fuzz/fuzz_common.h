/* Shared scaffolding of the libFuzzer harnesses in native/fuzz/ (one .c per
 * target, compiled straight from native/src with
 * -fsanitize=fuzzer,address,undefined: see `make fuzz`).
 *
 * The fuzz input is the guest: a small guest memory and the queue state.
 *
 *   input = [32-byte header][guest memory image ...]  ...  [ops, read backwards]
 *
 * The header picks the queue (size, feature flags, ring addresses, the
 * device's starting indexes); the bytes after it fill the guest RAM regions
 * in order (the rest stays zero); "ops" are taken from the end of the input
 * (as FuzzedDataProvider does), so growing one part does not shift the
 * other.  Ops drive the device and play a second vCPU that rewrites guest
 * memory between device steps.
 *
 * Guest RAM is three regions, each its own page-aligned mapping between
 * PROT_NONE guard pages, so any access past a region faults at once (and
 * ASan/UBSan catch the rest); one region ends exactly at 2^64 to exercise
 * address overflow.  A shadow copy of guest memory tracks what the guest
 * wrote and what the device is allowed to write (used ring, avail_event,
 * writable buffers); at the end, live and shadow must be equal: the device
 * wrote nothing else.
 */
#ifndef PYVMM_FUZZ_COMMON_H
#define PYVMM_FUZZ_COMMON_H

#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#include "pyvmm_native.h"

#define FZ_PAGE 4096u
#define FZ_NREG 3
#define FZ_HDR 32
#define FZ_REG_SIZE 0x1000u
static const uint64_t fz_reg_gpa[FZ_NREG] = {0x0, 0x3000, 0xFFFFFFFFFFFFF000ull};

#define FZ_CHECK(cond, ...)                                                          \
    do {                                                                             \
        if (!(cond)) {                                                               \
            fprintf(stderr, "INVARIANT BROKEN %s:%d: %s: ", __FILE__, __LINE__, #cond); \
            fprintf(stderr, __VA_ARGS__);                                            \
            fprintf(stderr, "\n");                                                   \
            abort();                                                                 \
        }                                                                            \
    } while (0)

struct fz_in {
    const uint8_t *p;
    size_t n;            /* bytes left for ops (from the back) */
};

static uint8_t *fz_host[FZ_NREG];        /* live guest memory */
static uint8_t fz_shadow[FZ_NREG][FZ_REG_SIZE];
static struct pv_mem fz_mem;

static void fz_init_mem(void)
{
    if (fz_host[0])
        return;
    fz_mem.nregions = FZ_NREG;
    for (int i = 0; i < FZ_NREG; i++) {
        /* guard page, region, guard page */
        uint8_t *m = mmap(NULL, FZ_REG_SIZE + 2 * FZ_PAGE, PROT_NONE,
                          MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (m == MAP_FAILED || mprotect(m + FZ_PAGE, FZ_REG_SIZE, PROT_READ | PROT_WRITE)) {
            perror("fuzz: guest memory");
            abort();
        }
        fz_host[i] = m + FZ_PAGE;
        fz_mem.r[i].gpa = fz_reg_gpa[i];
        fz_mem.r[i].size = FZ_REG_SIZE;
        fz_mem.r[i].host = fz_host[i];
    }
}

/* Fill guest memory from the input (after the header) and copy it to the shadow. */
static void fz_load_mem(const uint8_t *data, size_t size)
{
    fz_init_mem();
    const uint8_t *src = size > FZ_HDR ? data + FZ_HDR : data;
    size_t left = size > FZ_HDR ? size - FZ_HDR : 0;
    for (int i = 0; i < FZ_NREG; i++) {
        size_t n = left < FZ_REG_SIZE ? left : FZ_REG_SIZE;
        memcpy(fz_host[i], src, n);
        memset(fz_host[i] + n, 0, FZ_REG_SIZE - n);
        memcpy(fz_shadow[i], fz_host[i], FZ_REG_SIZE);
        src += n;
        left -= n;
    }
}

/* Header field readers (zero past the end of a short input). */
static uint64_t fz_hdr(const uint8_t *data, size_t size, size_t off, size_t len)
{
    uint64_t v = 0;
    for (size_t i = 0; i < len; i++)
        if (off + i < size && off + i < FZ_HDR)
            v |= (uint64_t)data[off + i] << (8 * i);
    return v;
}

static void fz_ops_init(struct fz_in *in, const uint8_t *data, size_t size)
{
    in->p = data;
    in->n = size;
}

static int fz_ops_left(const struct fz_in *in) { return in->n > 0; }

static uint64_t fz_take(struct fz_in *in, int bytes)
{
    uint64_t v = 0;
    for (int i = 0; i < bytes && in->n; i++)
        v = (v << 8) | in->p[--in->n];
    return v;
}

/* A gpa from a 16-bit header value: low RAM (regions 0 and 1 and the hole
 * between them) or, with `high`, inside the region that ends at 2^64. */
static uint64_t fz_gpa(uint16_t v, int high)
{
    return high ? fz_reg_gpa[2] + (v & 0xFFF) : v;
}

/* Region index and offset of a host pointer range, or -1 when [p, p+len)
 * is not entirely inside one region. */
static int fz_locate(const void *p, uint64_t len, uint64_t *off)
{
    uintptr_t a = (uintptr_t)p;
    for (int i = 0; i < FZ_NREG; i++) {
        uintptr_t b = (uintptr_t)fz_host[i];
        if (a >= b && a - b <= FZ_REG_SIZE && len <= FZ_REG_SIZE - (a - b)) {
            *off = a - b;
            return i;
        }
    }
    return -1;
}

/* Host pointer of a guest range (NULL if not inside one region). */
static uint8_t *fz_ptr(uint64_t gpa, uint64_t len)
{
    void *h;
    return pv_mem_translate(&fz_mem, gpa, len, &h) ? NULL : h;
}

/* A guest (second vCPU) write: into live memory and the shadow alike. */
static void fz_guest_write(uint64_t gpa, const void *src, uint64_t len)
{
    uint8_t *h = fz_ptr(gpa, len);
    uint64_t off;
    if (!h)
        return;
    int r = fz_locate(h, len, &off);
    memcpy(h, src, len);
    memcpy(fz_shadow[r] + off, src, len);
}

/* The device may write [p, p+len) (a used element, avail_event, or a
 * device-writable buffer): copy what it wrote to the shadow. */
static void fz_allow(const void *p, uint64_t len)
{
    uint64_t off;
    int r = fz_locate(p, len, &off);
    FZ_CHECK(r >= 0, "device-writable range %p+%llu not in guest RAM", p, (unsigned long long)len);
    memcpy(fz_shadow[r] + off, p, len);
}

/* Every byte the device wrote was allowed. */
static void fz_check_mem(void)
{
    for (int i = 0; i < FZ_NREG; i++) {
        if (memcmp(fz_host[i], fz_shadow[i], FZ_REG_SIZE) == 0)
            continue;
        for (uint32_t k = 0; k < FZ_REG_SIZE; k++)
            FZ_CHECK(fz_host[i][k] == fz_shadow[i][k],
                     "device wrote guest byte gpa 0x%llx (0x%02x, expected 0x%02x)",
                     (unsigned long long)(fz_reg_gpa[i] + k), fz_host[i][k], fz_shadow[i][k]);
    }
}

/* Checks on one chain pv_vq_pop returned (virtio 1.1 §2.6.4, §2.6.5). */
static void fz_check_chain(const struct pv_vq *vq, const struct pv_chain *c)
{
    uint64_t rd = 0, wr = 0, off;
    FZ_CHECK(c->head < vq->size, "head %u size %u", c->head, vq->size);
    FZ_CHECK(c->nseg >= 1 && c->nseg <= vq->size, "nseg %u size %u", c->nseg, vq->size);
    FZ_CHECK(c->nread <= c->nseg, "nread %u nseg %u", c->nread, c->nseg);
    for (uint32_t i = 0; i < c->nseg; i++) {
        FZ_CHECK(fz_locate(c->iov[i].iov_base, c->iov[i].iov_len, &off) >= 0,
                 "segment %u (%p+%zu) outside guest RAM", i, c->iov[i].iov_base, c->iov[i].iov_len);
        if (i < c->nread)
            rd += c->iov[i].iov_len;
        else
            wr += c->iov[i].iov_len;
    }
    FZ_CHECK(rd == c->read_len && wr == c->write_len, "lengths %llu/%llu vs %llu/%llu",
             (unsigned long long)rd, (unsigned long long)wr,
             (unsigned long long)c->read_len, (unsigned long long)c->write_len);
}

/* Used ring element `i` (mod size) and used.idx, read back. */
static uint16_t fz_used_idx(const struct pv_vq *vq)
{
    uint16_t v;
    memcpy(&v, (const uint8_t *)vq->used + 2, 2);
    return v;
}

static int fz_used_overlapped(const struct pv_vq *vq);

/* Allow the device's writes to the used ring after `n` pushes starting at
 * used index `from` (elements, used.idx); and check the index moved by n. */
static void fz_allow_used(const struct pv_vq *vq, uint16_t from, uint32_t n)
{
    FZ_CHECK((uint16_t)(vq->used_idx - from) == (uint16_t)n,
             "used_idx moved by %u, expected %u", (uint16_t)(vq->used_idx - from), n);
    /* (unless the guest handed out a writable buffer over its own used ring) */
    if (n && !fz_used_overlapped(vq))
        FZ_CHECK(fz_used_idx(vq) == vq->used_idx, "used.idx %u in memory, shadow %u",
                 fz_used_idx(vq), vq->used_idx);
    for (uint32_t k = 0; k < n && k < vq->size; k++)
        fz_allow((const uint8_t *)vq->used + 4 + 8 * (size_t)((uint16_t)(from + n - 1 - k) % vq->size), 8);
    if (n)
        fz_allow((const uint8_t *)vq->used + 2, 2);
}

/* avail_event (§2.6.7.1) after the used ring: the device writes it with EVENT_IDX. */
static void fz_allow_avail_event(const struct pv_vq *vq)
{
    if (vq->flags & PV_VQ_F_EVENT_IDX)
        fz_allow((const uint8_t *)vq->used + 4 + 8 * (size_t)vq->size, 2);
}

/* Common queue set-up from the header:
 *   [0] log2 size (mod 11)  [1] flags: bit0 EVENT_IDX, bit1 INDIRECT,
 *       bits 4/5/6: desc/avail/used in the high region
 *   [2..7] desc, avail, used (le16 each)  [8..9] last_avail  [10..11] used_idx
 * Returns pv_vq_init's result. */
static int fz_setup_vq(struct pv_vq *vq, const uint8_t *data, size_t size)
{
    uint32_t qsize = 1u << (fz_hdr(data, size, 0, 1) % 11);
    uint32_t f = (uint32_t)fz_hdr(data, size, 1, 1);
    uint32_t flags = (f & 1 ? PV_VQ_F_EVENT_IDX : 0) | (f & 2 ? PV_VQ_F_INDIRECT : 0);
    uint64_t d = fz_gpa((uint16_t)fz_hdr(data, size, 2, 2), f & 0x10);
    uint64_t a = fz_gpa((uint16_t)fz_hdr(data, size, 4, 2), f & 0x20);
    uint64_t u = fz_gpa((uint16_t)fz_hdr(data, size, 6, 2), f & 0x40);
    int r = pv_vq_init(vq, &fz_mem, qsize, d, a, u, flags);
    if (r < 0) {
        FZ_CHECK(vq->broken, "failed init left the queue usable");
        return r;
    }
    /* §2.6: the three areas are inside RAM and aligned */
    uint64_t off;
    FZ_CHECK(fz_locate((const void *)vq->desc, 16ull * qsize, &off) >= 0 && !(d & 15), "desc");
    FZ_CHECK(fz_locate((const void *)vq->avail, 6ull + 2 * qsize, &off) >= 0 && !(a & 1), "avail");
    FZ_CHECK(fz_locate((const void *)vq->used, 6ull + 8 * qsize, &off) >= 0 && !(u & 3), "used");
    /* the ring state a device restored (snapshot) or reached after many wraps */
    vq->last_avail = (uint16_t)fz_hdr(data, size, 8, 2);
    vq->used_idx = (uint16_t)fz_hdr(data, size, 10, 2);
    return 0;
}

/* One "second vCPU" op: rewrite 1, 2 or 8 guest bytes at a 16-bit gpa. */
static void fz_op_guest_write(struct fz_in *in)
{
    uint64_t gpa = fz_take(in, 2);
    int len = 1 << (fz_take(in, 1) % 4);
    uint64_t v = fz_take(in, len > 2 ? 8 : 2);
    fz_guest_write(gpa, &v, (uint64_t)(len > 8 ? 8 : len));
}

#ifdef FZ_TRACK_ENGINE
/* --- tracking the device's pops and pushes (engines in blk.c / net.c) ---
 * The blk and net harnesses define FZ_TRACK_ENGINE and link with -Wl,--wrap=pv_vq_pop,--wrap=pv_vq_push:
 * the engines' calls land here, so each chain they take is checked, its
 * writable segments become bytes the device may write, and each completion
 * must name a chain the device took and has not completed yet. */
#define FZ_MAX_RANGES 8192
/* A head's "holding": from the pop that found it not held (outstanding 0)
 * to the push that makes it 0 again.  A guest may post a head the device
 * still holds (the io_uring engine completes such a second chain inline
 * while the first is in flight): then two chains share the head, the
 * harness cannot tell which one a completion is, and the holding is
 * `shared` -- checks take the union of its chains (the largest writable
 * length, every writable byte as possibly the kernel's) and skip the status
 * byte. */
struct fz_track {
    uint32_t nranges, overflow;
    struct { void *p; uint64_t len; } ranges[FZ_MAX_RANGES];
    struct { uint8_t q; uint16_t head; uint32_t holding; } range_of[FZ_MAX_RANGES];
    /* per queue (a device may drive two) and head: */
    const struct pv_vq *vq[2];
    uint32_t outstanding[2][PV_VQ_MAX_SIZE];   /* popped - pushed */
    uint32_t holding[2][PV_VQ_MAX_SIZE];       /* number of the current holding */
    uint8_t shared[2][PV_VQ_MAX_SIZE];         /* popped again during this holding */
    uint64_t write_len[2][PV_VQ_MAX_SIZE];     /* of the holding's chain (shared: the largest) */
    uint8_t *last_byte[2][PV_VQ_MAX_SIZE];     /* its last writable byte (not shared) */
    uint32_t held;                             /* sum of outstanding */
    uint32_t pops, pushes;
    uint32_t call_pops, pop_limit;             /* chains taken in this engine call, bound */
    int status_last;                           /* blk: last writable byte is a status */
};
static struct fz_track fz_tr;

static int fz_qi(const struct pv_vq *vq)
{
    for (int q = 0; q < 2; q++) {
        if (!fz_tr.vq[q])
            fz_tr.vq[q] = vq;
        if (fz_tr.vq[q] == vq)
            return q;
    }
    FZ_CHECK(0, "more than two queues");
    return 0;
}

int __real_pv_vq_pop(struct pv_vq *vq, struct pv_chain *c);
void __real_pv_vq_push(struct pv_vq *vq, uint16_t head, uint32_t len);

int __wrap_pv_vq_pop(struct pv_vq *vq, struct pv_chain *c)
{
    int broken = vq->broken;
    int r = __real_pv_vq_pop(vq, c);
    if (broken)
        FZ_CHECK(r == -broken, "broken queue popped %d", r);
    if (r <= 0)
        return r;
    fz_check_chain(vq, c);
    int q = fz_qi(vq);
    fz_tr.pops++;
    /* a budgeted engine call takes at most its budget of chains: else a
     * guest can keep the I/O thread in one call for as long as it likes */
    if (fz_tr.pop_limit)
        FZ_CHECK(++fz_tr.call_pops <= fz_tr.pop_limit, "one call took more than %u chains",
                 fz_tr.pop_limit);
    uint16_t h = c->head;
    if (fz_tr.outstanding[q][h]++ == 0) {         /* a new holding */
        fz_tr.holding[q][h]++;
        fz_tr.shared[q][h] = 0;
        fz_tr.write_len[q][h] = c->write_len;
        fz_tr.last_byte[q][h] = NULL;
        for (uint32_t i = c->nseg; i > c->nread; i--)
            if (c->iov[i - 1].iov_len) {
                fz_tr.last_byte[q][h] = (uint8_t *)c->iov[i - 1].iov_base + c->iov[i - 1].iov_len - 1;
                break;
            }
    } else {                                       /* re-posted while held */
        fz_tr.shared[q][h] = 1;
        if (c->write_len > fz_tr.write_len[q][h])
            fz_tr.write_len[q][h] = c->write_len;
    }
    fz_tr.held++;
    for (uint32_t i = c->nread; i < c->nseg; i++) {
        if (fz_tr.nranges == FZ_MAX_RANGES) {
            fz_tr.overflow = 1;
            break;
        }
        fz_tr.ranges[fz_tr.nranges].p = c->iov[i].iov_base;
        fz_tr.ranges[fz_tr.nranges].len = c->iov[i].iov_len;
        fz_tr.range_of[fz_tr.nranges].q = (uint8_t)q;
        fz_tr.range_of[fz_tr.nranges].head = h;
        fz_tr.range_of[fz_tr.nranges].holding = fz_tr.holding[q][h];
        fz_tr.nranges++;
    }
    return r;
}

/* `b` (head's status byte) may be written at this moment by something other
 * than the device's completion of head: it lies in a writable segment of
 * another chain the device still holds -- an io_uring read in flight writes
 * there from a kernel thread, whenever it runs -- other than that chain's
 * own status byte (which only the device writes, with 0..2).  A guest that
 * makes its buffers overlap this way is hostile but legal (§2.6.4 does not
 * forbid it); what it reads back is then its own business. */
static int fz_kernel_may_write(int q, uint16_t head, const uint8_t *b)
{
    if (fz_tr.held <= fz_tr.outstanding[q][head])   /* nothing else in flight */
        return 0;
    if (fz_tr.overflow)                              /* not every segment known */
        return 1;
    for (uint32_t i = 0; i < fz_tr.nranges; i++) {
        int oq = fz_tr.range_of[i].q;
        uint16_t oh = fz_tr.range_of[i].head;
        const uint8_t *p = fz_tr.ranges[i].p;
        if ((oq == q && oh == head) || !fz_tr.outstanding[oq][oh] ||
            fz_tr.range_of[i].holding != fz_tr.holding[oq][oh])
            continue;                                /* ours, or a finished chain's */
        if (b < p || b >= p + fz_tr.ranges[i].len)
            continue;
        if (!fz_tr.shared[oq][oh] && b == fz_tr.last_byte[oq][oh])
            continue;                                /* its status byte: device-only */
        return 1;
    }
    return 0;
}

void __wrap_pv_vq_push(struct pv_vq *vq, uint16_t head, uint32_t len)
{
    int q = fz_qi(vq);
    FZ_CHECK(head < vq->size && fz_tr.outstanding[q][head] > 0,
             "completion of head %u which the device does not hold", head);
    FZ_CHECK(len <= fz_tr.write_len[q][head], "used len %u > chain's writable %llu", len,
             (unsigned long long)fz_tr.write_len[q][head]);
    /* virtio 1.1 §5.2.6: the device wrote the request's status (OK, IOERR
     * or UNSUPP) into the chain's last byte before completing it.  Checked
     * whenever nothing else can have written that byte since: not for a
     * shared holding (which chain is this?), not when another chain in
     * flight may be writing it (fz_kernel_may_write).  So a byte > 2 here
     * was the device's doing whatever the kernel's timing: the check cannot
     * report at random (an io_uring read landing late on this byte). */
    uint8_t *st = fz_tr.last_byte[q][head];
    if (fz_tr.status_last && !fz_tr.shared[q][head]) {
        FZ_CHECK(st, "completed head %u without a writable byte", head);
        FZ_CHECK(*st <= 2 || fz_kernel_may_write(q, head, st),
                 "completed head %u with status byte %d", head, *st);
    }
    if (--fz_tr.outstanding[q][head] == 0)
        fz_tr.shared[q][head] = 0;
    fz_tr.held--;
    fz_tr.pushes++;
    __real_pv_vq_push(vq, head, len);
}

/* A writable segment the device took overlaps the used ring. */
static int fz_used_overlapped(const struct pv_vq *vq)
{
    uintptr_t u = (uintptr_t)vq->used, ue = u + 6 + 8 * (uintptr_t)vq->size;
    for (uint32_t i = 0; i < fz_tr.nranges; i++) {
        uintptr_t p = (uintptr_t)fz_tr.ranges[i].p;
        if (p < ue && p + fz_tr.ranges[i].len > u)
            return 1;
    }
    return fz_tr.overflow;
}

static void fz_track_reset(void)
{
    memset(&fz_tr, 0, sizeof(fz_tr));
}

/* After the engine ran: its writes to the chains' writable segments are
 * allowed; then no other guest byte may differ from the shadow. */
static void fz_track_check_mem(void)
{
    for (uint32_t i = 0; i < fz_tr.nranges; i++)
        fz_allow(fz_tr.ranges[i].p, fz_tr.ranges[i].len);
    if (!fz_tr.overflow)
        fz_check_mem();
}
#else
static int fz_used_overlapped(const struct pv_vq *vq) { (void)vq; return 0; }
#endif

#endif

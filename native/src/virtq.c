/* Split virtqueue, device side (virtio 1.1 §2.6).
 *
 * The guest owns every byte we read here and may change it under us, so each
 * descriptor is copied once into locals before it is checked and used, every
 * address range is checked to lie inside one RAM region, and chain lengths
 * are bounded by the queue size (§2.6.5.3.1), which catches loops.
 * Little-endian host only (x86-64): virtio 1.x rings are little-endian. */
#include <string.h>

#include "pyvmm_native.h"

#if __BYTE_ORDER__ != __ORDER_LITTLE_ENDIAN__
#error "virtq.c assumes a little-endian host"
#endif

/* §2.6.5 descriptor flags, §2.6.6 / §2.6.8 ring flags */
#define VRING_DESC_F_NEXT 1
#define VRING_DESC_F_WRITE 2
#define VRING_DESC_F_INDIRECT 4
#define VRING_AVAIL_F_NO_INTERRUPT 1

struct desc {
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

/* Guest memory is a byte array to us: reading it through uint16_t/uint32_t
 * pointer casts breaks C's strict aliasing rules.  memcpy is the defined way
 * (it compiles to single loads/stores); the compiler barrier after each copy
 * makes it a READ_ONCE: the compiler may not fetch the guest's bytes again
 * later and see a different value than the one we checked. */
#define barrier() __asm__ __volatile__("" ::: "memory")

static inline uint16_t ld16(const volatile uint8_t *p)
{
    uint16_t v;
    memcpy(&v, (const void *)p, sizeof(v));
    barrier();
    return v;
}

static inline void st16(volatile uint8_t *p, uint16_t v)
{
    barrier();
    memcpy((void *)p, &v, sizeof(v));
    barrier();
}

static inline void st32(volatile uint8_t *p, uint32_t v)
{
    barrier();
    memcpy((void *)p, &v, sizeof(v));
    barrier();
}

/* An indirect table (§2.6.5.3) may sit at any byte address, so descriptors
 * may be unaligned: memcpy is safe there too (found by the fuzz corpus under
 * UBSan, when these were plain loads).
 * SAFETY: p points at 16 bytes inside a checked descriptor table; the guest
 * may rewrite them at any time, so they are copied once and only the copy
 * is used. */
static inline void read_desc(const volatile uint8_t *p, struct desc *d)
{
    uint8_t raw[16];
    memcpy(raw, (const void *)p, sizeof(raw));
    barrier();
    memcpy(&d->addr, raw, 8);
    memcpy(&d->len, raw + 8, 4);
    memcpy(&d->flags, raw + 12, 2);
    memcpy(&d->next, raw + 14, 2);
}

/* [gpa, gpa+len) must lie entirely inside one region (no overflow possible). */
int pv_mem_translate(const struct pv_mem *mem, uint64_t gpa, uint64_t len, void **host)
{
    for (uint32_t i = 0; i < mem->nregions && i < PV_MEM_MAX_REGIONS; i++) {
        const struct pv_region *r = &mem->r[i];
        if (gpa >= r->gpa && len <= r->size && gpa - r->gpa <= r->size - len) {
            *host = r->host + (gpa - r->gpa);
            return 0;
        }
    }
    return -PV_VQ_E_RANGE;
}

/* §2.6: descriptor table 16*size (align 16), available ring 6+2*size
 * (align 2), used ring 6+8*size (align 4); the trailing used_event /
 * avail_event words are included whether or not EVENT_IDX is negotiated. */
int pv_vq_init(struct pv_vq *vq, const struct pv_mem *mem, uint32_t size,
               uint64_t desc, uint64_t avail, uint64_t used, uint32_t flags)
{
    void *d, *a, *u;
    memset(vq, 0, sizeof(*vq));
    vq->broken = PV_VQ_E_RING;
    if (size == 0 || size > PV_VQ_MAX_SIZE || (size & (size - 1)))
        return -PV_VQ_E_RING;
    if ((desc & 15) || (avail & 1) || (used & 3))
        return -PV_VQ_E_RING;
    if (pv_mem_translate(mem, desc, 16ull * size, &d) ||
        pv_mem_translate(mem, avail, 6ull + 2ull * size, &a) ||
        pv_mem_translate(mem, used, 6ull + 8ull * size, &u))
        return -PV_VQ_E_RING;
    vq->mem = mem;
    vq->desc = d;
    vq->avail = a;
    vq->used = u;
    vq->size = size;
    vq->flags = flags;
    /* indexes start at 0 (§2.6.6, §2.6.8); the driver zeroed the rings */
    vq->broken = 0;
    return 0;
}

static int fail(struct pv_vq *vq, int code)
{
    vq->broken = (uint8_t)code;
    return -code;
}

uint16_t pv_vq_avail_idx(struct pv_vq *vq)
{
    uint16_t idx = ld16(vq->avail + 2);
    __atomic_thread_fence(__ATOMIC_ACQUIRE);    /* ring entries and descs after */
    return idx;
}

/* Take the next available chain (§2.6.6, §2.6.5.3 indirect descriptors).
 * Returns 1 with *c filled, 0 if the ring is empty, or -PV_VQ_E_* (the queue
 * is then broken and every later call fails the same way). */
int pv_vq_pop(struct pv_vq *vq, struct pv_chain *c)
{
    if (vq->broken)
        return -vq->broken;
    uint16_t aidx = pv_vq_avail_idx(vq);   /* acquire: ring and descs read after */
    uint16_t pending = (uint16_t)(aidx - vq->last_avail);
    if (pending == 0)
        return 0;
    if (pending > vq->size)
        return fail(vq, PV_VQ_E_AVAIL_IDX);
    uint16_t head = ld16(vq->avail + 4 + 2 * (vq->last_avail % vq->size));
    if (head >= vq->size)
        return fail(vq, PV_VQ_E_HEAD);

    const volatile uint8_t *table = vq->desc;
    uint32_t tsize = vq->size, i = head, total = 0;
    int indirect = 0;
    c->head = head;
    c->nseg = c->nread = 0;
    c->read_len = c->write_len = 0;
    for (;;) {
        struct desc d;
        void *host;
        read_desc(table + 16 * (size_t)i, &d);
        if (d.flags & VRING_DESC_F_INDIRECT) {
            /* §2.6.5.3.1: only when negotiated, never nested, never with
             * NEXT; the table holds len/16 descriptors. */
            if (!(vq->flags & PV_VQ_F_INDIRECT) || indirect || (d.flags & VRING_DESC_F_NEXT))
                return fail(vq, PV_VQ_E_INDIRECT);
            if (d.len == 0 || d.len % 16 || d.len / 16 > vq->size)
                return fail(vq, PV_VQ_E_INDIRECT);
            if (pv_mem_translate(vq->mem, d.addr, d.len, &host))
                return fail(vq, PV_VQ_E_RANGE);
            table = host;
            tsize = d.len / 16;
            indirect = 1;
            i = 0;
            continue;
        }
        if (++total > vq->size)             /* §2.6.5.3.1: chain <= queue size */
            return fail(vq, PV_VQ_E_LOOP);
        /* The used ring's len is 32 bits (§2.6.8): a chain of 4 GiB or more
         * could not be reported truthfully (devices would truncate it), so
         * bound the total as rust-vmm's vm-virtio does. */
        if (c->read_len + c->write_len + d.len > PV_VQ_MAX_CHAIN_BYTES)
            return fail(vq, PV_VQ_E_TOO_BIG);
        if (pv_mem_translate(vq->mem, d.addr, d.len, &host))
            return fail(vq, PV_VQ_E_RANGE);
        if (d.flags & VRING_DESC_F_WRITE) {
            c->write_len += d.len;
        } else {
            if (c->nseg > c->nread)         /* §2.6.4.2: readable before writable */
                return fail(vq, PV_VQ_E_ORDER);
            c->nread++;
            c->read_len += d.len;
        }
        c->iov[c->nseg].iov_base = host;
        c->iov[c->nseg].iov_len = d.len;
        c->nseg++;
        if (!(d.flags & VRING_DESC_F_NEXT))
            break;
        if (d.next >= tsize)
            return fail(vq, PV_VQ_E_NEXT);
        i = d.next;
    }
    vq->last_avail++;
    return 1;
}

/* §2.6.8: write the element, then publish used.idx with release order so the
 * driver never sees the index before the element (and the data before it). */
void pv_vq_push(struct pv_vq *vq, uint16_t head, uint32_t len)
{
    volatile uint8_t *e = vq->used + 4 + 8 * (size_t)(vq->used_idx % vq->size);
    st32(e, head);
    st32(e + 4, len);
    vq->used_idx++;
    __atomic_thread_fence(__ATOMIC_RELEASE);    /* element (and data) before the index */
    st16(vq->used + 2, vq->used_idx);
}

/* §2.6.7.2 (used buffer notification suppression): with EVENT_IDX, interrupt
 * iff used.idx crossed used_event since the last decision (vring_need_event);
 * otherwise unless avail.flags has NO_INTERRUPT.  The full fence orders our
 * used.idx store before the load of the driver's suppression fields. */
int pv_vq_need_interrupt(struct pv_vq *vq)
{
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (!(vq->flags & PV_VQ_F_EVENT_IDX))
        return !(ld16(vq->avail) & VRING_AVAIL_F_NO_INTERRUPT);
    uint16_t old = vq->signalled_used, new = vq->used_idx;
    int valid = vq->signalled_valid;
    vq->signalled_used = new;
    vq->signalled_valid = 1;
    if (!valid)
        return 1;
    uint16_t event = ld16(vq->avail + 4 + 2 * (size_t)vq->size);
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

/* Like pv_vq_enable_notify, but for a device that has looked at the entries
 * already available and needs more than them (a frame spread over mergeable
 * buffers): ask to be kicked when the driver adds the next one beyond the
 * current avail index.  Returns 1 if the index moved meanwhile. */
int pv_vq_notify_on_next(struct pv_vq *vq)
{
    uint16_t idx = pv_vq_avail_idx(vq);
    if (vq->flags & PV_VQ_F_EVENT_IDX)
        st16(vq->used + 4 + 8 * (size_t)vq->size, idx);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return ld16(vq->avail + 2) != idx;
}

/* §2.6.7.1 (driver notification suppression): ask to be kicked for the next
 * entry (avail_event = last_avail), then re-check the ring so a request added
 * just before the store is not missed.  Returns 1 if more work is there. */
int pv_vq_enable_notify(struct pv_vq *vq)
{
    if (vq->flags & PV_VQ_F_EVENT_IDX)
        st16(vq->used + 4 + 8 * (size_t)vq->size, vq->last_avail);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    return ld16(vq->avail + 2) != vq->last_avail;
}

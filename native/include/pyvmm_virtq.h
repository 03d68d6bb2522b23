/* Split-virtqueue hot path (virtio 1.1 §2.6) and the virtio-blk request
 * engine (§5.2.6): see native/src/virtq.c and native/src/blk.c.
 *
 * Guest memory is described by a pv_mem (a few regions: guest-physical base,
 * size, host pointer); every ring, descriptor table and buffer is checked to
 * lie entirely inside one region before it is touched.  Functions return a
 * negative PV_VQ_E_* code for a malformed queue; Python turns that into
 * DEVICE_NEEDS_RESET. */
#ifndef PYVMM_VIRTQ_H
#define PYVMM_VIRTQ_H

#include <stdint.h>
#include <sys/uio.h>

#define PV_MEM_MAX_REGIONS 8
#define PV_VQ_MAX_SIZE 1024          /* largest queue we accept (power of 2) */

/* pv_vq_init flags */
#define PV_VQ_F_EVENT_IDX 1          /* VIRTIO_F_RING_EVENT_IDX negotiated */
#define PV_VQ_F_INDIRECT 2           /* VIRTIO_F_RING_INDIRECT_DESC negotiated */

/* errors (returned negated) */
#define PV_VQ_E_RING 1               /* ring addresses/size invalid */
#define PV_VQ_E_AVAIL_IDX 2          /* avail.idx moved more than size */
#define PV_VQ_E_HEAD 3               /* head index >= size */
#define PV_VQ_E_NEXT 4               /* next index out of the table */
#define PV_VQ_E_RANGE 5              /* buffer not inside one RAM region */
#define PV_VQ_E_LOOP 6               /* chain longer than the queue: a loop */
#define PV_VQ_E_INDIRECT 7           /* bad indirect descriptor */
#define PV_VQ_E_ORDER 8              /* readable descriptor after a writable one */
#define PV_VQ_E_REQ 9                /* request framing (too short, wrong direction) */
#define PV_VQ_E_TOO_BIG 10           /* chain's buffers total 4 GiB or more */

/* A chain's buffers total at most this (the used ring's len is 32 bits) */
#define PV_VQ_MAX_CHAIN_BYTES 0xFFFFFFFFull

struct pv_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
};

struct pv_mem {
    uint32_t nregions;
    struct pv_region r[PV_MEM_MAX_REGIONS];
    /* Dirty page tracking for diff snapshots (NULL: off): one byte per 4 KiB
     * page of the host mapping starting at dirty_base, set to 1 for every
     * page the device may write (writable buffers of popped chains, the used
     * ring); KVM's dirty log does not see writes made by the VMM. */
    uint8_t *dirty;
    uint8_t *dirty_base;
    uint64_t dirty_pages;
};

struct pv_vq {
    const struct pv_mem *mem;
    volatile uint8_t *desc;          /* host pointers of the three areas */
    volatile uint8_t *avail;
    volatile uint8_t *used;
    uint32_t size;
    uint32_t flags;
    uint16_t last_avail;             /* next avail entry to consume */
    uint16_t used_idx;               /* shadow of used.idx */
    uint16_t signalled_used;         /* used.idx when we last decided on an irq */
    uint8_t signalled_valid;
    uint8_t broken;                  /* set on the first malformed chain */
};

/* One resolved chain: readable segments first, then writable ones. */
struct pv_chain {
    uint16_t head;
    uint32_t nseg;
    uint32_t nread;                  /* iov[0..nread) are device-readable */
    uint64_t read_len;
    uint64_t write_len;
    struct iovec iov[PV_VQ_MAX_SIZE];
};

int pv_mem_translate(const struct pv_mem *mem, uint64_t gpa, uint64_t len, void **host);
int pv_vq_init(struct pv_vq *vq, const struct pv_mem *mem, uint32_t size,
               uint64_t desc, uint64_t avail, uint64_t used, uint32_t flags);
int pv_vq_pop(struct pv_vq *vq, struct pv_chain *c);
void pv_vq_push(struct pv_vq *vq, uint16_t head, uint32_t len);
int pv_vq_need_interrupt(struct pv_vq *vq);
int pv_vq_enable_notify(struct pv_vq *vq);
int pv_vq_notify_on_next(struct pv_vq *vq);
uint16_t pv_vq_avail_idx(struct pv_vq *vq);

/* virtio-blk (§5.2) */
#define PV_BLK_BUDGET 64             /* default requests per pv_blk_process call */
#define PV_BLK_MAX_SEGS 256          /* discard/write-zeroes segments per request */
#define PV_BLK_MAX_SECTOR (UINT64_MAX / 512 / 2) /* byte offsets stay below 2^63 */
struct pv_blk {
    int fd;
    int readonly;
    uint64_t capacity;               /* in 512-byte sectors */
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
    uint32_t no_zero_range;          /* fallocate(ZERO_RANGE) unsupported: write zeros */
    uint32_t budget;                 /* requests per pv_blk_process call (0: PV_BLK_BUDGET) */
    uint8_t id[20];
};

struct pv_blk_result {
    uint32_t completed;              /* chains pushed to the used ring */
    uint32_t interrupt;              /* 1: signal the used buffer notification */
    int32_t error;                   /* 0 or -PV_VQ_E_*: the queue is now broken */
    uint32_t ioerr;                  /* requests completed with VIRTIO_BLK_S_IOERR */
    uint32_t more;                   /* 1: the budget ran out; call again later */
};

int pv_blk_process(struct pv_vq *vq, struct pv_blk *blk, struct pv_chain *scratch,
                   struct pv_blk_result *res);
int pv_blk_request(struct pv_blk *blk, struct pv_chain *c, uint32_t *used_len);
/* one popped chain: the request done, its used element pushed, counted in
 * `res`; 1, or < 0 (the queue is now broken) */
int pv_blk_complete(struct pv_vq *vq, struct pv_blk *blk, struct pv_chain *c,
                    struct pv_blk_result *res);
/* the physical limit for bench/blk.py: n preads of `len` at the given offsets */
/* test seam, NULL in production: see discard_wz() in native/src/blk.c */
extern void (*pv_blk_seg_hook)(void *arg);
extern void *pv_blk_seg_hook_arg;
/* test seam, NULL in production: called before a FLUSH's fdatasync */
extern void (*pv_blk_flush_hook)(int fd);
long pv_bench_pread(int fd, void *buf, uint64_t len, const uint64_t *offsets, uint32_t n);

#endif

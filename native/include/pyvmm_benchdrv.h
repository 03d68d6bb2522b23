/* benchdrv.c: a bench's driver side of one split virtqueue (host addresses). */
#ifndef PYVMM_BENCHDRV_H
#define PYVMM_BENCHDRV_H
#include <stdint.h>

struct pv_drvq {
    uint8_t *avail, *used;       /* the rings (flags, idx, ring[size]) */
    uint16_t size, avail_idx, last_used;
};

/* Offer every new used entry's buffer again; *bytes += their used lengths,
 * *last_head = the last one's id.  Returns how many. */
uint32_t pv_drvq_recycle(struct pv_drvq *q, uint64_t *bytes, uint32_t *last_head);
/* Offer n chains: heads[(start + i) % nheads] for i < n. */
void pv_drvq_post(struct pv_drvq *q, const uint16_t *heads, uint32_t nheads, uint64_t start,
                  uint32_t n);
#endif

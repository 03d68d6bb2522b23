/* The driver's side of a split virtqueue (virtio 1.1 §2.6), in C, for the
 * benchmarks only (bench/vsock.py).  A guest's driver is kernel C; driving
 * a device through the Python mock driver would put the harness's cost in
 * the device's figures, so the hot part of a bench driver (recycling used
 * buffers, offering chains) runs here and the bench keeps Python for the
 * kicks, which go through the device's real entry points. */
#include <string.h>

#include "pyvmm_native.h"

/* SAFETY: avail and used point at the rings of a queue of `size` entries
 * that the bench allocated inside its own guest memory; only ring slots
 * index % size are touched. */
static void publish(struct pv_drvq *q)
{
    __atomic_store_n((uint16_t *)(q->avail + 2), q->avail_idx, __ATOMIC_RELEASE);
}

uint32_t pv_drvq_recycle(struct pv_drvq *q, uint64_t *bytes, uint32_t *last_head)
{
    uint16_t idx = __atomic_load_n((uint16_t *)(q->used + 2), __ATOMIC_ACQUIRE);
    uint32_t n = 0;
    while (q->last_used != idx) {
        uint32_t e[2];
        memcpy(e, q->used + 4 + 8 * (q->last_used % q->size), 8);
        *bytes += e[1];
        *last_head = e[0];
        memcpy(q->avail + 4 + 2 * (q->avail_idx % q->size), &(uint16_t){ (uint16_t)e[0] }, 2);
        q->avail_idx++;
        q->last_used++;
        n++;
    }
    if (n)
        publish(q);
    return n;
}

void pv_drvq_post(struct pv_drvq *q, const uint16_t *heads, uint32_t nheads, uint64_t start,
                  uint32_t n)
{
    for (uint32_t i = 0; i < n; i++) {
        uint16_t h = heads[(start + i) % nheads];
        memcpy(q->avail + 4 + 2 * (q->avail_idx % q->size), &h, 2);
        q->avail_idx++;
    }
    if (n)
        publish(q);
}

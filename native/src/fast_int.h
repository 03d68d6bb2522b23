/* Small steps the I/O loop's C fast path shares between its engines:
 * native/src/fastpath.c (virtio-blk, the loop itself), fastnet.c
 * (virtio-net) and, through pv_fast_early, fasturing.c.  Not part of the
 * cffi interface. */
#ifndef PV_FAST_INT_H
#define PV_FAST_INT_H

#include <errno.h>
#include <string.h>
#include <unistd.h>

#include "pyvmm_native.h"

static inline void pv_poke(int fd)
{
    uint64_t one = 1;
    /* EAGAIN: the counter is saturated, the fd is readable anyway */
    while (write(fd, &one, 8) < 0 && errno == EINTR)
        ;
}

static inline void pv_drain(int fd)
{
    uint64_t v;
    while (read(fd, &v, 8) < 0 && errno == EINTR)
        ;
}

/* The interrupt of a queue: ISR bit (not with MSI-X: §4.1.4.5), count, irqfd. */
static inline void pv_fast_raise_irq(struct pv_fast_queue *q)
{
    if (q->isr_bit)
        __atomic_fetch_or(&q->irq->isr, q->isr_bit, __ATOMIC_SEQ_CST);
    __atomic_fetch_add(&q->irq->count, 1, __ATOMIC_RELAXED);
    pv_poke(q->irq->fd);
}

/* A cheap look (no fence) at whether the driver's used_event lies in the
 * range pv_vq_need_interrupt() would signal for: true only when the driver
 * has harvested since our last interrupt.  A stale answer only delays the
 * interrupt to the next completion or to the pass's end, where
 * pv_vq_need_interrupt() decides with a full fence.
 * SAFETY: reads used_event, inside the available ring pv_vq_init checked
 * lies in guest RAM (size entries + flags/idx/used_event); the value is
 * only compared, never used as an index. */
static inline int pv_driver_rearmed(struct pv_vq *vq)
{
    uint16_t event, old = vq->signalled_used, new = vq->used_idx;
    if (!vq->signalled_valid)
        return 1;
    memcpy(&event, (const void *)(vq->avail + 4 + 2 * (size_t)vq->size), 2);
    return (uint16_t)(new - event - 1) < (uint16_t)(new - old);
}

#endif

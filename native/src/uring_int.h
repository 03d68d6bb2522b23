/* The io_uring engine's private layout, shared by native/src/uring.c (the
 * Python-driven engine) and native/src/fasturing.c (the same ring served by
 * the I/O loop's C fast path).  Not part of the cffi interface. */
#ifndef PV_URING_INT_H
#define PV_URING_INT_H

#include <sys/uio.h>
#include <linux/io_uring.h>

#include "pyvmm_native.h"

#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define S_OK 0
#define S_IOERR 1
#define SECTOR 512ull

struct uring_slot {
    uint8_t busy;
    uint8_t type;
    uint8_t *status;                 /* the request's status byte (guest memory) */
    uint64_t off;                    /* file offset */
    uint64_t len;                    /* bytes the request moves */
    uint32_t nvec, cap;
    struct iovec *iov;               /* the payload's segments (guest memory) */
};

struct pv_uring {
    int fd;
    int efd;                         /* completion eventfd, or -1 */
    uint32_t entries;
    uint32_t inflight;
    uint32_t to_submit;              /* SQEs written but not yet given to the kernel */
    unsigned *sq_head, *sq_tail, *sq_mask, *sq_array;
    unsigned *cq_head, *cq_tail, *cq_mask;
    struct io_uring_sqe *sqes;
    struct io_uring_cqe *cqes;
    void *sq_ring, *cq_ring;
    size_t sq_len, cq_len, sqes_len;
    struct uring_slot *slots;        /* indexed by descriptor head */
};

/* one popped chain into the ring (1: an SQE is queued, not yet submitted)
 * or done at once and pushed (0); < 0: the queue is now broken */
int pv_uring_prep(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u, struct pv_chain *c,
                  struct pv_blk_result *res);
/* hand every queued SQE to the kernel: 0 or -errno */
int pv_uring_flush_sq(struct pv_uring *u);
/* one CQE's request finished: status byte, used element, counts in `res` */
void pv_uring_complete(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u,
                       uint16_t head, int32_t r, struct pv_blk_result *res);
/* every CQE posted so far: its request completed into `vq` (NULL: dropped,
 * draining), then after(arg) if given; returns CQEs consumed */
int pv_uring_reap_each(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u,
                       struct pv_blk_result *res, void (*after)(void *), void *arg);

#endif

/* virtio-net data path (virtio 1.1 §5.1.6) over a tap fd: see native/src/net.c.
 * Uses the split-virtqueue core of pyvmm_virtq.h. */
#ifndef PYVMM_NET_H
#define PYVMM_NET_H

#include <stdint.h>
#include <linux/if_tun.h>

#include "pyvmm_virtq.h"

#define PV_NET_OVERFLOW 65600        /* bytes read past a chain to detect a too-big frame */
#define PV_NET_SINK_SIZE (2 * PV_NET_OVERFLOW)   /* a whole frame held for MRG_RXBUF */
#define PV_NET_BUDGET 256            /* frames per call and direction */

/* pv_net_result.state after pv_net_rx */
#define PV_NET_RX_IDLE 0             /* the backend has nothing more to read */
#define PV_NET_RX_NOBUF 1            /* no receive buffers: stop polling until a kick */
#define PV_NET_RX_MORE 2             /* budget used up: call again */

struct pv_net {
    int fd;                          /* tap (IFF_VNET_HDR), or a datagram socket in tests */
    uint32_t hdr_len;                /* 12 (VERSION_1 or MRG_RXBUF, §5.1.6) or 10 */
    uint32_t mrg_rxbuf;              /* VIRTIO_NET_F_MRG_RXBUF negotiated */
    uint32_t budget;                 /* 0: PV_NET_BUDGET */
    uint8_t *sink;                   /* PV_NET_SINK_SIZE bytes */
    uint32_t pending;                /* length of a frame held in sink, waiting for buffers */
    int32_t last_errno;              /* of the last failed read/write */
    uint64_t rx_packets, rx_bytes, rx_drops, rx_errors;
    uint64_t tx_packets, tx_bytes, tx_drops, tx_errors;
};

struct pv_net_result {
    uint32_t completed;              /* used elements published */
    uint32_t interrupt;              /* 1: signal the used buffer notification */
    int32_t error;                   /* 0 or -PV_VQ_E_*: the queue is now broken */
    uint32_t state;                  /* PV_NET_RX_* (rx), 1 if budget used up (tx) */
};

int pv_net_rx(struct pv_vq *vq, struct pv_net *net, struct pv_chain *scratch,
              struct pv_net_result *res);
int pv_net_tx(struct pv_vq *vq, struct pv_net *net, struct pv_chain *scratch,
              struct pv_net_result *res);
/* the same, calling after(arg) after each frame that used buffers
 * (native/src/fastnet.c: early interrupts) */
int pv_net_rx_each(struct pv_vq *vq, struct pv_net *net, struct pv_chain *scratch,
                   struct pv_net_result *res, void (*after)(void *), void *arg);
int pv_net_tx_each(struct pv_vq *vq, struct pv_net *net, struct pv_chain *scratch,
                   struct pv_net_result *res, void (*after)(void *), void *arg);
/* one frame each (the loops of pv_net_rx/pv_net_tx): a chain popped and served, *state as
 * pv_net_result.state.  1 done, 0 nothing to do, -PV_VQ_E_* malformed. */
int pv_net_rx_frame(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c, uint32_t *state);
int pv_net_rx_held_frame(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c,
                         uint32_t *state);
int pv_net_tx_frame(struct pv_vq *vq, struct pv_net *net, struct pv_chain *c);
/* TUNSETIFF: attach fd to tap `name` (created if absent); the kernel's name
 * is copied to name_out (16 bytes).  TUNGETIFF flags.  -errno on failure. */
int pv_net_rx_held(struct pv_vq *vq, struct pv_net *net, struct pv_chain *scratch,
                   struct pv_net_result *res);
long pv_tap_setiff(int fd, const char *name, int flags, char *name_out);
long pv_tap_getiff_flags(int fd);
/* the plain-loop reference of bench/net.py: n reads or writes of `len` bytes
 * cycling through nslots buffers `stride` apart */
long pv_bench_tap(int fd, void *buf, uint64_t len, uint32_t n, int write,
                  uint64_t stride, uint32_t nslots);

#endif

/* virtio-vsock data path (virtio 1.1 §5.10.6) between the device's queues
 * and the host-side Unix stream sockets of Firecracker's hybrid vsock: see
 * native/src/vsock.c.  Connection setup and teardown are decided in Python
 * (vmm/virtio/vsock_mux.py); this file moves RW payloads, tracks credit
 * (§5.10.6.3) and emits the packets Python asked for (`pending` bits). */
#ifndef PYVMM_VSOCK_H
#define PYVMM_VSOCK_H

#include <stdint.h>

#include "pyvmm_virtq.h"

#define PV_VSOCK_HDR_LEN 44          /* struct virtio_vsock_hdr, packed (§5.10.6) */
#define PV_VSOCK_HOST_CID 2
#define PV_VSOCK_MAX_PKT 65536       /* largest RW payload we send (Linux's limit too) */
#define PV_VSOCK_BUDGET 256          /* chains per call and direction */
#define PV_VSOCK_RSTQ 256            /* RSTs for packets without a connection */
#define PV_VSOCK_MAX_EVENTS 64
/* Transmit chains the device keeps (their payload not yet taken by the host
 * socket, §2.6: the device may use buffers in any order and hold them):
 * per connection at most HOLD_CONN chains, per device at most half the
 * queue's descriptors (so a stalled host reader never takes the whole ring
 * from other connections) and HOLD_MAX chains; a chain with more than
 * HOLD_IOV payload segments is copied instead. */
#define PV_VSOCK_HOLD_MAX 256
#define PV_VSOCK_HOLD_CONN 32
#define PV_VSOCK_HOLD_IOV 8
#define PV_VSOCK_NONE 0xFFFFFFFFu

/* §5.10.6 ops, type, shutdown flags */
#define PV_VSOCK_OP_INVALID 0
#define PV_VSOCK_OP_REQUEST 1
#define PV_VSOCK_OP_RESPONSE 2
#define PV_VSOCK_OP_RST 3
#define PV_VSOCK_OP_SHUTDOWN 4
#define PV_VSOCK_OP_RW 5
#define PV_VSOCK_OP_CREDIT_UPDATE 6
#define PV_VSOCK_OP_CREDIT_REQUEST 7
#define PV_VSOCK_TYPE_STREAM 1
#define PV_VSOCK_SHUT_RCV 1
#define PV_VSOCK_SHUT_SEND 2

/* pv_vsock_conn.state */
#define PV_VSOCK_ST_FREE 0
#define PV_VSOCK_ST_CONNECTING 1     /* we sent REQUEST (host-initiated), awaiting RESPONSE */
#define PV_VSOCK_ST_ESTABLISHED 2
#define PV_VSOCK_ST_DEAD 3           /* RST sent or socket gone: Python closes and frees it */

/* pv_vsock_conn.flags */
#define PV_VSOCK_C_WANT_READ 1       /* the host socket may have data: read when credit allows */
#define PV_VSOCK_C_HOST_EOF 2        /* read() returned 0 */
#define PV_VSOCK_C_HOST_HUP 4        /* EPOLLHUP: the host end is closed both ways */
#define PV_VSOCK_C_PEER_SHUT_RCV 8   /* the guest will not receive any more */
#define PV_VSOCK_C_PEER_SHUT_SEND 16 /* the guest will not send any more */
#define PV_VSOCK_C_WR_SHUT 32        /* shutdown(SHUT_WR) done on the host socket */
#define PV_VSOCK_C_EPOLLOUT 64       /* EPOLLOUT interest is on (pending data) */
#define PV_VSOCK_C_IN_EPOLL 128
#define PV_VSOCK_C_CLOSE_AFTER_FLUSH 256 /* guest shut both ways: RST once flushed */
#define PV_VSOCK_C_CREDIT_ASKED 512  /* CREDIT_REQUEST sent, not yet answered */
#define PV_VSOCK_C_HELD_NEW 1024     /* chains held in this transmit batch, not yet tried */

/* pv_vsock_conn.pending: packets to emit, in this order */
#define PV_VSOCK_P_REQUEST 1
#define PV_VSOCK_P_RESPONSE 2
#define PV_VSOCK_P_CREDIT_UPDATE 4
#define PV_VSOCK_P_CREDIT_REQUEST 8
#define PV_VSOCK_P_SHUTDOWN 16
#define PV_VSOCK_P_RST 32

struct pv_vsock_conn {
    int fd;                          /* host Unix stream socket, O_NONBLOCK */
    uint32_t local_port;             /* host-side port (dst_port of guest packets) */
    uint32_t peer_port;              /* guest port */
    uint32_t state;
    uint32_t flags;
    uint32_t pending;
    uint32_t shut_flags;             /* flags of the SHUTDOWN to send */
    /* our receive side (guest -> host), §5.10.6.3 */
    uint32_t buf_alloc;              /* advertised: the size of `pend` */
    uint32_t fwd_cnt;                /* bytes handed to the host socket */
    uint32_t rx_cnt;                 /* RW bytes accepted from the guest */
    uint32_t last_fwd_sent;          /* fwd_cnt the guest last heard of */
    /* the guest's receive side (host -> guest) */
    uint32_t peer_buf_alloc;
    uint32_t peer_fwd_cnt;
    uint32_t tx_cnt;                 /* RW bytes sent to the guest */
    /* Bytes accepted from the guest but not yet taken by the socket
     * (rx_cnt - fwd_cnt, never above buf_alloc), in stream order: first
     * `pend` (copied), then the held transmit chains (still in guest RAM). */
    uint8_t *pend;                   /* ring of buf_alloc bytes the socket could not take */
    uint32_t pend_head;
    uint32_t pend_len;
    uint32_t held_first, held_last;  /* pv_vsock.held indexes (valid when held_n) */
    uint32_t held_n;
    uint32_t held_bytes;             /* payload of held chains not yet sent */
};

/* A transmit chain kept until the host socket takes its payload; then it
 * goes to the used ring (len 0: nothing written, §5.10.6.2). */
struct pv_vsock_held {
    uint32_t next;                   /* the connection's next held chain, or PV_VSOCK_NONE */
    uint16_t head;
    uint16_t niov;
    uint32_t nseg;                   /* descriptors of the chain (for the device's bound) */
    uint32_t len;                    /* payload bytes */
    uint32_t off;                    /* of which the socket took this many */
    struct iovec iov[PV_VSOCK_HOLD_IOV];   /* the payload, inside guest RAM */
};

struct pv_vsock_rst {
    uint32_t src_port;               /* our port (the packet's dst_port) */
    uint32_t dst_port;               /* the guest's port */
};

struct pv_vsock {
    uint64_t guest_cid;
    int epfd;                        /* connections are registered edge-triggered,
                                        data = PV_VSOCK_EP_CONN | slot */
    uint32_t nslots;                 /* slots [0, nslots) may be in use */
    uint32_t max_slots;
    struct pv_vsock_conn *conns;
    uint32_t rr;                     /* round-robin start of the receive pump */
    uint32_t ndead;                  /* connections that went DEAD since Python reaped */
    uint32_t credit_threshold;       /* send CREDIT_UPDATE once fwd_cnt moved this much */
    uint32_t rst_head, rst_len;
    struct pv_vsock_rst rstq[PV_VSOCK_RSTQ];
    /* rx_*: RW packets from the guest (its transmit queue); tx_*: RW packets to it */
    uint64_t rx_pkts, rx_bytes, tx_pkts, tx_bytes, rst_sent, malformed, rst_dropped;
    uint64_t backlog_bytes;      /* guest bytes the host socket could not take at once (copied) */
    uint64_t held_chains;        /* transmit chains kept in the ring until the socket took them */
    /* Held transmit chains: a pool with a free list (built on first use:
     * a zeroed struct is ready).  txq is the transmit queue they complete
     * to (set by the owner when the queue is live, NULL when it is gone:
     * held chains are then dropped, never completed); tx_pushed counts
     * completions made outside pv_vsock_tx, whose interrupt the owner
     * decides (pv_vq_need_interrupt) and then resets it. */
    struct pv_vq *txq;
    uint32_t tx_pushed;
    uint32_t held_ready, held_free, nheld, held_desc;
    struct pv_vsock_held held[PV_VSOCK_HOLD_MAX];
};

#define PV_VSOCK_EP_CONN (1ULL << 32)

struct pv_vsock_result {
    uint32_t completed;              /* used elements published */
    uint32_t interrupt;              /* 1: signal the used buffer notification */
    int32_t error;                   /* 0 or -PV_VQ_E_*: the queue is now broken */
    uint32_t state;                  /* tx: 1 = a packet for Python in hdr, 2 = budget out;
                                        rx: 1 = out of receive buffers */
    uint8_t hdr[PV_VSOCK_HDR_LEN];   /* tx: the header Python must handle */
    uint32_t payload;                /* tx: payload bytes after that header */
    uint32_t nevents;                /* poll: events on Python's fds */
    int32_t event_fd[PV_VSOCK_MAX_EVENTS];
    uint32_t event_mask[PV_VSOCK_MAX_EVENTS];
};

int pv_vsock_tx(struct pv_vq *vq, struct pv_vsock *vs, struct pv_chain *c,
                struct pv_vsock_result *res);
int pv_vsock_rx(struct pv_vq *vq, struct pv_vsock *vs, struct pv_chain *c,
                struct pv_vsock_result *res);
int pv_vsock_poll(struct pv_vsock *vs, struct pv_vsock_result *res);
long pv_vsock_watch(struct pv_vsock *vs, int fd, int on);
long pv_vsock_conn_open(struct pv_vsock *vs, uint32_t slot, int fd, uint32_t local_port,
                        uint32_t peer_port, uint32_t state, uint32_t buf_alloc);
long pv_vsock_conn_start(struct pv_vsock *vs, uint32_t slot);
void pv_vsock_conn_free(struct pv_vsock *vs, uint32_t slot);
long pv_vsock_flush(struct pv_vsock *vs, uint32_t slot);
/* Copy every held chain's unsent payload into its connection's pend ring and
 * complete the chains (before a snapshot takes the rings' state); returns
 * the number completed. */
uint32_t pv_vsock_unhold(struct pv_vsock *vs);
void pv_vsock_queue_rst(struct pv_vsock *vs, uint32_t src_port, uint32_t dst_port);
int pv_vsock_event(struct pv_vq *vq, struct pv_chain *c, uint32_t id);
/* a CLOCK_MONOTONIC timerfd (non-blocking) and a one-shot arm in ms; -errno on failure */
long pv_timerfd_create(void);
long pv_timerfd_arm(int fd, uint64_t ms);
/* the reference of bench/vsock.py: write() or read() `total` bytes, `len` at a
 * time, cycling through nslots buffers `stride` apart from buf */
long pv_bench_stream(int fd, void *buf, uint64_t len, uint64_t total, int write_,
                      uint64_t stride, uint32_t nslots);

#endif

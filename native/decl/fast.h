#define PV_FAST_MAX 64
struct pv_fast_irq {
    uint32_t isr;
    int32_t fd;
    uint64_t count;                  /* interrupts signalled by the fast path */
    uint32_t held;                   /* level INTx: ISR bits Python holds */
};
struct pv_fast_queue {
    int32_t notify_fd;
    uint32_t enabled;                /* Python: the fields below are valid */
    uint32_t busy;                   /* the fast path is using them */
    int32_t error;                   /* -PV_VQ_E_* seen (the queue is then disabled) */
    struct pv_vq *vq;
    struct pv_blk *blk;
    struct pv_chain *chain;
    struct pv_fast_irq *irq;
    uint64_t kicks, requests, ioerr; /* counted by the fast path */
    uint32_t isr_bit;                /* bit OR-ed into irq->isr (INT_USED) */
    uint32_t poll_us;                /* adaptive polling: the longest window (0: off) */
    uint64_t polled;                 /* requests found by polling (no kick) */
    uint64_t poll_ns;                /* current adaptive window (<= poll_us) */
    uint64_t idle_since;             /* when the last handle ended (CLOCK_MONOTONIC ns) */
    uint64_t early;                  /* interrupts raised before a pass ended */
    uint64_t poll_skipped;           /* windows not polled: the thread was being preempted */
    uint64_t nivcsw, contended_until;/* the I/O thread's involuntary switches, seen when */
    uint32_t poll_always;            /* poll even then (tests) */
    uint32_t resample;               /* a level INTx's resample eventfd, not a queue */
    struct pv_uring *uring;          /* io_uring engine (native/src/fasturing.c), or NULL */
    uint32_t kind;
    struct pv_fast_net *fnet;
};
#define PV_FAST_BLK 0
#define PV_FAST_NET_RX 1
#define PV_FAST_NET_TX 2
#define PV_FAST_NET_TAP 3
struct pv_fast_net {
    struct pv_net *net;
    struct pv_vq *rx, *tx;
    struct pv_chain *rx_chain, *tx_chain;
    struct pv_fast_queue *rxq, *txq;
    int32_t epfd;
    int32_t tap_fd;
    uint32_t tap_off;
    uint32_t early_div;
    uint64_t tap_changes;
    uint64_t early;
};
struct pv_fast_loop {
    int32_t epfd;
    uint32_t n;
    int32_t fds[64];        /* -1: free slot */
    struct pv_fast_queue *q[64];
    uint64_t wakeups, handled;
};
int pv_fast_wait(struct pv_fast_loop *l, int32_t *out, int max_out);
void pv_fast_disable(struct pv_fast_queue *q);
void pv_fast_enable(struct pv_fast_queue *q);
uint32_t pv_fast_isr_take(struct pv_fast_irq *irq);
int pv_fast_handle(struct pv_fast_queue *q);
int pv_fast_handle_fd(struct pv_fast_queue *q, int fd);

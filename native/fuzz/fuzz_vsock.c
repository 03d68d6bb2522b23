/* libFuzzer target: the virtio-vsock data path (native/src/vsock.c, virtio
 * 1.1 §5.10.6) between guest chains and host Unix stream sockets.
 *
 * Header bytes 0..11 set up the transmit queue (fz_setup_vq), bytes 16..21
 * the receive (and event) queue's rings; when those do not make a valid
 * ring, one queue serves every direction (a hostile guest can program them
 * at the same addresses).  Byte 12: number of
 * established connections (1-3, each a socketpair: the device's end and the
 * "host application's" end, small socket buffers so the pend ring fills);
 * byte 13: our buf_alloc; byte 14: the guest's buf_alloc; byte 15: the
 * credit-update threshold.  Ops: transmit (packets the C path hands over
 * get vsock_mux.py's treatment: SHUTDOWN, CREDIT_REQUEST, RST), receive,
 * poll, the application writes / reads / half-closes, a second vCPU writes
 * guest memory, queue an RST, flush a connection, post an event.
 * Invariants, besides fuzz_common.h's pop/push tracking:
 * - per connection, pend_len + held_bytes == rx_cnt - fwd_cnt <= buf_alloc
 *   (we never keep more than the credit we advertised; a stream being reset
 *   may have dropped some), and fwd_cnt counts exactly the bytes the
 *   application received;
 * - held transmit chains: per connection at most PV_VSOCK_HOLD_CONN, their
 *   bytes add up, the device's count and descriptor bound hold, and they
 *   are completed only into the transmit queue, each a head the device took
 *   and had not completed (fuzz_common.h's push tracking), also when a
 *   poll, a flush or a reset completes them outside pv_vsock_tx;
 * - tx_cnt counts exactly the bytes taken from the application's stream,
 *   and one receive pass never sends more than the guest's credit;
 * - the device reports end of stream only after the application shut down
 *   its sending side;
 * - used.idx advances by exactly res.completed; an error breaks the queue. */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/epoll.h>
#include <sys/ioctl.h>
#include <sys/socket.h>
#include <unistd.h>

#define FZ_TRACK_ENGINE
#include "fuzz_common.h"

#define NCONN 3
#define MAX_OPS 24
#define GUEST_CID 3

static struct pv_chain chain;
static struct pv_vsock vs;
static struct pv_vsock_conn conns[NCONN];
static int app[NCONN] = {-1, -1, -1};
static uint64_t app_wrote[NCONN], app_read[NCONN];
static int app_shut[NCONN];
static uint8_t buf[1 << 17];

static void app_drain(int i)
{
    ssize_t n;
    while (app[i] >= 0 && (n = recv(app[i], buf, sizeof(buf), MSG_DONTWAIT)) > 0)
        app_read[i] += (uint64_t)n;
}

static void check_conns(void)
{
    uint32_t nheld = 0;
    for (int i = 0; i < NCONN; i++) {
        struct pv_vsock_conn *k = &conns[i];
        if (k->state == PV_VSOCK_ST_FREE)
            continue;
        uint32_t unsent = (uint32_t)(k->rx_cnt - k->fwd_cnt);
        uint64_t waiting = (uint64_t)k->pend_len + k->held_bytes;
        int resetting = k->state == PV_VSOCK_ST_DEAD || k->pending & PV_VSOCK_P_RST;
        FZ_CHECK((resetting ? waiting <= unsent : waiting == unsent) && unsent <= k->buf_alloc,
                 "conn %d: pend_len %u + held %u, rx_cnt %u fwd_cnt %u buf_alloc %u", i,
                 k->pend_len, k->held_bytes, k->rx_cnt, k->fwd_cnt, k->buf_alloc);
        FZ_CHECK(k->held_n <= PV_VSOCK_HOLD_CONN, "conn %d holds %u chains", i, k->held_n);
        uint64_t hb = 0;
        uint32_t j = k->held_first;
        for (uint32_t n = 0; n < k->held_n; n++) {
            FZ_CHECK(j < PV_VSOCK_HOLD_MAX, "conn %d: held index %u", i, j);
            const struct pv_vsock_held *e = &vs.held[j];
            FZ_CHECK(e->off < e->len && e->niov >= 1 && e->niov <= PV_VSOCK_HOLD_IOV,
                     "conn %d: held chain off %u len %u niov %u", i, e->off, e->len, e->niov);
            FZ_CHECK(fz_tr.outstanding[fz_qi(vs.txq)][e->head] > 0,
                     "conn %d holds head %u, which is not outstanding", i, e->head);
            hb += e->len - e->off;
            nheld++;
            j = e->next;
        }
        FZ_CHECK(hb == k->held_bytes, "conn %d: held chains have %llu bytes, held_bytes %u", i,
                 (unsigned long long)hb, k->held_bytes);
        int queued = 0;
        FZ_CHECK(ioctl(app[i], FIONREAD, &queued) == 0, "FIONREAD");
        FZ_CHECK(k->fwd_cnt == (uint32_t)(app_read[i] + (uint64_t)queued),
                 "conn %d: fwd_cnt %u, the application got %llu (+%d queued)", i, k->fwd_cnt,
                 (unsigned long long)app_read[i], queued);
        queued = 0;
        if (ioctl(k->fd, FIONREAD, &queued) == 0)
            FZ_CHECK((uint64_t)k->tx_cnt + (uint64_t)queued == app_wrote[i],
                     "conn %d: tx_cnt %u + %d unread != %llu written", i, k->tx_cnt, queued,
                     (unsigned long long)app_wrote[i]);
        if (k->flags & PV_VSOCK_C_HOST_EOF)
            FZ_CHECK(app_shut[i], "conn %d: end of stream reported, the application never "
                     "shut down (tx_cnt %u)", i, k->tx_cnt);
    }
    FZ_CHECK(nheld == vs.nheld, "device holds %u chains, connections %u", vs.nheld, nheld);
    FZ_CHECK(!vs.txq || vs.held_desc <= vs.txq->size / 2, "held descriptors %u, queue size %u",
             vs.held_desc, vs.txq->size);
}

/* Completions of held chains made outside pv_vsock_tx (poll, flush, a
 * reset, the receive pump resetting a stream) land in the transmit queue:
 * allow them, as vmm/virtio/vsock.py signals them, and check the count. */
static void held_completions(uint16_t from)
{
    fz_allow_used(vs.txq, from, vs.tx_pushed);
    vs.tx_pushed = 0;
}

static void setup(const uint8_t *data, size_t size)
{
    static const uint32_t allocs[4] = {64, 4096, 65536, 262144};
    if (vs.epfd <= 0) {
        vs.epfd = epoll_create1(EPOLL_CLOEXEC);
        if (vs.epfd < 0) {
            perror("fuzz: epoll");
            abort();
        }
    }
    int epfd = vs.epfd;
    memset(&vs, 0, sizeof(vs));
    memset(conns, 0, sizeof(conns));
    vs.epfd = epfd;
    vs.guest_cid = GUEST_CID;
    vs.conns = conns;
    vs.max_slots = NCONN;
    vs.credit_threshold = 1u << (fz_hdr(data, size, 15, 1) % 18);
    int n = 1 + (int)(fz_hdr(data, size, 12, 1) % NCONN);
    uint32_t our = allocs[fz_hdr(data, size, 13, 1) % 4];
    uint32_t peer = allocs[fz_hdr(data, size, 14, 1) % 4];
    for (int i = 0; i < n; i++) {
        int sv[2], small = 4096;
        if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv)) {
            perror("fuzz: socketpair");
            abort();
        }
        setsockopt(sv[0], SOL_SOCKET, SO_SNDBUF, &small, sizeof(small));
        setsockopt(sv[1], SOL_SOCKET, SO_RCVBUF, &small, sizeof(small));
        app[i] = sv[1];
        app_wrote[i] = app_read[i] = 0;
        app_shut[i] = 0;
        FZ_CHECK(pv_vsock_conn_open(&vs, (uint32_t)i, sv[0], 1000 + (uint32_t)i,
                                    2000 + (uint32_t)i, PV_VSOCK_ST_CONNECTING, our) == 0, "open");
        FZ_CHECK(pv_vsock_conn_start(&vs, (uint32_t)i) == 0, "start");
        conns[i].peer_buf_alloc = peer;
    }
}

static void teardown(void)
{
    for (int i = 0; i < NCONN; i++) {
        if (conns[i].state != PV_VSOCK_ST_FREE) {
            int fd = conns[i].fd;
            pv_vsock_conn_free(&vs, (uint32_t)i);
            close(fd);
        }
        if (app[i] >= 0)
            close(app[i]);
        app[i] = -1;
    }
}

/* What vmm/virtio/vsock_mux.py does with a packet the C path hands over
 * (res->hdr): the parts that feed back into the C state (SHUTDOWN flags and
 * a flush, CREDIT_REQUEST -> CREDIT_UPDATE, RST for nonsense). */
static void python_side(const struct pv_vsock_result *res)
{
    struct {
        uint64_t src_cid, dst_cid;
        uint32_t src_port, dst_port, len;
        uint16_t type, op;
        uint32_t flags, buf_alloc, fwd_cnt;
    } __attribute__((packed)) h;
    memcpy(&h, res->hdr, sizeof(h));
    int slot = -1;
    for (int i = 0; i < NCONN; i++)
        if (conns[i].state != PV_VSOCK_ST_FREE && conns[i].local_port == h.dst_port &&
            conns[i].peer_port == h.src_port)
            slot = i;
    if (h.op == PV_VSOCK_OP_RST)
        return;
    if (slot < 0 || h.src_cid != GUEST_CID || h.dst_cid != PV_VSOCK_HOST_CID) {
        pv_vsock_queue_rst(&vs, h.dst_port, h.src_port);
        return;
    }
    struct pv_vsock_conn *k = &conns[slot];
    if (k->state != PV_VSOCK_ST_ESTABLISHED || k->pending & PV_VSOCK_P_RST)
        return;
    k->peer_buf_alloc = h.buf_alloc;
    k->peer_fwd_cnt = h.fwd_cnt;
    if (h.op == PV_VSOCK_OP_SHUTDOWN) {
        if (h.flags & PV_VSOCK_SHUT_RCV)
            k->flags |= PV_VSOCK_C_PEER_SHUT_RCV;
        if (h.flags & PV_VSOCK_SHUT_SEND)
            k->flags |= PV_VSOCK_C_PEER_SHUT_SEND;
        if ((k->flags & (PV_VSOCK_C_PEER_SHUT_RCV | PV_VSOCK_C_PEER_SHUT_SEND)) ==
            (PV_VSOCK_C_PEER_SHUT_RCV | PV_VSOCK_C_PEER_SHUT_SEND))
            k->flags |= PV_VSOCK_C_CLOSE_AFTER_FLUSH;
        pv_vsock_flush(&vs, (uint32_t)slot);
    } else if (h.op == PV_VSOCK_OP_CREDIT_REQUEST) {
        k->pending |= PV_VSOCK_P_CREDIT_UPDATE;
    } else {
        k->pending = PV_VSOCK_P_RST;
    }
}

static void run_engine(struct pv_vq *vq, int tx)
{
    struct pv_vsock_result res;
    uint16_t from = vq->used_idx, from_tx = vs.txq->used_idx;
    int broken = vq->broken;
    uint32_t credit[NCONN], tx_cnt[NCONN];
    for (int i = 0; i < NCONN; i++) {
        struct pv_vsock_conn *k = &conns[i];
        uint32_t in_flight = k->tx_cnt - k->peer_fwd_cnt;
        credit[i] = in_flight < k->peer_buf_alloc ? k->peer_buf_alloc - in_flight : 0;
        tx_cnt[i] = k->tx_cnt;
    }
    int r = tx ? pv_vsock_tx(vq, &vs, &chain, &res) : pv_vsock_rx(vq, &vs, &chain, &res);
    FZ_CHECK(r == res.error, "return %d vs res.error %d", r, res.error);
    fz_allow_used(vq, from, res.completed);
    fz_allow_avail_event(vq);
    if (broken)
        FZ_CHECK(res.completed == 0 && r == -broken, "broken queue used");
    if (r < 0)
        FZ_CHECK(vq->broken == -r, "error %d but queue not broken", r);
    if (tx)
        FZ_CHECK(vs.tx_pushed == 0, "pv_vsock_tx left %u completions undecided", vs.tx_pushed);
    else if (vq == vs.txq)
        vs.tx_pushed = 0;                          /* (counted in res.completed) */
    else
        held_completions(from_tx);
    if (tx && res.state == 1) {
        from_tx = vs.txq->used_idx;
        python_side(&res);
        held_completions(from_tx);
    }
    if (!tx)
        for (int i = 0; i < NCONN; i++)
            FZ_CHECK((uint32_t)(conns[i].tx_cnt - tx_cnt[i]) <= credit[i],
                     "conn %d: sent %u bytes with %u credit", i, conns[i].tx_cnt - tx_cnt[i],
                     credit[i]);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pv_vq vq, rxq_own, *rxq = &vq;
    struct fz_in in;
    struct pv_vsock_result res;

    fz_load_mem(data, size);
    fz_track_reset();
    if (fz_setup_vq(&vq, data, size) < 0)
        return 0;
    /* bytes 16..21: a separate receive queue (same size and features), or
     * when that is not a valid ring, the one queue serves both directions */
    if (pv_vq_init(&rxq_own, &fz_mem, vq.size, fz_gpa((uint16_t)fz_hdr(data, size, 16, 2), 0),
                   fz_gpa((uint16_t)fz_hdr(data, size, 18, 2), 0),
                   fz_gpa((uint16_t)fz_hdr(data, size, 20, 2), 0), vq.flags) == 0)
        rxq = &rxq_own;
    setup(data, size);
    vs.txq = &vq;                                  /* as vmm/virtio/vsock.py's activate */
    fz_ops_init(&in, data, size);
    for (int step = 0; step < MAX_OPS && fz_ops_left(&in); step++) {
        uint8_t op = (uint8_t)fz_take(&in, 1);
        int i = (op >> 4) % NCONN;
        switch (op % 10) {
        case 0:
        case 1:
            run_engine(&vq, 1);
            break;
        case 2:
        case 3:
            run_engine(rxq, 0);
            break;
        case 4: {
            uint16_t from = vq.used_idx;
            pv_vsock_poll(&vs, &res);
            held_completions(from);
            break;
        }
        case 5: {                                  /* the application writes */
            size_t len = (size_t)fz_take(&in, 2) | (op & 0x80 ? 0x10000 : 0);
            memset(buf, (int)fz_take(&in, 1), len);
            ssize_t n = app[i] >= 0 && !app_shut[i] ? send(app[i], buf, len, MSG_DONTWAIT | MSG_NOSIGNAL) : -1;
            if (n > 0)
                app_wrote[i] += (uint64_t)n;
            break;
        }
        case 6:                                    /* the application reads */
            app_drain(i);
            break;
        case 7:                                    /* ... or stops sending */
            if (app[i] >= 0 && !shutdown(app[i], SHUT_WR))
                app_shut[i] = 1;
            break;
        case 8:
            fz_op_guest_write(&in);
            break;
        default:
            switch (fz_take(&in, 1) % 3) {
            case 0:
                pv_vsock_queue_rst(&vs, (uint32_t)fz_take(&in, 4), (uint32_t)fz_take(&in, 4));
                break;
            case 1: {
                uint16_t from = vq.used_idx;
                pv_vsock_flush(&vs, (uint32_t)i);
                held_completions(from);
                break;
            }
            default: {
                uint16_t from = rxq->used_idx;
                int r = pv_vsock_event(rxq, &chain, (uint32_t)fz_take(&in, 4));
                fz_allow_used(rxq, from, r > 0);
            }
            }
        }
        check_conns();
    }
    fz_track_check_mem();
    vs.txq = NULL;                                 /* the queue goes: held chains are dropped */
    teardown();
    return 0;
}

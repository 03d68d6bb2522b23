/* libFuzzer target: the virtio-net data path (native/src/net.c, virtio 1.1
 * §5.1.6), receive and transmit, against a datagram socketpair standing in
 * for the tap (each datagram is one frame with its virtio_net_hdr).
 *
 * Header bytes 0..11 set up the queue (fz_setup_vq); byte 12: bit0
 * MRG_RXBUF, bit1 the 10-byte legacy header (without MRG_RXBUF), bit2 the queue is
 * the transmit queue (else receive); byte 13: the per-call budget (0: the
 * default).  Ops: inject a frame from the peer (any length up to 128 KiB),
 * run the engine (rx or tx), or rewrite guest memory.
 * Invariants, besides fuzz_common.h's pop/push tracking:
 * - used.idx advances by exactly res.completed, never more than the budget
 *   (tx); an error leaves the queue broken;
 * - a frame held for more buffers fits the sink;
 * - transmit: the peer gets exactly tx_packets new frames carrying
 *   tx_bytes payload bytes;
 * - guest memory changes only in the popped chains' writable segments and
 *   the used ring (a transmit chain is never written). */
#define _GNU_SOURCE
#include <errno.h>
#include <sys/socket.h>
#include <unistd.h>

#define FZ_TRACK_ENGINE
#include "fuzz_common.h"

#define MAX_OPS 16
#define MAX_FRAME (2 * 65536)

static struct pv_chain chain;
static struct pv_net net;
static uint8_t sink[PV_NET_SINK_SIZE];
static uint8_t frame[MAX_FRAME];
static int sv[2] = {-1, -1};          /* [0] the device's "tap", [1] the peer */

static void drain(int fd)
{
    while (recv(fd, frame, sizeof(frame), MSG_DONTWAIT | MSG_TRUNC) >= 0)
        ;
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pv_vq vq;
    struct fz_in in;
    struct pv_net_result res;

    if (sv[0] < 0 && socketpair(AF_UNIX, SOCK_DGRAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0, sv)) {
        perror("fuzz: socketpair");
        abort();
    }
    drain(sv[0]);
    drain(sv[1]);
    fz_load_mem(data, size);
    fz_track_reset();
    if (fz_setup_vq(&vq, data, size) < 0)
        return 0;
    uint32_t f = (uint32_t)fz_hdr(data, size, 12, 1);
    int tx = (f >> 2) & 1;
    memset(&net, 0, sizeof(net));
    net.fd = sv[0];
    net.mrg_rxbuf = f & 1;
    /* as NetDevice.activate: 12 with VERSION_1 or MRG_RXBUF, else 10 */
    net.hdr_len = (f & 2) && !net.mrg_rxbuf ? 10 : 12;
    net.budget = (uint32_t)fz_hdr(data, size, 13, 1);
    net.sink = sink;
    uint32_t budget = net.budget ? net.budget : PV_NET_BUDGET;

    fz_ops_init(&in, data, size);
    for (int step = 0; step < MAX_OPS && fz_ops_left(&in); step++) {
        uint8_t op = (uint8_t)fz_take(&in, 1);
        switch (op % 4) {
        case 0: {                                  /* the peer sends a frame */
            uint32_t len = (uint32_t)fz_take(&in, 2) | (op & 0x80 ? 0x10000u : 0);
            memset(frame, (int)fz_take(&in, 1), len);
            if (len >= 12)
                memset(frame, 0, 12);              /* a plain virtio_net_hdr */
            (void)send(sv[1], frame, len, MSG_DONTWAIT);
            break;
        }
        case 1: {                                  /* a kick / a readable tap */
            uint16_t from = vq.used_idx;
            int broken = vq.broken;
            uint64_t pk = net.tx_packets, by = net.tx_bytes;
            int r = tx ? pv_net_tx(&vq, &net, &chain, &res) : pv_net_rx(&vq, &net, &chain, &res);
            FZ_CHECK(r == res.error, "return %d vs res.error %d", r, res.error);
            fz_allow_used(&vq, from, res.completed);
            fz_allow_avail_event(&vq);
            FZ_CHECK(net.pending <= PV_NET_SINK_SIZE, "pending %u", net.pending);
            if (broken)
                FZ_CHECK(res.completed == 0 && r == -broken, "broken queue used");
            if (r < 0)
                FZ_CHECK(vq.broken == -r, "error %d but queue not broken", r);
            if (tx) {
                FZ_CHECK(res.completed <= budget, "tx completed %u > budget %u",
                         res.completed, budget);
                uint64_t n = 0, bytes = 0;
                ssize_t got;
                while ((got = recv(sv[1], frame, sizeof(frame), MSG_DONTWAIT)) >= 0) {
                    n++;
                    bytes += (uint64_t)got - net.hdr_len;
                }
                FZ_CHECK(n == net.tx_packets - pk && bytes == net.tx_bytes - by,
                         "peer got %llu frames / %llu bytes, device counted %llu / %llu",
                         (unsigned long long)n, (unsigned long long)bytes,
                         (unsigned long long)(net.tx_packets - pk),
                         (unsigned long long)(net.tx_bytes - by));
            } else {
                FZ_CHECK(res.state <= PV_NET_RX_MORE, "rx state %u", res.state);
            }
            break;
        }
        default:                                   /* a second vCPU writes guest memory */
            fz_op_guest_write(&in);
        }
    }
    if (tx)
        fz_tr.nranges = 0;                         /* transmit never writes guest buffers */
    fz_track_check_mem();
    return 0;
}

/* libFuzzer target: the virtio-blk io_uring engine (native/src/uring.c):
 * reads, writes and flushes go to a real io_uring against a small temporary
 * image and complete later; everything else runs inline through blk.c.
 *
 * Header bytes 0..11 set up the queue (fz_setup_vq); byte 12: bit0
 * read-only disk; byte 14: requests per submit call (0: PV_BLK_BUDGET).  Ops: a kick (submit), a reap (or a reap that waits for
 * everything), or a second vCPU rewriting guest memory while requests are
 * in flight.  At the end every request in flight is reaped (as the I/O
 * thread would) or, header byte 15 bit 0, dropped by a drain (device reset).
 * After each submit call the harness lets the kernel finish every request in
 * flight (fuzz_settle.h: an input runs the same way every time) unless header
 * byte 15 bit 1 asks for the free-running ring, whose reaps find whatever
 * the kernel finished by then.
 * Invariants, besides fuzz_common.h's pop/push tracking (a completion names
 * a chain the device took, carries a status 0/1/2 in the chain's last byte,
 * and the kernel and the device write nothing outside the chains' writable
 * segments and the used ring):
 * - the image never changes size;
 * - one submit call takes at most the budget of chains, and says `more`
 *   exactly when it used it all;
 * - used.idx advances by exactly the completions each call reports;
 * - nothing stays in flight after a waiting reap. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#define FZ_TRACK_ENGINE
#include "fuzz_common.h"
#include "fuzz_settle.h"

#define IMG_SECTORS 64
#define MAX_OPS 12

static struct pv_chain chain;
static struct pv_blk blk;
static int img_fd = -1;
static struct pv_uring *rings[11];     /* one per queue size (2^0 .. 2^10), reused */

static void open_image(void)
{
    static uint8_t pattern[IMG_SECTORS * 512];
    if (img_fd < 0) {
        char path[] = "/dev/shm/pyvmm-fuzz-uring-XXXXXX";
        img_fd = mkstemp(path);
        if (img_fd < 0) {
            char tmp[] = "/tmp/pyvmm-fuzz-uring-XXXXXX";
            img_fd = mkstemp(tmp);
            if (img_fd >= 0)
                unlink(tmp);
        } else {
            unlink(path);
        }
        FZ_CHECK(img_fd >= 0, "image");
        for (size_t i = 0; i < sizeof(pattern); i++)
            pattern[i] = (uint8_t)(i * 13 + 5);
    }
    FZ_CHECK(ftruncate(img_fd, 0) == 0 &&
             pwrite(img_fd, pattern, sizeof(pattern), 0) == (ssize_t)sizeof(pattern), "image");
}

static off_t image_size(void)
{
    struct stat st;
    FZ_CHECK(fstat(img_fd, &st) == 0, "fstat");
    return st.st_size;
}

static void check_call(struct pv_vq *vq, uint16_t from, int r, const struct pv_blk_result *res)
{
    FZ_CHECK(image_size() == IMG_SECTORS * 512, "image grew to %lld bytes", (long long)image_size());
    fz_allow_used(vq, from, res->completed);
    fz_allow_avail_event(vq);
    FZ_CHECK(res->ioerr <= res->completed, "ioerr %u completed %u", res->ioerr, res->completed);
    if (r < 0 && r >= -PV_VQ_E_TOO_BIG)
        FZ_CHECK(vq->broken == -r, "error %d but queue not broken", r);
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pv_vq vq;
    struct fz_in in;
    struct pv_blk_result res;

    fz_load_mem(data, size);
    fz_track_reset();
    fz_tr.status_last = 1;
    if (fz_setup_vq(&vq, data, size) < 0)
        return 0;
    open_image();
    int lg = 0;
    while ((1u << lg) < vq.size)
        lg++;
    static int unavailable;
    if (!rings[lg] && !unavailable) {
        int err = 0;
        rings[lg] = pv_uring_new(vq.size, -1, &err);
        if (!rings[lg]) {       /* as blk_uring.available(): the engine is refused there */
            fprintf(stderr, "fuzz_uring: no io_uring here (errno %d): target skipped\n", err);
            unavailable = 1;
        }
    }
    if (unavailable)
        return 0;
    struct pv_uring *u = rings[lg];
    memset(&blk, 0, sizeof(blk));
    blk.fd = img_fd;
    blk.readonly = fz_hdr(data, size, 12, 1) & 1;
    blk.capacity = IMG_SECTORS;
    blk.max_discard_sectors = blk.max_write_zeroes_sectors = 0x3FFFFF;
    blk.max_discard_seg = blk.max_write_zeroes_seg = 32;
    memcpy(blk.id, "pyvmm-fuzz-uring-001", sizeof(blk.id));
    blk.budget = (uint32_t)fz_hdr(data, size, 14, 1);   /* 0: PV_BLK_BUDGET */
    uint32_t budget = blk.budget ? blk.budget : PV_BLK_BUDGET;
    int free_running = (fz_hdr(data, size, 15, 1) >> 1) & 1;

    fz_ops_init(&in, data, size);
    for (int step = 0; step < MAX_OPS && fz_ops_left(&in); step++) {
        uint8_t op = (uint8_t)fz_take(&in, 1);
        uint16_t from = vq.used_idx;
        int r;
        switch (op % 4) {
        case 0:
        case 1:
            fz_tr.call_pops = 0;
            fz_tr.pop_limit = budget;
            r = pv_blk_uring_submit(&vq, &blk, u, &chain, &res);
            fz_tr.pop_limit = 0;
            FZ_CHECK(r == res.error, "submit returned %d, res.error %d", r, res.error);
            check_call(&vq, from, r, &res);
            FZ_CHECK(res.more == (r >= 0 && fz_tr.call_pops == budget), "more %u after %u of %u",
                     res.more, fz_tr.call_pops, budget);
            if (!free_running)
                fz_uring_settle(u, res.error != 0);
            break;
        case 2:
            r = pv_blk_uring_reap(&vq, &blk, u, op & 0x80 ? 1 : 0, &res);
            check_call(&vq, from, r, &res);
            if (op & 0x80 && !res.error)
                FZ_CHECK(pv_uring_inflight(u) == 0, "%u in flight after a waiting reap",
                         pv_uring_inflight(u));
            break;
        default:
            fz_op_guest_write(&in);
        }
    }
    if (!(fz_hdr(data, size, 15, 1) & 1)) {          /* the I/O thread reaps the rest */
        uint16_t from = vq.used_idx;
        pv_blk_uring_reap(&vq, &blk, u, 1, &res);
        check_call(&vq, from, 0, &res);
        FZ_CHECK(pv_uring_inflight(u) == 0, "%u in flight at the end", pv_uring_inflight(u));
    }
    /* or a device reset drops what is in flight: drain waits for the kernel */
    uint16_t used_before_drain = vq.used_idx;
    FZ_CHECK(pv_uring_drain(u) == 0, "drain");
    FZ_CHECK(pv_uring_inflight(u) == 0 && vq.used_idx == used_before_drain,
             "drain left %u in flight or completed requests", pv_uring_inflight(u));
    fz_track_check_mem();
    return 0;
}

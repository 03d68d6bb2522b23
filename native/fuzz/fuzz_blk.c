/* libFuzzer target: virtio-blk request parsing and execution
 * (native/src/blk.c, virtio 1.1 §5.2.6) against a small temporary image.
 *
 * Header bytes 0..11 set up the queue (fz_setup_vq); byte 12: bit0
 * read-only disk, bit1 start with fallocate(ZERO_RANGE) marked unsupported,
 * bits 2-3: discard/write-zeroes segment limit (1, 2, 32 or 256); byte 13:
 * max sectors per segment (0: the device's 0x3FFFFF); byte 14: requests per
 * call (0: PV_BLK_BUDGET).  Ops: process a kick,
 * or rewrite guest memory (between kicks, and at the seam inside a
 * discard/write-zeroes request where a second vCPU could swap a segment).
 * Invariants, besides fuzz_common.h's pop/push tracking:
 * - every completed request has its status (0, 1 or 2) in its last byte;
 * - the image never changes size (no guest-chosen growth of a host file);
 * - used.idx advances by exactly res.completed; an error leaves the queue
 *   broken and later kicks complete nothing; a kick completes at most the
 *   budget, says `more` exactly when it used it all, and otherwise leaves
 *   no request behind;
 * - guest memory changes only in the popped chains' writable segments and
 *   the used ring. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#define FZ_TRACK_ENGINE
#include "fuzz_common.h"
#include "fuzz_image.h"

#define MAX_KICKS 8

static struct pv_chain chain;
static struct pv_blk blk;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pv_vq vq;
    struct fz_in in;
    struct pv_blk_result res;

    open_image();
    reset_image();
    fz_load_mem(data, size);
    fz_track_reset();
    fz_tr.status_last = 1;
    if (fz_setup_vq(&vq, data, size) < 0)
        return 0;
    uint32_t budget = fz_blk_from_header(&blk, data, size);

    fz_ops_init(&in, data, size);
    hook_in = &in;
    pv_blk_seg_hook = seg_hook;
    for (int kick = 0; kick < MAX_KICKS && fz_ops_left(&in); kick++) {
        uint8_t op = (uint8_t)fz_take(&in, 1);
        if (op & 1) {
            fz_op_guest_write(&in);
            continue;
        }
        uint16_t from = vq.used_idx;
        int broken = vq.broken;
        fz_tr.call_pops = 0;
        fz_tr.pop_limit = budget;
        int r = pv_blk_process(&vq, &blk, &chain, &res);
        fz_tr.pop_limit = 0;
        FZ_CHECK(r == res.error, "return %d vs res.error %d", r, res.error);
        FZ_CHECK(image_size() == IMG_SECTORS * 512, "image grew to %lld bytes",
                 (long long)image_size());
        fz_allow_used(&vq, from, res.completed);
        fz_allow_avail_event(&vq);
        FZ_CHECK(res.ioerr <= res.completed, "ioerr %u completed %u", res.ioerr, res.completed);
        if (broken)
            FZ_CHECK(res.completed == 0 && r == -broken, "broken queue processed requests");
        if (r < 0)
            FZ_CHECK(vq.broken == -r, "error %d but queue not broken", r);
        FZ_CHECK(res.completed <= budget && res.more == (r >= 0 && res.completed == budget),
                 "completed %u budget %u more %u", res.completed, budget, res.more);
        if (r >= 0 && !res.more)            /* done: nothing left behind unannounced */
            FZ_CHECK(pv_vq_avail_idx(&vq) == vq.last_avail, "kick left requests behind");
    }
    pv_blk_seg_hook = NULL;
    hook_in = NULL;
    fz_track_check_mem();
    return 0;
}

/* libFuzzer target: the split-virtqueue walker and used ring of
 * native/src/virtq.c (virtio 1.1 §2.6), direct and indirect chains.
 *
 * Ops (from the end of the input) pop chains, push them back in any order
 * with any length, run the notification helpers, or rewrite guest memory
 * between steps as a second vCPU would.  Invariants checked:
 * - every popped chain lies in guest RAM, its lengths add up, readable
 *   segments come first, at most `size` segments (fz_check_chain);
 * - a malformed queue stays broken: every later pop fails the same way;
 * - pushes advance used.idx by exactly the number pushed, in memory too;
 * - the device writes no guest byte other than used elements, used.idx and
 *   (EVENT_IDX) avail_event (fz_check_mem);
 * - nothing outside guest RAM is touched (guard pages, ASan). */
#include "fuzz_common.h"

#define MAX_STEPS 256

static struct pv_chain chain;

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    struct pv_vq vq;
    struct fz_in in;
    uint16_t pending[PV_VQ_MAX_SIZE];
    uint32_t npending = 0;

    fz_load_mem(data, size);
    if (fz_setup_vq(&vq, data, size) < 0) {
        FZ_CHECK(pv_vq_pop(&vq, &chain) < 0, "pop on a queue that failed init");
        fz_check_mem();
        return 0;
    }
    fz_ops_init(&in, data, size);
    for (int step = 0; step < MAX_STEPS && fz_ops_left(&in); step++) {
        uint8_t op = (uint8_t)fz_take(&in, 1);
        switch (op % 6) {
        case 0:
        case 1: {                                  /* pop */
            uint16_t la = vq.last_avail;
            int broken = vq.broken;
            int r = pv_vq_pop(&vq, &chain);
            if (broken)
                FZ_CHECK(r == -broken, "broken queue popped %d (was %d)", r, broken);
            if (r > 0) {
                fz_check_chain(&vq, &chain);
                FZ_CHECK(vq.last_avail == (uint16_t)(la + 1), "last_avail");
                if (npending < PV_VQ_MAX_SIZE)
                    pending[npending++] = chain.head;
            } else if (r == 0) {
                FZ_CHECK(vq.last_avail == la && pv_vq_avail_idx(&vq) == la, "empty pop");
            } else {
                FZ_CHECK(vq.broken == -r && vq.last_avail == la, "failed pop state");
                FZ_CHECK(pv_vq_pop(&vq, &chain) == r, "broken queue recovered");
            }
            break;
        }
        case 2: {                                  /* push one (any order, any length) */
            if (!npending)
                break;
            uint32_t k = (uint32_t)fz_take(&in, 2) % npending;
            uint32_t len = (uint32_t)fz_take(&in, 4);
            uint16_t from = vq.used_idx;
            pv_vq_push(&vq, pending[k], len);
            fz_allow_used(&vq, from, 1);
            uint8_t *e = (uint8_t *)vq.used + 4 + 8 * (size_t)(from % vq.size);
            uint32_t id, l;
            memcpy(&id, e, 4);
            memcpy(&l, e + 4, 4);
            FZ_CHECK(id == pending[k] && l == len, "used element %u/%u vs %u/%u", id, l,
                     pending[k], len);
            pending[k] = pending[--npending];
            break;
        }
        case 3:                                    /* interrupt decision */
            pv_vq_need_interrupt(&vq);
            break;
        case 4: {                                  /* re-arm notifications */
            int more = op & 0x80 ? pv_vq_notify_on_next(&vq) : pv_vq_enable_notify(&vq);
            fz_allow_avail_event(&vq);
            if (!(op & 0x80))
                FZ_CHECK(more == (pv_vq_avail_idx(&vq) != vq.last_avail), "enable_notify");
            break;
        }
        default:                                   /* a second vCPU writes guest memory */
            fz_op_guest_write(&in);
        }
    }
    fz_check_mem();
    return 0;
}

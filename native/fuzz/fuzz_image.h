/* The disk image and the "second vCPU" of the virtio-blk fuzz targets
 * (fuzz_blk.c, fuzz_fast.c): a small image on tmpfs, rewritten before each
 * input, and blk.c's segment seam rewriting guest memory between the check
 * and the use of a discard/write-zeroes request.  Include once, after
 * fuzz_common.h. */
#ifndef FUZZ_IMAGE_H
#define FUZZ_IMAGE_H

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#define IMG_SECTORS 64

static int img_fd = -1;
static struct fz_in *hook_in;

static void open_image(void)
{
    if (img_fd >= 0)
        return;
    const char *dir = getenv("TMPDIR");
    char path[4096];
    /* tmpfs when there is one: fdatasync is free and nothing reaches a disk */
    snprintf(path, sizeof(path), "%s/pyvmm-fuzz-blk-XXXXXX",
             access("/dev/shm", W_OK) == 0 ? "/dev/shm" : dir ? dir : "/tmp");
    img_fd = mkstemp(path);
    if (img_fd < 0) {
        perror("fuzz: image");
        abort();
    }
    unlink(path);                  /* gone when the fuzzer exits */
}

static void reset_image(void)
{
    static uint8_t pattern[IMG_SECTORS * 512];
    if (!pattern[1])
        for (size_t i = 0; i < sizeof(pattern); i++)
            pattern[i] = (uint8_t)(i * 7 + 1);
    if (ftruncate(img_fd, 0) || pwrite(img_fd, pattern, sizeof(pattern), 0) != sizeof(pattern)) {
        perror("fuzz: image");
        abort();
    }
}

static off_t image_size(void)
{
    struct stat st;
    if (fstat(img_fd, &st)) {
        perror("fuzz: fstat");
        abort();
    }
    return st.st_size;
}

/* the second vCPU, at the moment the segments were checked (blk.c seam) */
static void seg_hook(void *arg)
{
    (void)arg;
    for (int i = 0; i < 4 && hook_in && fz_ops_left(hook_in); i++)
        fz_op_guest_write(hook_in);
}

/* The disk the input's header describes (bytes 12-14: flags, max
 * discard/write-zeroes sectors, per-call budget); returns the budget in use. */
static uint32_t fz_blk_from_header(struct pv_blk *b, const uint8_t *data, size_t size)
{
    static const uint32_t seg_limits[4] = {1, 2, 32, PV_BLK_MAX_SEGS};
    uint32_t f = (uint32_t)fz_hdr(data, size, 12, 1);
    uint32_t maxsec = (uint32_t)fz_hdr(data, size, 13, 1);
    memset(b, 0, sizeof(*b));
    b->fd = img_fd;
    b->readonly = f & 1;
    b->no_zero_range = (f >> 1) & 1;
    b->capacity = IMG_SECTORS;
    b->max_discard_sectors = b->max_write_zeroes_sectors = maxsec ? maxsec : 0x3FFFFF;
    b->max_discard_seg = b->max_write_zeroes_seg = seg_limits[(f >> 2) & 3];
    memcpy(b->id, "pyvmm-fuzz-serial-01", sizeof(b->id));
    b->budget = (uint32_t)fz_hdr(data, size, 14, 1);   /* 0: PV_BLK_BUDGET */
    return b->budget ? b->budget : PV_BLK_BUDGET;
}

#endif

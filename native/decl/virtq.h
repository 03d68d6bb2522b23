/* cffi declarations of native/include/pyvmm_virtq.h (split virtqueue and
 * virtio-blk engine); `...` lets the compiler fill in layouts and numbers. */

#define PV_MEM_MAX_REGIONS ...
#define PV_VQ_MAX_SIZE ...
#define PV_VQ_F_EVENT_IDX ...
#define PV_VQ_F_INDIRECT ...
#define PV_VQ_E_RING ...
#define PV_VQ_E_AVAIL_IDX ...
#define PV_VQ_E_HEAD ...
#define PV_VQ_E_NEXT ...
#define PV_VQ_E_RANGE ...
#define PV_VQ_E_LOOP ...
#define PV_VQ_E_INDIRECT ...
#define PV_VQ_E_ORDER ...
#define PV_VQ_E_REQ ...
#define PV_VQ_E_TOO_BIG ...
#define PV_VQ_MAX_CHAIN_BYTES ...

struct iovec {
    void *iov_base;
    size_t iov_len;
    ...;
};

struct pv_region {
    uint64_t gpa;
    uint64_t size;
    uint8_t *host;
    ...;
};

struct pv_mem {
    uint32_t nregions;
    struct pv_region r[...];
    ...;
};

struct pv_vq {
    uint32_t size;
    uint32_t flags;
    uint16_t last_avail;
    uint16_t used_idx;
    uint16_t signalled_used;
    uint8_t signalled_valid;
    uint8_t broken;
    ...;
};

struct pv_chain {
    uint16_t head;
    uint32_t nseg;
    uint32_t nread;
    uint64_t read_len;
    uint64_t write_len;
    struct iovec iov[...];
    ...;
};

int pv_mem_translate(const struct pv_mem *mem, uint64_t gpa, uint64_t len, void **host);
int pv_vq_init(struct pv_vq *vq, const struct pv_mem *mem, uint32_t size,
               uint64_t desc, uint64_t avail, uint64_t used, uint32_t flags);
int pv_vq_pop(struct pv_vq *vq, struct pv_chain *c);
void pv_vq_push(struct pv_vq *vq, uint16_t head, uint32_t len);
int pv_vq_need_interrupt(struct pv_vq *vq);
int pv_vq_enable_notify(struct pv_vq *vq);
int pv_vq_notify_on_next(struct pv_vq *vq);
uint16_t pv_vq_avail_idx(struct pv_vq *vq);

struct pv_blk {
    int fd;
    int readonly;
    uint64_t capacity;
    uint32_t max_discard_sectors;
    uint32_t max_discard_seg;
    uint32_t max_write_zeroes_sectors;
    uint32_t max_write_zeroes_seg;
    uint32_t no_zero_range;
    uint32_t budget;
    uint8_t id[20];
    ...;
};

struct pv_blk_result {
    uint32_t completed;
    uint32_t interrupt;
    int32_t error;
    uint32_t ioerr;
    uint32_t more;
    ...;
};

int pv_blk_process(struct pv_vq *vq, struct pv_blk *blk, struct pv_chain *scratch,
                   struct pv_blk_result *res);
int pv_blk_request(struct pv_blk *blk, struct pv_chain *c, uint32_t *used_len);
extern void (*pv_blk_seg_hook)(void *arg);
extern void *pv_blk_seg_hook_arg;
extern void (*pv_blk_flush_hook)(int fd);
#define PV_BLK_BUDGET ...
long pv_bench_pread(int fd, void *buf, uint64_t len, const uint64_t *offsets, uint32_t n);

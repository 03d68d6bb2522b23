/* io_uring disk engine (native/src/uring.c) */
struct pv_uring;                     /* opaque: one ring per disk */

struct pv_uring *pv_uring_new(uint32_t entries, int efd, int *err);
void pv_uring_free(struct pv_uring *u);
uint32_t pv_uring_inflight(const struct pv_uring *u);
int pv_uring_drain(struct pv_uring *u);
int pv_blk_uring_submit(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u,
                        struct pv_chain *scratch, struct pv_blk_result *res);
int pv_blk_uring_reap(struct pv_vq *vq, struct pv_blk *blk, struct pv_uring *u, int wait_all,
                      struct pv_blk_result *res);
extern void (*pv_uring_sqe_hook)(uint8_t opcode, uint8_t flags, uint64_t user_data);
long pv_bench_uring(int fd, uint8_t *bufs, uint64_t len, const uint64_t *offsets, uint32_t n,
                    uint32_t depth, int write);

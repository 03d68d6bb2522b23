struct pv_drvq {
    uint8_t *avail, *used;
    uint16_t size, avail_idx, last_used;
};
uint32_t pv_drvq_recycle(struct pv_drvq *q, uint64_t *bytes, uint32_t *last_head);
void pv_drvq_post(struct pv_drvq *q, const uint16_t *heads, uint32_t nheads, uint64_t start,
                  uint32_t n);

long pv_ioctl(int fd, unsigned long req, void *arg);
long pv_ioctl_val(int fd, unsigned long req, unsigned long arg);
void *pv_alloc_ram(size_t size, size_t align, int hugepages);
int pv_free_ram(void *addr, size_t size);
size_t pv_kvm_run_offset(int which);

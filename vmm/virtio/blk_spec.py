"""virtio-blk's interface (virtio 1.1 §5.2): feature bits, request types,
status values, the configuration layout and pyvmm's limits, shared by the
device (vmm/virtio/blk.py) and its Python engine (vmm/virtio/blk_py.py)."""

VIRTIO_ID_BLOCK = 2
SECTOR = 512

# §5.2.3 feature bits
VIRTIO_BLK_F_SIZE_MAX = 1
VIRTIO_BLK_F_SEG_MAX = 2
VIRTIO_BLK_F_RO = 5
VIRTIO_BLK_F_BLK_SIZE = 6
VIRTIO_BLK_F_FLUSH = 9
VIRTIO_BLK_F_MQ = 12
VIRTIO_BLK_F_DISCARD = 13
VIRTIO_BLK_F_WRITE_ZEROES = 14

# §5.2.6 request types and status values
T_IN, T_OUT, T_FLUSH, T_GET_ID, T_DISCARD, T_WRITE_ZEROES = 0, 1, 4, 8, 11, 13
S_OK, S_IOERR, S_UNSUPP = 0, 1, 2
WZ_F_UNMAP = 1
ID_BYTES = 20

QUEUE_SIZE = 256
IO_ENGINES = ("sync", "io_uring")
SIZE_MAX = 1 << 20                # largest single segment we advertise
MAX_DISCARD_SECTORS = 0x3FFFFF    # per segment (2 GiB - 512)
MAX_DISCARD_SEG = 32
DISCARD_ALIGNMENT = 8             # sectors (4 KiB)

# §5.2.4 struct virtio_blk_config: capacity, size_max, seg_max, geometry
# (cylinders, heads, sectors), blk_size, topology (exp, offset, min_io,
# opt_io), writeback, 3 unused, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# writeback, unused, num_queues, max_discard_sectors, max_discard_seg,
# discard_sector_alignment, max_write_zeroes_sectors, max_write_zeroes_seg,
# write_zeroes_may_unmap, 3 unused: 60 bytes.
CONFIG_FORMAT = "<QIIHBBIBBHIBxHIIIIIB3x"
MAX_QUEUES = 64

FALLOC_FL_KEEP_SIZE, FALLOC_FL_PUNCH_HOLE, FALLOC_FL_ZERO_RANGE = 1, 2, 0x10

/* Linux x86 boot protocol structures from <asm/bootparam.h> (the zero page);
 * the compiler supplies the (packed) layout. */
#define E820_MAX_ENTRIES_ZEROPAGE ...
#define SETUP_NONE ...
#define LOADED_HIGH ...
#define KEEP_SEGMENTS ...
#define CAN_USE_HEAP ...
#define XLF_KERNEL_64 ...

struct setup_header {
    uint8_t setup_sects;
    uint16_t root_flags;
    uint32_t syssize;
    uint16_t ram_size;
    uint16_t vid_mode;
    uint16_t root_dev;
    uint16_t boot_flag;
    uint16_t jump;
    uint32_t header;
    uint16_t version;
    uint32_t realmode_swtch;
    uint16_t start_sys_seg;
    uint16_t kernel_version;
    uint8_t type_of_loader;
    uint8_t loadflags;
    uint16_t setup_move_size;
    uint32_t code32_start;
    uint32_t ramdisk_image;
    uint32_t ramdisk_size;
    uint32_t bootsect_kludge;
    uint16_t heap_end_ptr;
    uint8_t ext_loader_ver;
    uint8_t ext_loader_type;
    uint32_t cmd_line_ptr;
    uint32_t initrd_addr_max;
    uint32_t kernel_alignment;
    uint8_t relocatable_kernel;
    uint8_t min_alignment;
    uint16_t xloadflags;
    uint32_t cmdline_size;
    uint32_t hardware_subarch;
    uint64_t hardware_subarch_data;
    uint32_t payload_offset;
    uint32_t payload_length;
    uint64_t setup_data;
    uint64_t pref_address;
    uint32_t init_size;
    uint32_t handover_offset;
    uint32_t kernel_info_offset;
    ...;
};

struct boot_e820_entry {
    uint64_t addr;
    uint64_t size;
    uint32_t type;
    ...;
};

struct boot_params {
    uint32_t ext_ramdisk_image;
    uint32_t ext_ramdisk_size;
    uint32_t ext_cmd_line_ptr;
    uint8_t e820_entries;
    struct setup_header hdr;
    struct boot_e820_entry e820_table[...];
    ...;
};

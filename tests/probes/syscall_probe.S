/*
 * Ring-0 probe: what does this host's KVM deliver when user mode (CPL 3)
 * executes `syscall`, `int $0x80` and `sysenter`?  Booted by pyvmm through
 * the 64-bit boot protocol entry (long mode, identity map of 4 GiB with
 * 2 MiB supervisor pages).  For each probe it prints one line on COM1:
 *
 *   <name>: entry cpl=N rip=.. rcx=.. r11=..        (syscall reached LSTAR in ring 0)
 *   <name>: vec=N err=.. rip=.. cs=.. cr2=.. rcx=.. r11=.. rax=..   (an exception)
 *
 * then resets the machine through the i8042 (pyvmm exits 0).
 * Memory: code at 0x200000 (supervisor), user page 0x400000 (U=1).
 */
        .set COM1, 0x3f8
        .set KCODE, 0x08
        .set KDATA, 0x10
        .set UDATA, 0x1b
        .set UCODE, 0x23
        .set TSSSEL, 0x28
        .set USER, 0x400000

        .text
        .code64
        .globl _start
_start:
        cli
        lea     stack_top(%rip), %rsp
        lgdt    gdt_ptr(%rip)
        mov     $KDATA, %ax
        mov     %ax, %ds
        mov     %ax, %es
        mov     %ax, %ss
        pushq   $KCODE
        lea     1f(%rip), %rax
        push    %rax
        lretq
1:      /* TSS descriptor: base = tss */
        lea     tss(%rip), %rax
        lea     gdt_tss(%rip), %rdi
        mov     %ax, 2(%rdi)
        shr     $16, %rax
        mov     %al, 4(%rdi)
        mov     %ah, 7(%rdi)
        shr     $16, %rax
        mov     %eax, 8(%rdi)
        lea     stack_top(%rip), %rax
        mov     %rax, tss+4(%rip)         /* RSP0 */
        mov     $TSSSEL, %ax
        ltr     %ax

        /* IDT: every vector -> its stub; 0x80 callable from ring 3 */
        lea     idt(%rip), %rdi
        lea     stubs(%rip), %rsi
        xor     %ecx, %ecx
2:      mov     %rsi, %rax
        mov     %ax, (%rdi)
        movw    $KCODE, 2(%rdi)
        movw    $0x8e00, 4(%rdi)
        cmp     $0x80, %ecx
        jne     3f
        movw    $0xee00, 4(%rdi)
3:      shr     $16, %rax
        mov     %ax, 6(%rdi)
        shr     $16, %rax
        mov     %eax, 8(%rdi)
        add     $16, %rdi
        add     $16, %rsi
        inc     %ecx
        cmp     $256, %ecx
        jne     2b
        lidt    idt_ptr(%rip)

        /* U bit on the path to the user page (PML4[0], PDPT[0], PD[2]) */
        mov     %cr3, %rax
        and     $~0xfff, %rax
        orq     $4, (%rax)
        mov     (%rax), %rbx
        and     $~0xfff, %rbx
        orq     $4, (%rbx)
        mov     (%rbx), %rbx
        and     $~0xfff, %rbx
        orq     $4, 16(%rbx)
        mov     %cr3, %rax
        mov     %rax, %cr3

        /* syscall MSRs: EFER.SCE, STAR, LSTAR, SFMASK; sysenter MSRs */
        mov     $0xc0000080, %ecx
        rdmsr
        or      $1, %eax
        wrmsr
        mov     $0xc0000081, %ecx
        xor     %eax, %eax
        mov     $((0x10 << 16) | KCODE), %edx
        wrmsr
        mov     $0xc0000082, %ecx
        lea     syscall_entry(%rip), %rax
        mov     %rax, %rdx
        shr     $32, %rdx
        wrmsr
        mov     $0xc0000084, %ecx
        mov     $0x200, %eax
        xor     %edx, %edx
        wrmsr
        mov     $0x174, %ecx
        mov     $KCODE, %eax
        xor     %edx, %edx
        wrmsr
        mov     $0x175, %ecx
        lea     stack_top(%rip), %rax
        xor     %edx, %edx
        wrmsr
        mov     $0x176, %ecx
        lea     syscall_entry(%rip), %rax
        xor     %edx, %edx
        wrmsr

        /* copy the user snippets to the user page */
        lea     user_code(%rip), %rsi
        mov     $USER, %rdi
        mov     $(user_code_end - user_code), %ecx
        rep movsb

next_probe:
        lea     stack_top(%rip), %rsp
        mov     probe_index(%rip), %rax
        cmp     $3, %rax
        jae     done
        incq    probe_index(%rip)
        lea     probe_names(%rip), %rsi
        mov     (%rsi,%rax,8), %rsi
        mov     %rsi, current_name(%rip)
        /* iretq to ring 3 at USER + 16*index */
        shl     $4, %rax
        add     $USER, %rax
        pushq   $UDATA
        pushq   $(USER + 0x1000)
        pushq   $0x2
        pushq   $UCODE
        push    %rax
        mov     $0x1111, %rcx
        mov     $0x2222, %r11
        iretq

done:   lea     msg_done(%rip), %rsi
        call    puts
        mov     $0x64, %dx
        mov     $0xfe, %al
        out     %al, %dx
        hlt

/* syscall landing in ring 0 */
syscall_entry:
        lea     stack_top(%rip), %rsp
        push    %r11
        push    %rcx
        call    print_name
        lea     msg_entry(%rip), %rsi
        call    puts
        mov     %cs, %rax
        and     $3, %rax
        call    puthex
        lea     msg_rcx(%rip), %rsi
        call    puts
        pop     %rax
        call    puthex
        lea     msg_r11(%rip), %rsi
        call    puts
        pop     %rax
        call    puthex
        call    newline
        jmp     next_probe

/* exceptions: stub pushes a fake error code where the CPU gives none */
exception:      /* stack: vec, err, rip, cs, rflags, rsp, ss */
        mov     %rcx, saved_rcx(%rip)
        mov     %r11, saved_r11(%rip)
        mov     %rax, saved_rax(%rip)
        call    print_name
        lea     msg_vec(%rip), %rsi
        call    puts
        mov     0(%rsp), %rax
        call    puthex
        lea     msg_err(%rip), %rsi
        call    puts
        mov     8(%rsp), %rax
        call    puthex
        lea     msg_rip(%rip), %rsi
        call    puts
        mov     16(%rsp), %rax
        call    puthex
        lea     msg_cs(%rip), %rsi
        call    puts
        mov     24(%rsp), %rax
        call    puthex
        lea     msg_cr2(%rip), %rsi
        call    puts
        mov     %cr2, %rax
        call    puthex
        lea     msg_rcx(%rip), %rsi
        call    puts
        mov     saved_rcx(%rip), %rax
        call    puthex
        lea     msg_r11(%rip), %rsi
        call    puts
        mov     saved_r11(%rip), %rax
        call    puthex
        lea     msg_rax(%rip), %rsi
        call    puts
        mov     saved_rax(%rip), %rax
        call    puthex
        call    newline
        jmp     next_probe

print_name:
        mov     current_name(%rip), %rsi
        call    puts
        lea     msg_colon(%rip), %rsi
        jmp     puts

puts:   mov     $COM1, %dx
1:      lodsb
        test    %al, %al
        jz      2f
        out     %al, %dx
        jmp     1b
2:      ret

newline:
        mov     $COM1, %dx
        mov     $'\n', %al
        out     %al, %dx
        ret

puthex: /* rax -> "0x%x" */
        mov     %rax, %rbx
        mov     $COM1, %dx
        mov     $'0', %al
        out     %al, %dx
        mov     $'x', %al
        out     %al, %dx
        mov     $60, %cl
        xor     %edi, %edi          /* seen a non-zero digit */
1:      mov     %rbx, %rax
        shr     %cl, %rax
        and     $0xf, %eax
        test    %cl, %cl
        jz      2f
        test    %eax, %eax
        jnz     2f
        test    %edi, %edi
        jz      3f
2:      mov     $1, %edi
        cmp     $10, %al
        jb      4f
        add     $('a' - 10 - '0'), %al
4:      add     $'0', %al
        out     %al, %dx
3:      sub     $4, %cl
        jns     1b
        ret

/* 256 stubs of 16 bytes: push a zero error code unless the CPU pushes one */
        .balign 16
stubs:
        .set vec, 0
        .rept 256
        .balign 16
        .if (vec == 8) || (vec >= 10 && vec <= 14) || (vec == 17) || (vec == 21)
        pushq   $vec
        .else
        pushq   $0
        pushq   $vec
        .endif
        jmp     exception
        .set vec, vec + 1
        .endr

/* user snippets, 16 bytes apart, copied to USER */
        .balign 16
user_code:
        mov     $39, %eax           /* getpid */
        syscall
        jmp     .
        .balign 16
        mov     $20, %eax
        int     $0x80
        jmp     .
        .balign 16
        mov     $20, %eax
        sysenter
        jmp     .
        .balign 16
user_code_end:

        .data
        .balign 8
probe_index:    .quad 0
current_name:   .quad 0
saved_rcx:      .quad 0
saved_r11:      .quad 0
saved_rax:      .quad 0
probe_names:    .quad name_syscall, name_int80, name_sysenter
name_syscall:   .asciz "syscall"
name_int80:     .asciz "int80"
name_sysenter:  .asciz "sysenter"
msg_colon:      .asciz ": "
msg_entry:      .asciz "entry cpl="
msg_vec:        .asciz "vec="
msg_err:        .asciz " err="
msg_rip:        .asciz " rip="
msg_cs:         .asciz " cs="
msg_cr2:        .asciz " cr2="
msg_rcx:        .asciz " rcx="
msg_r11:        .asciz " r11="
msg_rax:        .asciz " rax="
msg_done:       .asciz "probe: done\n"

        .balign 16
gdt:    .quad 0
        .quad 0x00af9b000000ffff    /* 0x08 kernel code64 */
        .quad 0x00cf93000000ffff    /* 0x10 kernel data */
        .quad 0x00cff3000000ffff    /* 0x18 user data (DPL 3) */
        .quad 0x00affb000000ffff    /* 0x20 user code64 (DPL 3) */
gdt_tss:
        .quad 0x0000890000000067    /* 0x28 TSS, base patched at run time */
        .quad 0
gdt_end:
gdt_ptr:
        .word gdt_end - gdt - 1
        .quad gdt
idt_ptr:
        .word 256 * 16 - 1
        .quad idt

        .bss
        .balign 16
idt:    .space 256 * 16
tss:    .space 104
        .balign 16
        .space 4096
stack_top:

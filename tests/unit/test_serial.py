"""8250/16550A register behaviour as Linux's 8250 driver probes it."""
import io

from vmm.hw import serial as S


def make():
    out = io.BytesIO()
    levels = []
    return S.Serial(out, irq=levels.append), out, levels


def test_transmit_goes_to_output():
    u, out, _ = make()
    for b in b"hi\n":
        u.write(S.RBR_THR, 1, b)
    assert out.getvalue() == b"hi\n"
    assert u.read(S.LSR, 1) & (S.LSR_THRE | S.LSR_TEMT) == S.LSR_THRE | S.LSR_TEMT


def test_scratch_register_and_divisor_latch():
    u, out, _ = make()
    u.write(S.SCR, 1, 0x5A)
    assert u.read(S.SCR, 1) == 0x5A
    u.write(S.LCR, 1, S.LCR_DLAB | 3)
    u.write(S.RBR_THR, 1, 0x01)
    u.write(S.IER, 1, 0x00)
    assert (u.read(S.RBR_THR, 1), u.read(S.IER, 1)) == (0x01, 0x00)
    u.write(S.LCR, 1, 3)
    assert out.getvalue() == b""                 # divisor writes are not output
    assert u.read(S.LCR, 1) == 3


def test_iir_fifo_bits_follow_fcr():
    u, _, _ = make()
    assert u.read(S.IIR_FCR, 1) == S.IIR_NO_INT
    u.write(S.IIR_FCR, 1, S.FCR_ENABLE)
    assert u.read(S.IIR_FCR, 1) == S.IIR_NO_INT | 0xC0   # 16550A with FIFOs


def test_loopback_msr_and_data():
    # autoconfig's loopback test: MCR LOOP|OUT2|RTS... reflects in MSR.
    u, out, _ = make()
    u.write(S.MCR, 1, S.MCR_LOOP | 0x0A)
    assert u.read(S.MSR, 1) & 0xF0 == 0x90
    u.write(S.RBR_THR, 1, 0x42)
    assert u.read(S.LSR, 1) & S.LSR_DR
    assert u.read(S.RBR_THR, 1) == 0x42
    assert out.getvalue() == b""


def test_receive_raises_and_clears_rx_interrupt():
    u, _, levels = make()
    u.write(S.MCR, 1, S.MCR_OUT2)
    u.write(S.IER, 1, S.IER_RDI)
    assert levels == []
    u.receive(b"ab")
    assert levels == [True]
    assert u.read(S.IIR_FCR, 1) & 0x0F == S.IIR_RDI
    assert u.read(S.RBR_THR, 1) == ord("a")
    assert u.read(S.RBR_THR, 1) == ord("b")
    assert levels == [True, False]
    assert not u.read(S.LSR, 1) & S.LSR_DR


def test_thre_interrupt_on_enable_and_cleared_by_iir_read():
    u, _, levels = make()
    u.write(S.MCR, 1, S.MCR_OUT2)
    u.write(S.IER, 1, S.IER_THRI)
    assert levels == [True]
    assert u.read(S.IIR_FCR, 1) & 0x0F == S.IIR_THRI
    assert levels == [True, False]
    u.write(S.RBR_THR, 1, ord("x"))               # transmitter empties again
    assert levels == [True, False, True]


def test_out2_gates_the_interrupt_line():
    u, _, levels = make()
    u.write(S.MCR, 1, 0)
    u.write(S.IER, 1, S.IER_RDI)
    u.receive(b"z")
    assert levels == []


def test_rx_overrun_sets_oe_once():
    u, _, _ = make()
    u.receive(bytes(S.FIFO_SIZE + 5))
    assert u.rx_space() == 0
    assert u.read(S.LSR, 1) & S.LSR_OE
    assert not u.read(S.LSR, 1) & S.LSR_OE

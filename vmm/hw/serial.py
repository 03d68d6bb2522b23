"""8250/16550A UART at COM1 (0x3F8, IRQ 4): the register set Linux's 8250
driver probes and uses (National Semiconductor PC16550D datasheet).

Output goes to a writable binary file object; input bytes are queued by
`receive()` (from the stdin thread) and raise the RX interrupt.  The IRQ
callback takes a level (True/False): the line follows the pending-interrupt
state, as the real chip's INTR pin does.
"""
import collections
import threading

COM1_PORT, COM1_IRQ = 0x3F8, 4

# Register offsets (DLAB=0 unless noted).
RBR_THR, IER, IIR_FCR, LCR, MCR, LSR, MSR, SCR = range(8)
IER_RDI, IER_THRI, IER_RLSI, IER_MSI = 1, 2, 4, 8
IIR_NO_INT, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI = 0x01, 0x00, 0x02, 0x04, 0x06
IIR_FIFO_ENABLED = 0xC0
FCR_ENABLE, FCR_CLEAR_RX, FCR_CLEAR_TX = 1, 2, 4
LCR_DLAB = 0x80
MCR_DTR, MCR_RTS, MCR_OUT1, MCR_OUT2, MCR_LOOP = 1, 2, 4, 8, 0x10
LSR_DR, LSR_OE, LSR_THRE, LSR_TEMT = 0x01, 0x02, 0x20, 0x40
MSR_CTS, MSR_DSR, MSR_RI, MSR_DCD = 0x10, 0x20, 0x40, 0x80
FIFO_SIZE = 64


class Serial:
    def __init__(self, out, irq=lambda level: None):
        self.out = out
        self.irq = irq
        self.lock = threading.Lock()
        self.rx = collections.deque()
        self.ier = 0
        self.lcr = 0x03          # 8N1
        self.mcr = MCR_OUT2
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr = MSR_DCD | MSR_DSR | MSR_CTS
        self.scr = 0
        self.dll, self.dlm = 0x0C, 0   # 9600 baud
        self.fcr = 0
        self.thr_pending = False  # THRE interrupt armed (cleared by IIR read / THR write)
        self._level = False

    # -- bus device ----------------------------------------------------------
    def read(self, offset, size):
        with self.lock:
            value = self._read(offset)
            self._update_irq()
        return value

    def write(self, offset, size, value):
        with self.lock:
            self._write(offset, value & 0xFF)
            self._update_irq()

    def receive(self, data):
        """Queue host input for the guest (drops beyond the FIFO, counting OE)."""
        with self.lock:
            for b in data:
                if len(self.rx) >= FIFO_SIZE:
                    self.lsr |= LSR_OE
                    break
                self.rx.append(b)
            self._update_irq()

    def rx_space(self):
        with self.lock:
            return FIFO_SIZE - len(self.rx)

    # -- snapshot ------------------------------------------------------------
    _REGS = ("ier", "lcr", "mcr", "lsr", "msr", "scr", "dll", "dlm", "fcr")

    def state(self):
        """Registers, the receive FIFO and the interrupt state, as a dict."""
        with self.lock:
            st = {k: getattr(self, k) for k in self._REGS}
            st.update(rx=list(self.rx), thr_pending=self.thr_pending, level=self._level)
            return st

    def restore(self, st):
        """Load state(); a pending interrupt is raised again (the line is
        driven from scratch in the new VM)."""
        with self.lock:
            for k in self._REGS:
                setattr(self, k, int(st[k]) & 0xFF)
            self.rx = collections.deque(int(b) & 0xFF for b in st["rx"][:FIFO_SIZE])
            self.thr_pending = bool(st["thr_pending"])
            self._level = False
            self._update_irq()

    # -- registers -----------------------------------------------------------
    def _read(self, off):
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR:
            if dlab:
                return self.dll
            if self.mcr & MCR_LOOP:
                return self.rx.popleft() if self.rx else 0
            return self.rx.popleft() if self.rx else 0
        if off == IER:
            return self.dlm if dlab else self.ier
        if off == IIR_FCR:
            iir = self._iir()
            if iir == IIR_THRI:
                self.thr_pending = False   # reading IIR clears a THRE interrupt
            return iir | (IIR_FIFO_ENABLED if self.fcr & FCR_ENABLE else 0)
        if off == LCR:
            return self.lcr
        if off == MCR:
            return self.mcr
        if off == LSR:
            lsr = self.lsr | (LSR_DR if self.rx else 0)
            self.lsr &= ~LSR_OE            # error bits clear on read
            return lsr
        if off == MSR:
            if self.mcr & MCR_LOOP:
                # Loopback: DTR->DSR, RTS->CTS, OUT1->RI, OUT2->DCD.
                m = self.mcr
                return ((MSR_DSR if m & MCR_DTR else 0) | (MSR_CTS if m & MCR_RTS else 0)
                        | (MSR_RI if m & MCR_OUT1 else 0) | (MSR_DCD if m & MCR_OUT2 else 0))
            return self.msr
        return self.scr

    def _write(self, off, v):
        dlab = self.lcr & LCR_DLAB
        if off == RBR_THR:
            if dlab:
                self.dll = v
            elif self.mcr & MCR_LOOP:
                if len(self.rx) < FIFO_SIZE:
                    self.rx.append(v)
                self.thr_pending = True
            else:
                self._emit(v)
                self.thr_pending = True    # transmitter is instantly empty again
        elif off == IER:
            if dlab:
                self.dlm = v
            else:
                # Enabling THRI with an empty transmitter raises it at once.
                if v & IER_THRI and not self.ier & IER_THRI:
                    self.thr_pending = True
                self.ier = v & 0x0F
        elif off == IIR_FCR:
            if v & FCR_CLEAR_RX:
                self.rx.clear()
            self.fcr = v & ~(FCR_CLEAR_RX | FCR_CLEAR_TX)
        elif off == LCR:
            self.lcr = v
        elif off == MCR:
            self.mcr = v & 0x1F
        elif off == LSR or off == MSR:
            pass                           # read-only on a 16550
        else:
            self.scr = v

    def _iir(self):
        if self.ier & IER_RLSI and self.lsr & LSR_OE:
            return IIR_RLSI
        if self.ier & IER_RDI and self.rx:
            return IIR_RDI
        if self.ier & IER_THRI and self.thr_pending:
            return IIR_THRI
        return IIR_NO_INT

    def _update_irq(self):
        # OUT2 gates the interrupt line on PC hardware; Linux sets it.
        level = self._iir() != IIR_NO_INT and bool(self.mcr & MCR_OUT2)
        if level != self._level:
            self._level = level
            self.irq(level)

    def _emit(self, byte):
        try:
            self.out.write(bytes((byte,)))
            if byte == 0x0A:
                self.out.flush()
        except (OSError, ValueError):
            pass                           # a closed output never stops the guest

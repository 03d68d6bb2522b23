"""The part of building a VM that no configuration changes, done ahead of
time on a thread: /dev/kvm opened and its capabilities checked, the VM
created (KVM_CREATE_VM), KVM's supported CPUID read.  `pyvmm api` starts one
as soon as its socket accepts, so that InstanceStart only maps guest memory,
loads the kernel and adds the irqchip, devices and vCPUs (issue #10:
InstanceStart -> first guest instruction).  The irqchip and PIT are not made
here: the memory slot must come first (see Machine._build), and its size is
the configuration's.

    early = EarlyVm.start()         # returns at once
    kvm, vm = early.take()          # waits for the thread; raises what it raised
    early.close()                   # releases it if nobody took it (idempotent)

The thread spends its time in ioctls, which release the GIL (cffi), so it
runs beside the API and main threads.
"""
import threading


class EarlyVm:
    def __init__(self):
        self._done = threading.Event()
        self._lock = threading.Lock()
        self._kvm = self._vm = None
        self._error = None
        self._taken = self._closed = False

    @classmethod
    def start(cls, path="/dev/kvm"):
        early = cls()
        threading.Thread(target=early._build, args=(path,), name="pyvmm-early-vm",
                         daemon=True).start()
        return early

    def _build(self, path):
        kvm = vm = None
        try:
            from vmm.kvm.system import Kvm
            from vmm.kvm.vm import Vm
            kvm = Kvm(path)
            kvm.supported_cpuid()           # cached in kvm (same for every VM)
            vm = Vm(kvm)
        except BaseException as e:          # re-raised by take(), on the caller's thread
            self._error = e
            for obj in (vm, kvm):
                if obj is not None:
                    obj.close()
            kvm = vm = None
        with self._lock:
            if self._closed:                # closed while building: nobody will take it
                unwanted, kvm, vm = (vm, kvm), None, None
            else:
                unwanted = ()
            self._kvm, self._vm = kvm, vm
        for obj in unwanted:
            if obj is not None:
                obj.close()
        self._done.set()

    def take(self):
        """(Kvm, Vm), a VM without memory or devices yet; the caller owns them."""
        self._done.wait()
        with self._lock:
            if self._taken or self._closed:
                raise RuntimeError("EarlyVm already taken or closed")
            self._taken = True
            if self._error is not None:
                raise self._error
            return self._kvm, self._vm

    def close(self):
        """Release the VM unless take() handed it out."""
        with self._lock:
            self._closed = True
            if self._taken or not self._done.is_set():
                return                      # the builder closes it when it finishes
            kvm, vm, self._kvm, self._vm = self._kvm, self._vm, None, None
        for obj in (vm, kvm):
            if obj is not None:
                obj.close()

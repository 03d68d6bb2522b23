"""virtio-net end to end, on each transport, from the session snapshot
(conftest.py): the guest's eth0 (virtio-mmio, configured by `ip=` at boot),
eth1 (legacy virtio-pci) and eth2 (modern virtio-pci with MSI-X and two
queue pairs), both configured at its shell, answer ping from a
private network namespace through their taps, after a restore in a new VMM
process (the guest kernel answers ARP and ICMP itself, so both directions of
each device are exercised).  The VMM runs inside the namespace; nothing
leaves it, and it is deleted on every outcome.  A tap the VMM created is
gone after it exits."""
import pytest

from vmm.machine import STATUS
from vmm.testing.netns import ping

from conftest import NICS

pytestmark = [pytest.mark.integration, pytest.mark.usefixtures("needs_kvm")]


@pytest.mark.parametrize("transport", ["mmio", "pci-legacy", "pci"])
def test_ping_guest_through_tap(transport, restored, guest_snapshot):
    if not guest_snapshot.has_net:
        pytest.skip("needs root and iproute2 for a network namespace")
    nic = NICS[transport]
    r = restored()
    r.cmd("echo ready-$((3+4))", "ready-7")
    rtts = r.ns.call(ping, nic["guest"], 5, 5.0)
    print(f"ping {nic['guest']} ({transport}): {len(rtts)}/5 replies, rtt ms: "
          + ", ".join(f"{x * 1000:.1f}" for x in rtts))
    assert len(rtts) >= 3, f"{len(rtts)}/5 ping replies"
    arp = r.ns.ip("neigh", "show", "dev", nic["tap"])
    assert nic["mac"] in arp, arp
    rc, err = r.stop()
    assert rc == STATUS["signal"], err
    assert not r.ns.ip("link", "show", nic["tap"], check=False)   # the tap we created is gone

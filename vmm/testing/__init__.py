"""Test and benchmark helpers, not part of the VMM proper (the way rust-vmm
keeps its mocks out of the product): the mock virtio driver, a mock network
peer, network-namespace helpers and tiny ring-0 guests.  Nothing under vmm/
outside this package imports it."""

"""A QEMU-integrated virtualization test lab for virtio storage."""

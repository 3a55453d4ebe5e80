"""The Xen lab: Debian's Xen 4.17 under QEMU TCG, a busybox dom0 and DomUs to inspect.

vmishell was designed to read a Xen DomU's memory from dom0. This package
builds such a host from Debian packages (nothing is installed on the host),
boots it as a lab instance, runs commands in dom0 (`exec`) and starts DomUs
from the lab's own kernels and initramfs, whose ground truth reaches the host
through their console logs. Modules, each with one job:

    packages   which Debian packages make the hypervisor, toolstack and device model
    dom0fs     the dom0 initramfs: busybox, toolstack files, kernel modules, /init
    image      the cached build: xen, dom0 kernel, dom0 initramfs, manifest.json
    agent      the host end of the command channel into dom0 (a virtio-serial port)
    host       the QEMU command line and lifecycle of a Xen host instance
    domu       DomU configurations, creation, consoles and ground truth
    cli        `vmishell lab up xen`, `lab exec`, `lab xen create|list|console|destroy`
"""

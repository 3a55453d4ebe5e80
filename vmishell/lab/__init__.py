"""The built-in lab: QEMU guests built from Debian packages, and the `lab:NAME` target."""

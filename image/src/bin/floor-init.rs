//! The floor of the boot-time figures: a trivial /init that prints one line and powers the
//! machine off. Booted on the same kernel as the service images, the time QEMU takes to show
//! its line is what the kernel alone costs; a service's ready line can only come later.

fn main() {
    eprintln!("floor-init: /init reached");
    nix::unistd::sync();
    let e = nix::sys::reboot::reboot(nix::sys::reboot::RebootMode::RB_POWER_OFF);
    eprintln!("floor-init: power off failed: {e:?}");
}

//! Ports for the child processes the tests start.

/// A port for a child process to listen on. It is free when handed out, but the child binds it
/// later: a port the kernel picked (`bind(0)`) comes from the ephemeral range, where any outgoing
/// connection of the tests running beside (heartbeats open one per beat) can take it meanwhile, and
/// the child then fails to start ("controller.sock did not open", "node-2 did not register"). So
/// ports come from below that range (10000-32767; Linux's default range starts at 32768), each
/// handed out once per test binary, from an offset of its own per process, and checked free.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    const FIRST: u32 = 10_000;
    const COUNT: u32 = 32_768 - FIRST;
    static NEXT: AtomicU32 = AtomicU32::new(0);
    let offset = std::process::id().wrapping_mul(2_654_435_761) % COUNT;
    for _ in 0..COUNT {
        let port = (FIRST + (offset + NEXT.fetch_add(1, Ordering::SeqCst)) % COUNT) as u16;
        // One at a time: a listener on 127.0.0.1 would keep 0.0.0.0 from binding the same port.
        let loopback = std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
        if loopback && std::net::TcpListener::bind(("0.0.0.0", port)).is_ok() {
            return port;
        }
    }
    panic!("no free port in {FIRST}..32768");
}

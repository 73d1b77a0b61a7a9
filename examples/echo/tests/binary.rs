//! The `weft-echo` binary as the lab's pod runner starts it: configured by
//! flags and the Downward-API environment, serving until SIGTERM, then
//! exiting cleanly.

use std::io::{Read, Write};
use std::time::{Duration, Instant};

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

#[test]
fn serves_what_it_is_told_and_stops_on_sigterm() {
    let port = free_port();
    let mut child = std::process::Command::new(env!("CARGO_BIN_EXE_weft-echo"))
        .args([
            "--http",
            &format!("127.0.0.1:{port}"),
            "--grpc",
            "",
            "--tcp",
            "",
        ])
        .env("CLUSTER_ID", "c9")
        .env("POD_NAME", "echo-test")
        .env("APP_VERSION", "v7")
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut conn = loop {
        match std::net::TcpStream::connect(("127.0.0.1", port)) {
            Ok(conn) => break conn,
            Err(_) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Err(err) => panic!("weft-echo never listened: {err}"),
        }
    };
    conn.write_all(b"GET /hello HTTP/1.1\r\nhost: x\r\nconnection: close\r\n\r\n")
        .unwrap();
    let mut out = String::new();
    conn.read_to_string(&mut out).unwrap();
    let body = out.split("\r\n\r\n").nth(1).unwrap_or_default();
    let fields = weft_echo::parse_report(body);
    assert_eq!(fields["cluster"], "c9");
    assert_eq!(fields["pod"], "echo-test");
    assert_eq!(fields["version"], "v7");
    assert_eq!(fields["path"], "/hello");
    assert_eq!(fields["peer"], "-", "no sidecar, no identity");

    // SAFETY: kill(2) on the child we started.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let deadline = Instant::now() + Duration::from_secs(10);
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "weft-echo ignored SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{status}");
}

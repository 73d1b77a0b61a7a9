//! Lays out the sidecar's executable: the functions that run in a
//! sidecar's life, as listed in `code-order.txt`, are linked first and
//! together, so that the kernel's 64 KiB fault-around maps them and not
//! the cold code around them (perf/README.md, "Code layout").
//!
//! Only release builds for x86-64 Linux, whose linker is rust-lld (the
//! toolchain's default there since 1.90), which reads the file; names it
//! does not find (functions renamed or gone since the file was made) are
//! skipped without a warning.

use std::path::Path;

fn main() {
    println!("cargo::rustc-check-cfg=cfg(weft_code_trace)");
    println!("cargo::rerun-if-changed=code-order.txt");
    let release = std::env::var("PROFILE").is_ok_and(|p| p == "release");
    let target = std::env::var("TARGET").unwrap_or_default();
    let order =
        Path::new(&std::env::var("CARGO_MANIFEST_DIR").unwrap_or_default()).join("code-order.txt");
    if release && target == "x86_64-unknown-linux-gnu" && order.exists() {
        println!(
            "cargo::rustc-link-arg-bin=weft-proxy=-Wl,--symbol-ordering-file={}",
            order.display()
        );
        println!("cargo::rustc-link-arg-bin=weft-proxy=-Wl,--no-warn-symbol-ordering");
    }
}

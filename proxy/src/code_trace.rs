//! Which functions run: a build for laying out the executable, never
//! shipped. Built with `--cfg weft_code_trace` and LLVM's
//! SanitizerCoverage at function level (`-C passes=sancov-module -C
//! llvm-args=-sanitizer-coverage-level=1 -C
//! llvm-args=-sanitizer-coverage-trace-pc`), every instrumented function
//! calls `__sanitizer_cov_trace_pc` on entry; the first call from each
//! function appends its return address, relative to
//! `__sanitizer_record_pc`, to `/tmp/weft-code-trace.<pid>` (8 bytes,
//! little endian). `perf/code-order.sh` turns those into the linker's
//! symbol order. The `__sanitizer_` prefix keeps LLVM from instrumenting
//! these functions themselves, and nothing here calls Rust code that is
//! (formatting, std's generics): a call back into the tracer is dropped.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};

const SLOTS: usize = 1 << 18;
static SEEN: [AtomicUsize; SLOTS] = [const { AtomicUsize::new(0) }; SLOTS];
static BUSY: AtomicBool = AtomicBool::new(false);
static FD: AtomicI32 = AtomicI32::new(-1);

core::arch::global_asm!(
    ".globl __sanitizer_cov_trace_pc",
    "__sanitizer_cov_trace_pc:",
    "mov rdi, [rsp]",
    "jmp {record}",
    record = sym __sanitizer_record_pc,
);

#[unsafe(no_mangle)]
pub extern "C" fn __sanitizer_record_pc(pc: usize) {
    if BUSY.swap(true, Ordering::Acquire) {
        return;
    }
    let mut slot = (pc.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 46) & (SLOTS - 1);
    for _ in 0..64 {
        match SEEN[slot].compare_exchange(0, pc, Ordering::Relaxed, Ordering::Relaxed) {
            Ok(_) => {
                __sanitizer_write_pc(pc);
                break;
            }
            Err(found) if found == pc => break,
            Err(_) => slot = (slot + 1) & (SLOTS - 1),
        }
    }
    BUSY.store(false, Ordering::Release);
}

#[unsafe(no_mangle)]
extern "C" fn __sanitizer_write_pc(pc: usize) {
    let mut fd = FD.load(Ordering::Relaxed);
    if fd < 0 {
        let mut path = [0u8; 256];
        let base = b"/tmp/weft-code-trace.";
        path[..base.len()].copy_from_slice(base);
        // The pid in decimal, by hand: nothing here may call formatting
        // code, which is instrumented.
        // SAFETY: getpid has no preconditions.
        let mut pid = unsafe { libc::getpid() } as u32;
        let mut digits = [0u8; 10];
        let mut n = 0;
        loop {
            digits[n] = b'0' + (pid % 10) as u8;
            n += 1;
            pid /= 10;
            if pid == 0 {
                break;
            }
        }
        for i in 0..n {
            path[base.len() + i] = digits[n - 1 - i];
        }
        // SAFETY: `path` is NUL-terminated (zero-filled past the digits).
        fd = unsafe {
            libc::open(
                path.as_ptr().cast(),
                libc::O_WRONLY | libc::O_CREAT | libc::O_APPEND,
                0o644,
            )
        };
        FD.store(fd, Ordering::Relaxed);
    }
    if fd >= 0 {
        let offset = (pc as i64).wrapping_sub(__sanitizer_record_pc as *const () as usize as i64);
        let bytes = offset.to_le_bytes();
        // SAFETY: writes 8 bytes from a live buffer.
        unsafe {
            libc::write(fd, bytes.as_ptr().cast(), bytes.len());
        }
    }
}

//! The sidecar's code layout: which functions a sidecar runs, from the
//! traces a `--cfg weft_code_trace` build writes (`proxy/src/code_trace.rs`),
//! as the symbol order the linker follows (`proxy/code-order.txt`,
//! read by `proxy/build.rs`).
//!
//! Each trace is the return addresses of the first call into each
//! function, 8 bytes each, relative to `__sanitizer_record_pc`; the
//! executable's symbol table (from `nm`) turns them into names. Functions
//! come out in the order they first ran, the traces taken one after the
//! other: start-up's together, then serving's.
//!
//! Code built without the instrumentation (glibc, the standard library's
//! precompiled functions, ring's assembly) leaves no trace entries. With
//! the disk's read-ahead off and the executable evicted before the run
//! (`perf/code-order.sh`), the page cache holds only its pages that ran,
//! so such functions on a cached page follow the traced ones
//! (`--touched`): laid out together, rather than each keeping a 64 KiB
//! window of cold code resident where it falls.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The symbol every trace entry is relative to.
const REFERENCE: &str = "__sanitizer_record_pc";
/// The page size `mincore` reports in.
const PAGE: u64 = 4096;

/// A function in the executable.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Function {
    pub address: u64,
    pub size: u64,
    pub name: String,
}

/// The functions in `nm -n -S --defined-only` output, by address.
pub fn functions(nm: &str) -> Vec<Function> {
    let mut found: Vec<Function> = nm
        .lines()
        .filter_map(|line| {
            let mut fields = line.split_ascii_whitespace();
            let address = u64::from_str_radix(fields.next()?, 16).ok()?;
            let size = u64::from_str_radix(fields.next()?, 16).ok()?;
            let kind = fields.next()?;
            let name = fields.next()?;
            matches!(kind, "t" | "T" | "w" | "W").then(|| Function {
                address,
                size,
                name: name.to_string(),
            })
        })
        .collect();
    found.sort_by_key(|f| f.address);
    found
}

/// The names of the functions the traces entered, each once, in the
/// order first met; and how many entries fell in no function.
pub fn order(functions: &[Function], traces: &[Vec<u8>]) -> Result<(Vec<String>, usize)> {
    let Some(reference) = functions.iter().find(|f| f.name == REFERENCE) else {
        bail!("the executable has no `{REFERENCE}`: not a `--cfg weft_code_trace` build");
    };
    let mut seen = HashSet::new();
    let mut names = Vec::new();
    let mut unplaced = 0;
    for trace in traces {
        for entry in trace.chunks_exact(8) {
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(entry);
            let address = reference
                .address
                .wrapping_add_signed(i64::from_le_bytes(bytes));
            let at = functions.partition_point(|f| f.address <= address);
            match at.checked_sub(1).map(|i| &functions[i]) {
                Some(f) if address < f.address + f.size.max(1) => {
                    if seen.insert(f.name.as_str()) {
                        names.push(f.name.clone());
                    }
                }
                _ => unplaced += 1,
            }
        }
    }
    Ok((names, unplaced))
}

/// A function's name without the `.<n>` LTO gives a local copy, which
/// numbers its copies differently in each build.
fn without_copy_number(name: &str) -> &str {
    match name.rsplit_once('.') {
        Some((base, n)) if !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()) => base,
        _ => name,
    }
}

/// `names` as the shipped build spells them: a name it has is kept; a
/// local copy it numbers differently (`f.123` for the traced build's
/// `f.456`) becomes each of its copies of that function.
pub fn as_shipped(names: Vec<String>, shipped: &[Function]) -> Vec<String> {
    let has: HashSet<&str> = shipped.iter().map(|f| f.name.as_str()).collect();
    let mut copies: std::collections::HashMap<&str, Vec<&str>> = Default::default();
    for f in shipped {
        copies
            .entry(without_copy_number(&f.name))
            .or_default()
            .push(&f.name);
    }
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for name in names {
        let spelled: Vec<String> = if has.contains(name.as_str()) {
            vec![name]
        } else {
            copies
                .get(without_copy_number(&name))
                .map(|c| c.iter().map(|s| s.to_string()).collect())
                .unwrap_or_default()
        };
        for name in spelled {
            if seen.insert(name.clone()) {
                out.push(name);
            }
        }
    }
    out
}

/// Where the executable's code segment lies in its file.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CodeSegment {
    pub offset: u64,
    pub address: u64,
    pub size: u64,
}

/// The executable `LOAD` segment in `objdump -p` output.
pub fn code_segment(headers: &str) -> Option<CodeSegment> {
    let lines: Vec<&str> = headers.lines().collect();
    lines.windows(2).find_map(|pair| {
        let first: Vec<&str> = pair[0].split_ascii_whitespace().collect();
        let second: Vec<&str> = pair[1].split_ascii_whitespace().collect();
        let field = |fields: &[&str], key: &str| -> Option<u64> {
            let at = fields.iter().position(|f| *f == key)?;
            u64::from_str_radix(fields.get(at + 1)?.trim_start_matches("0x"), 16).ok()
        };
        if first.first() != Some(&"LOAD") || !second.last()?.contains('x') {
            return None;
        }
        Some(CodeSegment {
            offset: field(&first, "off")?,
            address: field(&first, "vaddr")?,
            size: field(&second, "filesz")?,
        })
    })
}

/// The names of the functions that call the coverage hook, in `objdump
/// -d` output: the ones the traces can see.
pub fn instrumented(disassembly: &str) -> HashSet<String> {
    let mut found = HashSet::new();
    let mut current: Option<&str> = None;
    for line in disassembly.lines() {
        if let Some(name) = line
            .strip_suffix(">:")
            .and_then(|head| head.split_once(" <"))
            .map(|(_, name)| name)
        {
            current = Some(name);
        } else if let Some(name) = current
            && line.contains("call")
            && line.contains("<__sanitizer_cov_trace_pc>")
        {
            found.insert(name.to_string());
            current = None;
        }
    }
    found
}

/// The functions the traces cannot see that lie, at least in part, on a
/// page of the code segment that `touched` (one flag per page of the
/// file) says ran; by address.
pub fn touched_uninstrumented(
    functions: &[Function],
    instrumented: &HashSet<String>,
    segment: CodeSegment,
    touched: &[bool],
) -> Vec<String> {
    functions
        .iter()
        .filter(|f| {
            f.size > 0
                && !f.name.starts_with("__sanitizer_")
                && !instrumented.contains(&f.name)
                && f.address >= segment.address
                && f.address + f.size <= segment.address + segment.size
        })
        .filter(|f| {
            let first = (f.address - segment.address + segment.offset) / PAGE;
            let last = (f.address + f.size - 1 - segment.address + segment.offset) / PAGE;
            (first..=last).any(|page| touched.get(page as usize) == Some(&true))
        })
        .map(|f| f.name.clone())
        .collect()
}

/// Which pages of `file` are in the page cache (`mincore`), one flag per
/// `PAGE`.
fn cached_pages(file: &Path) -> Result<Vec<bool>> {
    use std::os::fd::AsRawFd;
    let opened =
        std::fs::File::open(file).with_context(|| format!("opening {}", file.display()))?;
    let len = opened.metadata()?.len() as usize;
    if len == 0 {
        return Ok(Vec::new());
    }
    // SAFETY: a fresh read-only shared mapping of an open file, unmapped
    // below; mincore reads no page of it, so nothing is faulted in.
    unsafe {
        let map = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ,
            libc::MAP_SHARED,
            opened.as_raw_fd(),
            0,
        );
        if map == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error()).context("mapping the traced executable");
        }
        let mut flags = vec![0u8; len.div_ceil(PAGE as usize)];
        let done = libc::mincore(map, len, flags.as_mut_ptr());
        let err = std::io::Error::last_os_error();
        libc::munmap(map, len);
        if done != 0 {
            return Err(err).context("mincore on the traced executable");
        }
        Ok(flags.iter().map(|f| f & 1 == 1).collect())
    }
}

/// The output of `tool args... binary`.
fn binutils(tool: &str, args: &[&str], binary: &Path) -> Result<String> {
    let run = std::process::Command::new(tool)
        .args(args)
        .arg(binary)
        .output()
        .with_context(|| format!("running {tool} (binutils)"))?;
    if !run.status.success() {
        bail!(
            "{tool} {}: {}",
            binary.display(),
            String::from_utf8_lossy(&run.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&run.stdout).into_owned())
}

/// The functions in `binary`'s symbol table.
fn read_functions(binary: &Path) -> Result<Vec<Function>> {
    Ok(functions(&binutils(
        "nm",
        &["-n", "-S", "--defined-only"],
        binary,
    )?))
}

/// Writes the order of the functions `traces` entered in `binary` to
/// `out`, spelled as `shipped` (the build the order is for) names them;
/// then, with `touched` (the copy of `binary` the traced sidecars ran),
/// the uninstrumented functions on the pages that ran.
pub fn run(
    binary: &Path,
    shipped: &Path,
    traces: &[PathBuf],
    touched: Option<&Path>,
    out: &Path,
) -> Result<()> {
    // Before anything reads the executable: reading it would cache it.
    let cached = touched.map(cached_pages).transpose()?;
    let functions = read_functions(binary)?;
    let mut read = Vec::new();
    for path in traces {
        read.push(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    }
    let (mut names, unplaced) = order(&functions, &read)?;
    if names.is_empty() {
        bail!("the traces name no function");
    }
    let traced = names.len();
    if let Some(cached) = cached {
        let segment = code_segment(&binutils("objdump", &["-p"], binary)?)
            .context("the traced executable has no executable LOAD segment")?;
        let instrumented =
            instrumented(&binutils("objdump", &["-d", "--no-show-raw-insn"], binary)?);
        let pages = cached.iter().filter(|c| **c).count();
        // Disjoint from the traced names, which call the hook; an alias
        // met twice is dropped by `as_shipped`.
        let more = touched_uninstrumented(&functions, &instrumented, segment, &cached);
        eprintln!(
            "{pages} pages of the executable cached; {} uninstrumented functions on those of its code",
            more.len()
        );
        names.extend(more);
    }
    let names = as_shipped(names, &read_functions(shipped)?);
    eprintln!(
        "{traced} functions traced, {} in all named in the shipped build",
        names.len()
    );
    let mut text = names.join("\n");
    text.push('\n');
    std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
    eprintln!(
        "{} functions of {} in {} ({unplaced} trace entries in no function)",
        names.len(),
        functions.len(),
        out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    const NM: &str = "\
0000000000001000 0000000000000040 T main
0000000000001040 0000000000000020 t __sanitizer_record_pc
0000000000001060 0000000000000100 t _ZN10weft_proxy8outbound4send17h0123456789abcdefE
0000000000001160 0000000000000080 W _ZN4core3ptr13drop_in_place17hfedcba9876543210E
0000000000002000 0000000000000010 D some_data
";

    fn entry(offset: i64) -> Vec<u8> {
        offset.to_le_bytes().to_vec()
    }

    #[test]
    fn only_functions_are_read_from_nm() {
        let found = functions(NM);
        assert_eq!(found.len(), 4);
        assert!(found.iter().all(|f| f.name != "some_data"));
        assert_eq!(found[2].address, 0x1060);
        assert_eq!(found[2].size, 0x100);
    }

    #[test]
    fn entries_become_names_in_the_order_first_met() {
        let found = functions(NM);
        // Relative to __sanitizer_record_pc at 0x1040: 0x1170 is in
        // drop_in_place, 0x1065 in send, 0x1001 in main, 0x3000 in none.
        let first: Vec<u8> = [entry(0x130), entry(0x25), entry(0x130)].concat();
        let second: Vec<u8> = [entry(0x25), entry(-0x3f), entry(0x1fc0)].concat();
        let (names, unplaced) = order(&found, &[first, second]).unwrap();
        assert_eq!(
            names,
            vec![
                "_ZN4core3ptr13drop_in_place17hfedcba9876543210E",
                "_ZN10weft_proxy8outbound4send17h0123456789abcdefE",
                "main",
            ]
        );
        assert_eq!(unplaced, 1);
    }

    #[test]
    fn names_are_spelled_as_the_shipped_build_spells_them() {
        let shipped = functions(
            "\
0000000000001000 0000000000000040 T main
0000000000001040 0000000000000020 t _ZN4http6header3map5clone17h0000000000000001E.77
0000000000001060 0000000000000020 t _ZN4http6header3map5clone17h0000000000000001E.78
0000000000001080 0000000000000020 t _ZN5bytes5bytes12static_clone17h0000000000000002E
",
        );
        let traced = vec![
            "main".to_string(),
            // Numbered differently by this build's LTO: both shipped copies.
            "_ZN4http6header3map5clone17h0000000000000001E.5".to_string(),
            "_ZN5bytes5bytes12static_clone17h0000000000000002E".to_string(),
            // Not in the shipped build at all.
            "_ZN10weft_proxy4gone17h0000000000000003E".to_string(),
            "main".to_string(),
        ];
        assert_eq!(
            as_shipped(traced, &shipped),
            vec![
                "main",
                "_ZN4http6header3map5clone17h0000000000000001E.77",
                "_ZN4http6header3map5clone17h0000000000000001E.78",
                "_ZN5bytes5bytes12static_clone17h0000000000000002E",
            ]
        );
    }

    #[test]
    fn the_code_segment_is_the_executable_load() {
        let headers = "\
    PHDR off    0x0000000000000040 vaddr 0x0000000000000040 paddr 0x0000000000000040 align 2**3
         filesz 0x0000000000000268 memsz 0x0000000000000268 flags r--
    LOAD off    0x0000000000000000 vaddr 0x0000000000000000 paddr 0x0000000000000000 align 2**12
         filesz 0x0000000000169744 memsz 0x0000000000169744 flags r--
    LOAD off    0x0000000000169780 vaddr 0x000000000016a780 paddr 0x000000000016a780 align 2**12
         filesz 0x0000000000552cc0 memsz 0x0000000000552cc0 flags r-x
    LOAD off    0x00000000006bc440 vaddr 0x00000000006be440 paddr 0x00000000006be440 align 2**12
         filesz 0x000000000002a568 memsz 0x000000000002abc0 flags rw-
";
        assert_eq!(
            code_segment(headers),
            Some(CodeSegment {
                offset: 0x169780,
                address: 0x16a780,
                size: 0x552cc0
            })
        );
        assert_eq!(
            code_segment("    LOAD off 0x0 vaddr 0x0\n  filesz 0x10 flags r--\n"),
            None
        );
    }

    #[test]
    fn instrumented_functions_call_the_coverage_hook() {
        let disassembly = "\
0000000000001060 <_ZN10weft_proxy8outbound4send17h0123456789abcdefE>:
    1060:\tpush   %rbx
    1061:\tcall   1040 <__sanitizer_cov_trace_pc>
    1066:\tpop    %rbx

0000000000001160 <memcpy>:
    1160:\tmov    %rdi,%rax
    1163:\tcall   1060 <_ZN10weft_proxy8outbound4send17h0123456789abcdefE>
    1168:\tret
";
        let found = instrumented(disassembly);
        assert_eq!(
            found,
            HashSet::from(["_ZN10weft_proxy8outbound4send17h0123456789abcdefE".to_string()])
        );
    }

    #[test]
    fn uninstrumented_functions_on_pages_that_ran_follow() {
        // Code at file offset 0x1000, addresses from 0x2000: page 1 of the
        // file holds 0x2000..0x3000, page 2 0x3000..0x4000, page 3 the rest.
        let segment = CodeSegment {
            offset: 0x1000,
            address: 0x2000,
            size: 0x3000,
        };
        let f = |address, size, name: &str| Function {
            address,
            size,
            name: name.to_string(),
        };
        let functions = vec![
            f(0x2000, 0x100, "traced_one"),
            f(0x2100, 0x100, "memcpy"),
            f(0x2f80, 0x100, "straddles"),
            f(0x3100, 0x100, "cold_c"),
            f(0x4100, 0x100, "malloc"),
            f(0x4200, 0, "marker"),
            f(0x4300, 0x20, "__sanitizer_record_pc"),
        ];
        let instrumented = HashSet::from(["traced_one".to_string()]);
        // Pages 1 and 3 ran; 2 did not.
        let touched = [false, true, false, true];
        assert_eq!(
            touched_uninstrumented(&functions, &instrumented, segment, &touched),
            vec!["memcpy", "straddles", "malloc"]
        );
    }

    #[test]
    fn an_uninstrumented_executable_is_refused() {
        let found = functions("0000000000001000 0000000000000040 T main\n");
        let err = order(&found, &[entry(0)]).unwrap_err();
        assert!(err.to_string().contains("weft_code_trace"), "{err}");
    }
}

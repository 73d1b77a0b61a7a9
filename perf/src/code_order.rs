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

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result, bail};

/// The symbol every trace entry is relative to.
const REFERENCE: &str = "__sanitizer_record_pc";

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

/// The functions in `binary`'s symbol table.
fn read_functions(binary: &Path) -> Result<Vec<Function>> {
    let nm = std::process::Command::new("nm")
        .args(["-n", "-S", "--defined-only"])
        .arg(binary)
        .output()
        .context("running nm (binutils)")?;
    if !nm.status.success() {
        bail!(
            "nm {}: {}",
            binary.display(),
            String::from_utf8_lossy(&nm.stderr)
        );
    }
    Ok(functions(&String::from_utf8_lossy(&nm.stdout)))
}

/// Writes the order of the functions `traces` entered in `binary` to
/// `out`, spelled as `shipped` (the build the order is for) names them.
pub fn run(binary: &Path, shipped: &Path, traces: &[PathBuf], out: &Path) -> Result<()> {
    let functions = read_functions(binary)?;
    let mut read = Vec::new();
    for path in traces {
        read.push(std::fs::read(path).with_context(|| format!("reading {}", path.display()))?);
    }
    let (names, unplaced) = order(&functions, &read)?;
    if names.is_empty() {
        bail!("the traces name no function");
    }
    let traced = names.len();
    let names = as_shipped(names, &read_functions(shipped)?);
    eprintln!(
        "{traced} functions traced, {} named in the shipped build",
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
    fn an_uninstrumented_executable_is_refused() {
        let found = functions("0000000000001000 0000000000000040 T main\n");
        let err = order(&found, &[entry(0)]).unwrap_err();
        assert!(err.to_string().contains("weft_code_trace"), "{err}");
    }
}

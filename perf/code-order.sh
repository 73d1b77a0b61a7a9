#!/usr/bin/env bash
# Regenerates proxy/code-order.txt, the order in which the sidecar's
# functions are linked (perf/README.md, "Code layout"): builds weft-proxy
# with every function's entry traced (`--cfg weft_code_trace` and LLVM's
# SanitizerCoverage), runs the bench's scenarios through it, and lists the
# functions that ran. Run it after changes that add or rename many of the
# sidecar's functions, or a dependency upgrade; then `cargo dist` again.
# Needs what the bench needs, and nm and objdump (binutils). About 15
# minutes.
set -euo pipefail
cd "$(dirname "$0")/.."

host=$(rustc -vV | sed -n 's/^host: //p')
dist=target/$host/dist
traced=target/code-trace

# The dist alias's flags (.cargo/config.toml), and the tracing.
export RUSTFLAGS="-C target-feature=+crt-static -C link-arg=-Wl,-z,pack-relative-relocs -C llvm-args=-inline-threshold=100 --cfg weft_code_trace -C passes=sancov-module -C llvm-args=-sanitizer-coverage-level=1 -C llvm-args=-sanitizer-coverage-trace-pc"
CARGO_TARGET_DIR=$traced cargo build --profile dist --target "$host" -p weft-proxy
unset RUSTFLAGS
# The sidecar alone, as its image is built (perf/README.md), then the rest.
cargo dist -p weft-proxy
cargo dist -p weft-perf -p weft-control -p weft-echo

shipped=$(mktemp)
cp "$dist/weft-proxy" "$shipped"
# Code built without the instrumentation (glibc, the standard library's
# precompiled functions, ring's assembly) leaves no trace; the page cache
# shows it instead. With the disk's read-ahead off (the kernel reads ahead
# on an executable's page faults whatever the process advises), each
# fault reads the one page it needs, so once the copy the bench runs is
# evicted, its cached pages are the ones that ran.
dev=$(stat -c '%Hd:%Ld' "$dist/weft-proxy")
ahead=/sys/dev/block/$dev/queue/read_ahead_kb
[ -e "$ahead" ] || ahead=/sys/dev/block/$dev/../queue/read_ahead_kb
was=$(cat "$ahead" 2>/dev/null || true)
restore() {
    cp "$shipped" "$dist/weft-proxy"
    rm -f "$shipped"
    if [ -n "$was" ]; then echo "$was" > "$ahead"; fi
}
trap restore EXIT
cp "$traced/$host/dist/weft-proxy" "$dist/weft-proxy"
touched=()
if [ -n "$was" ] && echo 0 2> /dev/null > "$ahead"; then
    sync "$dist/weft-proxy"
    dd if="$dist/weft-proxy" iflag=nocache count=0 status=none
    touched=(--touched "$dist/weft-proxy")
else
    was=
    echo "code-order: cannot turn read-ahead off ($ahead): only traced functions are ordered" >&2
fi
rm -f /tmp/weft-code-trace.*
"$dist/weft-perf" --no-write bench --no-baselines --authz-pairs 1 --route-pairs 1 --rates 1000 --duration 5 > /dev/null
if [ -n "$was" ]; then echo "$was" > "$ahead"; fi
# Lower process ids first: the bench starts the client sidecar before the
# others, so its start-up and serving lead the order.
mapfile -t traces < <(ls /tmp/weft-code-trace.* | sort -t. -k2 -n)
"$dist/weft-perf" code-order --binary "$traced/$host/dist/weft-proxy" --shipped "$shipped" \
    "${touched[@]}" --out proxy/code-order.txt "${traces[@]}"
rm -f /tmp/weft-code-trace.*

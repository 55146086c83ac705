//! Embeds the eBPF object that `cargo xtask build` compiled, named by
//! `TCPWATCH_BPF_OBJECT`. A plain `cargo build` (no BPF toolchain) embeds
//! nothing, and the binary then says how to build it properly.

use std::{env, fs, path::PathBuf};

fn main() {
    println!("cargo:rerun-if-env-changed=TCPWATCH_BPF_OBJECT");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let dest = out.join("tcpwatch.bpf.o");
    match env::var_os("TCPWATCH_BPF_OBJECT") {
        Some(src) => {
            let src = PathBuf::from(src);
            println!("cargo:rerun-if-changed={}", src.display());
            if let Err(e) = fs::copy(&src, &dest) {
                panic!("TCPWATCH_BPF_OBJECT={}: {e}", src.display());
            }
        }
        None => {
            fs::write(&dest, []).expect("write empty eBPF object placeholder");
        }
    }
}

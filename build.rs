//! Generates the gRPC types from `proto/` with a vendored `protoc`, so building needs nothing
//! installed beyond the Rust toolchain. Also writes the descriptor set that server reflection
//! serves, and records the git revision for `--version`.

use std::{env, path::PathBuf, process::Command};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let protoc = protoc_bin_vendored::protoc_bin_path()?;
    // SAFETY: build scripts are single-threaded; nothing else reads the environment concurrently.
    unsafe { env::set_var("PROTOC", protoc) };

    let out_dir = PathBuf::from(env::var("OUT_DIR")?);
    tonic_prost_build::configure()
        // Malformed request messages answer INVALID_ARGUMENT (src/api/codec.rs).
        .codec_path("crate::api::codec::Codec")
        .file_descriptor_set_path(out_dir.join("tokenbroker_descriptor.bin"))
        .compile_protos(&["proto/tokenbroker/v1/token_broker.proto"], &["proto"])?;
    println!("cargo:rerun-if-changed=proto");

    // The revision built, for `token-broker --version`; "unknown" outside a git checkout (a
    // container build copies no .git).
    let revision = Command::new("git")
        .args(["rev-parse", "--short=12", "HEAD"])
        .output()
        .ok()
        .filter(|output| output.status.success())
        .and_then(|output| String::from_utf8(output.stdout).ok())
        .map(|text| text.trim().to_string())
        .filter(|text| !text.is_empty())
        .unwrap_or_else(|| "unknown".to_string());
    println!("cargo:rustc-env=BUILD_GIT_REVISION={revision}");
    for path in [".git/HEAD", ".git/refs/heads", ".git/packed-refs"] {
        if std::path::Path::new(path).exists() {
            println!("cargo:rerun-if-changed={path}");
        }
    }
    Ok(())
}

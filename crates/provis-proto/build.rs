//! Generates the Rust types of `proto/` at build time with a protoc the build
//! brings itself (`protoc-bin-vendored`), so a fresh machine needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../../proto");
    let files = [
        root.join("provis/v1/call.proto"),
        root.join("provis/v1/minion.proto"),
        root.join("provis/v1/bundle.proto"),
    ];
    for file in &files {
        println!("cargo:rerun-if-changed={}", file.display());
    }
    let mut config = prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    tonic_prost_build::configure().compile_with_config(config, &files, &[root])?;
    Ok(())
}

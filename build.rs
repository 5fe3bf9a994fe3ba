//! Build script: compiles the gRPC API (proto/) with the vendored protoc, so building needs no
//! system protoc, and writes the file descriptor set that server reflection serves.

use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Rebuild when a migration is added: sqlx::migrate! embeds the directory.
    println!("cargo:rerun-if-changed=migrations");
    println!("cargo:rerun-if-changed=proto");
    let out_dir = PathBuf::from(std::env::var("OUT_DIR")?);
    let mut config = tonic_prost_build::Config::new();
    config.protoc_executable(protoc_bin_vendored::protoc_bin_path()?);
    let well_known_types = protoc_bin_vendored::include_path()?;
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("ledger_descriptor.bin"))
        // google.rpc.Status is tonic-types' own type, so batch errors carry the same details
        // (ErrorInfo, BadRequest) a unary call's status does.
        .extern_path(".google.rpc.Status", "::tonic_types::pb::Status")
        .compile_with_config(
            config,
            &[
                PathBuf::from("proto/diboas/ledger/v1/ledger.proto"),
                PathBuf::from("proto/diboas/ledger/v1/directory.proto"),
                PathBuf::from("proto/diboas/ledger/v1/transactions.proto"),
                PathBuf::from("proto/diboas/ledger/v1/events.proto"),
            ],
            &[PathBuf::from("proto"), well_known_types],
        )?;
    Ok(())
}

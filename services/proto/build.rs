//! Compiles `proto/` with protox (pure Rust, no `protoc`) and generates prost types plus
//! the canonical proto3 JSON mapping (pbjson) for every message.
use std::{env, error::Error, path::PathBuf};

const PROTOS: &[&str] = &[
    "topup/v1/money.proto",
    "topup/v1/balance.proto",
    "topup/v1/rule.proto",
    "topup/v1/topup.proto",
    "topup/v1/notification.proto",
    "topup/v1/dead_letter.proto",
    "topup/evaluator/v1/state.proto",
    "topup/payment/v1/retry.proto",
    "topup/notifier/v1/state.proto",
];

fn main() -> Result<(), Box<dyn Error>> {
    let root = PathBuf::from(env::var("CARGO_MANIFEST_DIR")?).join("../../proto");
    println!("cargo:rerun-if-changed={}", root.display());
    let descriptors = protox::compile(PROTOS, [&root])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    let descriptor_path = out.join("descriptors.bin");
    std::fs::write(&descriptor_path, prost::Message::encode_to_vec(&descriptors))?;

    prost_build::Config::new()
        .file_descriptor_set_path(&descriptor_path)
        .skip_protoc_run()
        .prost_types_path("::pbjson_types")
        .compile_protos(PROTOS, &[&root])?;

    let descriptor_set = std::fs::read(&descriptor_path)?;
    pbjson_build::Builder::new().register_descriptors(&descriptor_set)?.build(&[".topup"])?;
    Ok(())
}

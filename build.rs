use std::path::PathBuf;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = PathBuf::from(std::env::var("OUT_DIR")?);
    let protos = [
        "proto/keyward/v1/common.proto",
        "proto/keyward/v1/key.proto",
        "proto/keyward/v1/data.proto",
        "proto/keyward/v1/admin.proto",
        "proto/keyward/v1/pin.proto",
        "proto/keyward/v1/mac.proto",
        "proto/keyward/v1/otp.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        // Carries a PAN or phone number: its Debug is written by hand (redacted).
        .skip_debug(["keyward.v1.Account"])
        .file_descriptor_set_path(out.join("keyward_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}

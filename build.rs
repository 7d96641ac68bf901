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
        "proto/keyward/v1/voucher.proto",
        "proto/keyward/v1/binding.proto",
    ];
    for p in &protos {
        println!("cargo:rerun-if-changed={p}");
    }
    tonic_prost_build::configure()
        // Carry a PAN, phone number, PIN block, code, seed, identity data or an e-cash
        // account reference: Debug is written by hand
        // (redacted) in src/lib.rs.
        .skip_debug([
            "keyward.v1.Account",
            "keyward.v1.EncryptedPin",
            "keyward.v1.TranslatePinResponse",
            "keyward.v1.IssueCodeResponse",
            "keyward.v1.VerifyCodeRequest",
            "keyward.v1.EnrollTotpResponse",
            "keyward.v1.EnrollHotpResponse",
            "keyward.v1.VerifyTotpRequest",
            "keyward.v1.VerifyHotpRequest",
            "keyward.v1.Binding",
            "keyward.v1.Identity",
            "keyward.v1.MaskedBinding",
            "keyward.v1.BlindIndexRequest",
            "keyward.v1.CertifyDeviceRequest",
            "keyward.v1.CertifyDeviceResponse",
            "keyward.v1.IssueVoucherRequest",
            "keyward.v1.VerifyPaymentsRequest",
        ])
        .file_descriptor_set_path(out.join("keyward_descriptor.bin"))
        .compile_protos(&protos, &["proto"])?;
    Ok(())
}

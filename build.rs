//! Compiles `proto/` with protox (no system `protoc`) and writes the encoded
//! descriptor set beside the generated code for server reflection.

use std::{env, fs, path::PathBuf};

use prost::Message as _;

const PROTO: &str = "proto/changetoken/v1/changetoken.proto";

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto");
    let fds = protox::compile([PROTO], ["proto"])?;
    let out = PathBuf::from(env::var("OUT_DIR")?);
    fs::write(out.join("changetoken_descriptor.bin"), fds.encode_to_vec())?;
    tonic_prost_build::configure()
        .codec_path("crate::codec::SmallBufferCodec")
        .compile_fds(fds)?;
    Ok(())
}

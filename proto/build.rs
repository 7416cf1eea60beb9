//! Generates the gRPC code from `margay/cni/v1/cni.proto` with protoc
//! (Debian's `protobuf-compiler`; `PROTOC` overrides the path).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=margay/cni/v1/cni.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure().compile_protos(&["margay/cni/v1/cni.proto"], &["."])?;
    Ok(())
}

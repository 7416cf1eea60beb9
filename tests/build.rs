//! Generates a CRI client (the sandbox part of runtime.v1) for the
//! containerd test, with protoc (`PROTOC` overrides the path).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("cargo:rerun-if-changed=proto/cri_subset.proto");
    println!("cargo:rerun-if-env-changed=PROTOC");
    tonic_prost_build::configure()
        .build_server(false)
        .compile_protos(&["proto/cri_subset.proto"], &["proto"])?;
    Ok(())
}

//! Compiles the .proto files with protox (pure Rust, no system protoc):
//! `ghostmirror.proto` (sync) and `registry.proto` (registry admin).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = ["proto/ghostmirror.proto", "proto/registry.proto"];
    for file in files {
        println!("cargo:rerun-if-changed={file}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(true)
        .compile_fds(descriptors)?;
    Ok(())
}

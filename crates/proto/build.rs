//! Compiles the .proto files with protox (pure Rust, no system protoc):
//! `ghostmirror.proto` (sync), `registry.proto` (registry admin) and
//! `skills.proto` (skill registry admin).

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/ghostmirror.proto",
        "proto/registry.proto",
        "proto/skills.proto",
    ];
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

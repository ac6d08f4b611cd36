//! Compiles the protos with a vendored protoc, so building needs no system protoc.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Build scripts are single-threaded, so setting the variable cannot race.
    std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    let include = protoc_bin_vendored::include_path()?;
    let protos = [
        std::path::PathBuf::from("proto/csi.proto"),
        std::path::PathBuf::from("proto/agent.proto"),
    ];
    tonic_prost_build::configure()
        .build_server(true)
        .build_client(true)
        // The agent's maps become the BTreeMaps the records hold.
        .btree_map(".cellar.agent.v1")
        .compile_protos(&protos, &[std::path::PathBuf::from("proto"), include])?;
    for p in protos {
        println!("cargo:rerun-if-changed={}", p.display());
    }
    Ok(())
}

//! Generates the etcd v3 client from `proto/etcd/rpc.proto` with protox (a
//! protobuf compiler in Rust), so building fedmesh never needs `protoc`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let proto = "proto/etcd/rpc.proto";
    println!("cargo:rerun-if-changed={proto}");
    if std::env::var_os("CARGO_FEATURE_ETCD").is_none() {
        return Ok(());
    }
    let fds = protox::compile([proto], ["proto"])?;
    tonic_prost_build::configure()
        .build_client(true)
        .build_server(false)
        .compile_fds(fds)?;
    Ok(())
}

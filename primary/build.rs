//! Compiles the etcd API protos with protox (pure Rust), so building Tern
//! needs no system `protoc`, and generates their proto3 JSON mapping
//! (pbjson) for the JSON gateway.

use prost::Message;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let files = [
        "proto/mvccpb/kv.proto",
        "proto/authpb/auth.proto",
        "proto/etcdserverpb/rpc.proto",
        "proto/v3lockpb/v3lock.proto",
        "proto/v3electionpb/v3election.proto",
        "proto/ternpb/raft_request.proto",
        "proto/ternpb/peer.proto",
    ];
    for f in files {
        println!("cargo:rerun-if-changed={f}");
    }
    let descriptors = protox::compile(files, ["proto"])?;
    // etcd's gateway prints the names written in the .proto files
    // (grpc-gateway's `OrigName`): `create_revision`, `dbSize`, `ID`.
    pbjson_build::Builder::new()
        .register_descriptors(&descriptors.encode_to_vec())?
        .preserve_proto_field_names()
        .ignore_unknown_fields()
        .build(&[
            ".mvccpb",
            ".authpb",
            ".etcdserverpb",
            ".v3lockpb",
            ".v3electionpb",
        ])?;
    // Sizes each message's buffer before encoding it (see src/codec.rs).
    tonic_prost_build::configure()
        .codec_path("crate::codec::SizedProstCodec")
        .build_server(true)
        .build_client(true)
        .compile_fds(descriptors)?;
    Ok(())
}

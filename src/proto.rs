//! Code generated from `proto/changetoken/v1/changetoken.proto`, and the
//! encoded descriptor set that server reflection serves.

#![allow(missing_docs, clippy::all)]

tonic::include_proto!("changetoken.v1");

/// The encoded `FileDescriptorSet` of the changetoken protos.
pub const FILE_DESCRIPTOR_SET: &[u8] =
    include_bytes!(concat!(env!("OUT_DIR"), "/changetoken_descriptor.bin"));

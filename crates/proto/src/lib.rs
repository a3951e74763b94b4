//! Generated protobuf messages and tonic clients/servers for the three chipgate APIs
//! (`chipgate.licensing.v1`, `chipgate.inventory.v1`, `chipgate.orders.v1`), plus the encoded file
//! descriptor set that every service hands to gRPC reflection. Services, the CLI and the tests all use
//! these types; nothing else in the workspace compiles `.proto` files.
#![allow(missing_docs, clippy::all, clippy::pedantic)]

/// Encoded `FileDescriptorSet` of every chipgate proto file (and its imports), for reflection.
pub const FILE_DESCRIPTOR_SET: &[u8] = include_bytes!(concat!(env!("OUT_DIR"), "/chipgate_descriptor.bin"));

/// Licensing: applications, the approval queue, waves, licences, quota, export and import policy, audit.
pub mod licensing {
    /// Version 1 of the licensing API.
    pub mod v1 {
        tonic::include_proto!("chipgate.licensing.v1");
    }
}

/// Inventory: catalogue, stock, supply and holds.
pub mod inventory {
    /// Version 1 of the inventory API.
    pub mod v1 {
        tonic::include_proto!("chipgate.inventory.v1");
    }
}

/// The benchmark's echo service (the RPC ceiling).
pub mod bench {
    /// Version 1.
    pub mod v1 {
        tonic::include_proto!("chipgate.bench.v1");
    }
}

/// Orders: placement, queues, propagation.
pub mod orders {
    /// Version 1 of the orders API.
    pub mod v1 {
        tonic::include_proto!("chipgate.orders.v1");
    }
}

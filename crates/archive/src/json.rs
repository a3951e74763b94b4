//! The APIs' messages in the proto3 JSON mapping (`.proto` field names, enums by name, 64-bit
//! integers as strings, timestamps in RFC 3339), rendered from the descriptor set the services serve
//! for reflection: what archived records are written as, so anyone with the `.proto` files reads them.

use std::sync::LazyLock;

use prost_reflect::{DescriptorPool, DynamicMessage, SerializeOptions};
use serde_json::Value;

static POOL: LazyLock<Result<DescriptorPool, String>> = LazyLock::new(|| {
    DescriptorPool::decode(chipgate_proto::FILE_DESCRIPTOR_SET).map_err(|e| format!("descriptor set: {e}"))
});

const OPTIONS: SerializeOptions = SerializeOptions::new().use_proto_field_name(true);

/// `chipgate_proto::orders::v1::Order` is `chipgate.orders.v1.Order` (the generated modules mirror
/// the proto packages).
fn full_name<M>() -> String {
    let rust = std::any::type_name::<M>();
    let path = rust.strip_prefix("chipgate_proto::").unwrap_or(rust);
    format!("chipgate.{}", path.replace("::", "."))
}

fn descriptor<M>() -> Result<prost_reflect::MessageDescriptor, String> {
    let name = full_name::<M>();
    let pool = POOL.as_ref().map_err(Clone::clone)?;
    pool.get_message_by_name(&name).ok_or_else(|| format!("{name} is not in the descriptor set"))
}

/// A message in proto3 JSON (fields at their default values left out).
///
/// # Errors
/// Only if the message type is not in the descriptor set (a build problem).
pub fn to_json<M: prost::Message>(m: &M) -> Result<Value, String> {
    let desc = descriptor::<M>()?;
    let dynamic = DynamicMessage::decode(desc, m.encode_to_vec().as_slice()).map_err(|e| e.to_string())?;
    dynamic.serialize_with_options(serde_json::value::Serializer, &OPTIONS).map_err(|e| e.to_string())
}

/// A message read from proto3 JSON.
///
/// # Errors
/// JSON that is not such a message.
pub fn from_json<M: prost::Message + Default>(v: &Value) -> Result<M, String> {
    let desc = descriptor::<M>()?;
    let name = desc.full_name().to_string();
    let dynamic = DynamicMessage::deserialize(desc, v).map_err(|e| format!("not a {name}: {e}"))?;
    dynamic.transcode_to::<M>().map_err(|e| format!("not a {name}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use chipgate_proto::licensing::v1 as pb;

    #[test]
    fn messages_round_trip() {
        let e = pb::AuditEntry {
            sequence: 3,
            time: Some(prost_types::Timestamp { seconds: 1_700_000_000, nanos: 5_000_000 }),
            actor: "import_authority".into(),
            action: "wave.publish".into(),
            ..Default::default()
        };
        let v = to_json(&e).expect("renders");
        assert_eq!(v["sequence"], "3");
        assert_eq!(v["time"], "2023-11-14T22:13:20.005Z");
        assert_eq!(from_json::<pb::AuditEntry>(&v).expect("parses"), e);
        assert!(from_json::<pb::AuditEntry>(&serde_json::json!({"sequence": "x"})).is_err());
    }
}

//! What the hub does first with a Commit request from the wire: decode it
//! and convert every op (path, entry) through the checked conversions. Never
//! a panic, whatever the bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    if let Ok(request) = gm_proto::pb::CommitRequest::decode(data) {
        let _ = gm_core::WorkspaceId::new(&request.workspace);
        let _ = gm_core::NodeId::new(&request.node_id);
        for op in &request.ops {
            let _ = gm_proto::path(&op.path);
            if let Some(entry) = &op.entry {
                let _ = gm_proto::entry(&op.path, entry);
            }
        }
    }
    if let Ok(event) = gm_proto::pb::SubscribeEvent::decode(data) {
        for state in &event.changes {
            let _ = gm_proto::path_state(state);
        }
    }
    if let Ok(request) = gm_proto::pb::DownloadRequest::decode(data) {
        for item in &request.items {
            let _ = gm_proto::path(&item.path);
            let _ = gm_core::ContentHash::from_slice(&item.hash);
        }
    }
});

//! An upload conversation's checks on arbitrary messages: the start, the
//! chunk list (converted and checked against the announced size), never a
//! panic and never an unbounded allocation.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;

fuzz_target!(|data: &[u8]| {
    let Ok(message) = gm_proto::pb::UploadMessage::decode(data) else { return };
    match message.msg {
        Some(gm_proto::pb::upload_message::Msg::Start(start)) => {
            let _ = gm_core::ContentHash::from_slice(&start.hash);
            let _ = gm_core::WorkspaceId::new(&start.workspace);
        }
        Some(gm_proto::pb::upload_message::Msg::Manifest(part)) => {
            if let Ok(chunks) = gm_proto::chunks(&part.chunks) {
                let manifest = gm_chunk::Manifest { chunks };
                let size = manifest.chunks.iter().map(|c| u64::from(c.len)).sum::<u64>();
                let _ = manifest.check(size);
                let _ = manifest.check(size.wrapping_add(1));
                let _ = manifest.offsets();
            }
        }
        Some(gm_proto::pb::upload_message::Msg::Chunk(chunk)) => {
            let _ = gm_chunk::decode(chunk.data, chunk.zstd, gm_chunk::MAX_CHUNK as usize);
        }
        None => {}
    }
});

//! Chunk data from the wire: decoding is bounded by the expected length (a
//! zstd bomb cannot allocate more) and verification rejects anything that
//! does not hash to the chunk it claims to be.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Some((&flag, rest)) = data.split_first() else { return };
    let expected = (flag as usize) * 1024;
    if let Ok(decoded) = gm_chunk::decode(rest.to_vec(), flag & 1 == 1, expected) {
        assert!(decoded.len() <= expected.max(rest.len()));
        let claimed = gm_chunk::ChunkRef {
            len: decoded.len() as u32,
            hash: gm_core::ContentHash::of(&decoded),
        };
        assert!(gm_chunk::VerifiedChunk::verify(0, decoded.clone(), &claimed).is_ok());
        let wrong = gm_chunk::ChunkRef {
            len: claimed.len,
            hash: gm_core::ContentHash::of(b"something else"),
        };
        if decoded != b"something else" {
            assert!(gm_chunk::VerifiedChunk::verify(0, decoded, &wrong).is_err());
        }
    }
    let _ = gm_chunk::chunk_slice(data);
});

//! The one path validator on arbitrary bytes: it never panics, and what it
//! accepts can never leave the workspace root or touch internal state.
#![no_main]

use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    if let Ok(path) = gm_core::RelPath::from_bytes(data) {
        let text = path.as_str();
        assert!(!text.starts_with('/'));
        assert!(!text.contains('\0') && !text.contains('\\'));
        for component in path.components() {
            assert!(!component.is_empty() && component != "." && component != "..");
        }
        assert_ne!(path.components().next(), Some(gm_core::INTERNAL_DIR));
        assert!(text.len() <= gm_core::path::MAX_PATH_BYTES);
        // Derived paths stay valid.
        if let Some(parent) = path.parent() {
            assert!(parent.is_ancestor_of(&path));
        }
        let _ = gm_core::minimal_tops([path.clone()]);
    }
    if let Ok(text) = std::str::from_utf8(data) {
        let _ = gm_core::WorkspaceId::new(text);
        let _ = gm_core::NodeId::new(text);
        let _ = gm_core::parse_utc(text);
    }
});

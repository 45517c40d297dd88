//! Bad input on the wire: a client built from the project's own .proto
//! sends what an honest node never would. Each request gets a clear error
//! (or a refused result that names the problem), nothing is written, and the
//! hub keeps serving.

mod common;

use common::*;
use gm_proto::pb;
use gm_proto::pb::sync_client::SyncClient;
use tonic::Request;

type Client = SyncClient<tonic::transport::Channel>;

fn authed<T>(message: T, token: &str) -> Request<T> {
    let mut request = Request::new(message);
    request.metadata_mut().insert(
        "authorization",
        format!("Bearer {token}").parse().expect("header"),
    );
    request
}

fn file_entry(content: &[u8]) -> pb::Entry {
    gm_proto::entry_to_wire(&gm_core::Entry::File {
        hash: gm_core::ContentHash::of(content),
        size: content.len() as u64,
        executable: false,
    })
}

async fn commit_one(client: &mut Client, path: &str, content: &[u8]) -> pb::OpResult {
    let request = pb::CommitRequest {
        workspace: "w".into(),
        node_id: "hostile".into(),
        ops: vec![pb::CommitOp {
            path: path.into(),
            base_seq: 0,
            entry: Some(file_entry(content)),
            data: Some(content.to_vec()),
        }],
    };
    let response = client
        .commit(authed(request, TOKEN))
        .await
        .expect("commit call");
    response
        .into_inner()
        .results
        .into_iter()
        .next()
        .expect("one result")
}

fn refused(result: &pb::OpResult) -> Option<&str> {
    match &result.outcome {
        Some(pb::op_result::Outcome::Refused(reason)) => Some(reason),
        _ => None,
    }
}

fn start(hash: &[u8], size: u64, chunk_count: u32) -> pb::UploadMessage {
    pb::UploadMessage {
        msg: Some(pb::upload_message::Msg::Start(pb::UploadStart {
            workspace: "w".into(),
            hash: hash.to_vec(),
            size,
            chunk_count,
        })),
    }
}

fn manifest(chunks: &[&[u8]]) -> pb::UploadMessage {
    pb::UploadMessage {
        msg: Some(pb::upload_message::Msg::Manifest(pb::ManifestPart {
            chunks: chunks
                .iter()
                .map(|c| pb::ChunkRef {
                    hash: gm_core::ContentHash::of(c).as_bytes().to_vec(),
                    len: c.len() as u32,
                })
                .collect(),
        })),
    }
}

fn chunk(index: u32, data: &[u8]) -> pb::UploadMessage {
    pb::UploadMessage {
        msg: Some(pb::upload_message::Msg::Chunk(pb::ChunkData {
            index,
            data: data.to_vec(),
            zstd: false,
        })),
    }
}

/// Runs an upload conversation that must fail; returns its error.
async fn upload_error(client: &mut Client, messages: Vec<pb::UploadMessage>) -> tonic::Status {
    let mut replies = match client
        .upload(authed(tokio_stream::iter(messages), TOKEN))
        .await
    {
        Ok(response) => response.into_inner(),
        Err(status) => return status,
    };
    loop {
        match replies.message().await {
            Ok(Some(reply)) => assert!(!reply.stored, "a bad upload was stored"),
            Ok(None) => panic!("a bad upload ended without an error"),
            Err(status) => return status,
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_requests_are_refused_and_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let hub = Hub::start(dir.path());
    let outside = dir.path().join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    // An honest node syncs its own workspace all through the barrage.
    let mut honest = Node::new(dir.path(), &hub, "honest", "h");
    honest.start();
    write(&honest.path("before.txt"), "before");
    let mut client = SyncClient::connect(hub.url.clone()).await.expect("connect");

    // No token, a wrong token.
    let attach = pb::AttachRequest {
        workspace: "w".into(),
        node_id: "hostile".into(),
    };
    let err = client
        .attach(Request::new(attach.clone()))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("no token"), "{}", err.message());
    let err = client
        .attach(authed(attach.clone(), "not-the-token"))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::Unauthenticated);
    assert!(err.message().contains("refused the token"));

    // Bad workspace and node ids.
    let err = client
        .attach(authed(
            pb::AttachRequest {
                workspace: "../etc".into(),
                node_id: "n".into(),
            },
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);
    assert!(err.message().contains("../etc"), "{}", err.message());

    client.attach(authed(attach, TOKEN)).await.expect("attach");
    let mirror = hub.mirror("w");
    // A symlinked parent inside the mirror, pointing outside.
    std::os::unix::fs::symlink(&outside, mirror.join("escape")).unwrap();
    wait_until("hub journals the symlink", || {
        hub.workspace_status("w")["symlinks"].as_u64() == Some(1)
    });

    let vectors: &[(&str, &str)] = &[
        ("../x", "'..'"),
        ("a/../../x", "'..'"),
        ("/etc/passwd", "absolute"),
        ("a//b", "empty component"),
        ("a/./b", "'.'"),
        ("a\0b", "NUL"),
        ("a\\..\\b", "backslash"),
        (".ghostmirror/staging/x", "internal"),
        (".ghostmirror", "internal"),
        ("", "empty"),
        ("escape/pwned", "not a directory"),
        ("escape/deeper/pwned", "not a directory"),
        ("..", "'..'"),
        ("a/..", "'..'"),
        ("./x", "'.'"),
        ("x/", "empty component"),
        ("/", "absolute"),
        ("//server/share/x", "absolute"),
        ("a/b/../../../x", "'..'"),
        ("..\\x", "backslash"),
        ("C:\\Windows\\x", "backslash"),
        ("\\\\server\\share", "backslash"),
        ("x/\0/y", "NUL"),
        (".ghostmirror/node.db", "internal"),
        (".ghostmirror/../x", "internal"),
    ];
    for (path, expect) in vectors {
        let result = commit_one(&mut client, path, b"pwned").await;
        let reason =
            refused(&result).unwrap_or_else(|| panic!("{path:?} was not refused: {result:?}"));
        assert!(reason.contains(expect), "{path:?}: {reason}");
    }
    let overlong: &[(String, &str)] = &[
        ("x/".repeat(300) + "y", "deeper"),
        ("n".repeat(256), "name longer"),
        ("d/".repeat(2100) + "y", "longer than the limit"),
    ];
    for (path, expect) in overlong {
        let result = commit_one(&mut client, path, b"pwned").await;
        assert!(
            refused(&result).is_some_and(|r| r.contains(expect)),
            "{} bytes: {result:?}",
            path.len()
        );
    }
    // Percent-encoded and look-alike separators are names, not separators:
    // each lands as one literal file inside the root.
    let literal = [
        "..%2Fx",
        "%2e%2e%2fpwned",
        "%c0%ae%c0%ae",
        "\u{ff0e}\u{ff0e}\u{2215}x",
    ];
    for name in literal {
        let result = commit_one(&mut client, name, b"literal").await;
        assert!(
            matches!(result.outcome, Some(pb::op_result::Outcome::Committed(_))),
            "{name:?}: {result:?}"
        );
        assert_eq!(std::fs::read(mirror.join(name)).unwrap(), b"literal");
    }

    // Inline content that does not match its hash.
    let request = pb::CommitRequest {
        workspace: "w".into(),
        node_id: "hostile".into(),
        ops: vec![pb::CommitOp {
            path: "liar.txt".into(),
            base_seq: 0,
            entry: Some(file_entry(b"what I claim")),
            data: Some(b"what I send!".to_vec()),
        }],
    };
    let result = client
        .commit(authed(request, TOKEN))
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert!(
        refused(&result).is_some_and(|r| r.contains("does not match")),
        "{result:?}"
    );

    // Uploads: bytes that do not match the claimed hash, a chunk that does
    // not match its own hash, a truncated stream, a huge claimed size, no
    // start, a chunk list longer than announced or not adding up, chunks
    // for a file never proposed.
    let claimed = gm_core::ContentHash::of(b"0123456789").as_bytes().to_vec();
    let cases: Vec<(Vec<pb::UploadMessage>, &str)> = vec![
        (
            vec![
                start(&claimed, 10, 1),
                manifest(&[b"9876543210"]),
                chunk(0, b"9876543210"),
            ],
            "does not match its hash",
        ),
        (
            vec![
                start(&claimed, 10, 1),
                manifest(&[b"0123456789"]),
                // The right length, the wrong bytes: the whole-file hash
                // refuses them (a sent chunk is not hashed on its own).
                chunk(0, b"9876543210"),
            ],
            "uploaded content does not match its hash",
        ),
        (
            vec![start(&claimed, 10, 1), manifest(&[b"0123456789"])],
            "truncated",
        ),
        (vec![start(&claimed, 1u64 << 63, 1)], "over the hub's limit"),
        (vec![chunk(0, b"no start")], "start"),
        (
            vec![start(&claimed, 10, 1), manifest(&[b"01234", b"56789"])],
            "longer than the announced",
        ),
        (
            vec![start(&claimed, 10, 1), manifest(&[b"012345678"])],
            "add up",
        ),
        (
            vec![
                start(&claimed, 10, 1),
                manifest(&[b"0123456789"]),
                chunk(5, b"0123456789"),
            ],
            "expected chunk 0",
        ),
    ];
    for (messages, expect) in cases {
        let err = upload_error(&mut client, messages).await;
        assert!(
            err.message().contains(expect),
            "expected {expect:?}, got {:?}",
            err.message()
        );
    }

    // A file entry claiming 2^63 bytes.
    let request = pb::CommitRequest {
        workspace: "w".into(),
        node_id: "hostile".into(),
        ops: vec![pb::CommitOp {
            path: "huge".into(),
            base_seq: 0,
            entry: Some(pb::Entry {
                kind: Some(pb::entry::Kind::File(pb::FileEntry {
                    hash: claimed.clone(),
                    size: 1 << 63,
                    executable: false,
                })),
            }),
            data: None,
        }],
    };
    let result = client
        .commit(authed(request, TOKEN))
        .await
        .unwrap()
        .into_inner()
        .results
        .remove(0);
    assert!(
        refused(&result).is_some_and(|r| r.contains("limit")),
        "{result:?}"
    );

    // Downloads of bad paths are refused.
    let err = client
        .download(authed(
            pb::DownloadRequest {
                workspace: "w".into(),
                items: vec![pb::DownloadItem {
                    path: "../../etc/passwd".into(),
                    hash: claimed.clone(),
                }],
            },
            TOKEN,
        ))
        .await
        .unwrap_err();
    assert_eq!(err.code(), tonic::Code::InvalidArgument);

    // Nothing landed: not outside, not in the mirror, no staging left behind.
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "nothing written outside the root"
    );
    let tree = tree(&mirror);
    let mut expected: Vec<String> = literal.iter().map(|name| name.to_string()).collect();
    expected.push("escape".to_string());
    expected.sort();
    assert_eq!(
        tree.keys().cloned().collect::<Vec<_>>(),
        expected,
        "{tree:?}"
    );
    let staging: Vec<_> = std::fs::read_dir(hub.staging("w")).unwrap().collect();
    assert!(staging.is_empty(), "staging left: {staging:?}");
    let status = hub.status();
    assert!(
        status["counters"]["refused_ops"].as_u64().unwrap_or(0) >= 14,
        "{status}"
    );

    // And the hub still serves an honest request.
    let ok = commit_one(&mut client, "honest.txt", b"fine").await;
    assert!(
        matches!(ok.outcome, Some(pb::op_result::Outcome::Committed(_))),
        "{ok:?}"
    );
    assert_eq!(std::fs::read(mirror.join("honest.txt")).unwrap(), b"fine");

    // The honest node was served all along: both directions still flow.
    write(&honest.path("after.txt"), "after");
    std::fs::write(hub.mirror("h").join("from-hub.txt"), "hub").unwrap();
    let honest_root = honest.path("");
    let hub_h = hub.mirror("h");
    tokio::task::spawn_blocking(move || {
        wait_converged("honest node and hub", &[&honest_root, &hub_h]);
    })
    .await
    .unwrap();
    for name in ["before.txt", "after.txt", "from-hub.txt"] {
        assert!(
            honest.path(name).exists() && hub.mirror("h").join(name).exists(),
            "{name}"
        );
    }
}

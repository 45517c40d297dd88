//! TLS with the real binary: a node syncs over https:// with the hub's CA,
//! a wrong CA is refused, and with mutual TLS a node without a client
//! certificate (or with one from another CA) is refused. Certificates are
//! made for the test with rcgen.

mod common;

use std::path::{Path, PathBuf};

use common::*;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};

struct Ca {
    issuer: Issuer<'static, KeyPair>,
    pem: String,
}

fn ca(name: &str) -> Ca {
    let key = KeyPair::generate().unwrap();
    let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params
        .distinguished_name
        .push(rcgen::DnType::CommonName, name);
    let cert = params.self_signed(&key).unwrap();
    Ca {
        pem: cert.pem(),
        issuer: Issuer::new(params, key),
    }
}

/// Writes a certificate for `names` signed by `ca`; returns (cert, key) paths.
fn leaf(dir: &Path, ca: &Ca, label: &str, names: &[&str]) -> (PathBuf, PathBuf) {
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).unwrap();
    let cert = params.signed_by(&key, &ca.issuer).unwrap();
    let cert_path = dir.join(format!("{label}.crt"));
    let key_path = dir.join(format!("{label}.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (cert_path, key_path)
}

fn write_ca(dir: &Path, ca: &Ca, label: &str) -> PathBuf {
    let path = dir.join(format!("{label}.pem"));
    std::fs::write(&path, &ca.pem).unwrap();
    path
}

fn node_once(hub: &Hub, dir: &Path, name: &str, tls: &[(&str, &Path)]) -> std::process::Output {
    let root = dir.join(format!("{name}-root"));
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(root.join(format!("{name}.txt")), name).unwrap();
    let mut cmd = command();
    cmd.args([
        "node",
        "--once",
        "--once-timeout",
        "2",
        "--hub",
        &hub.url,
        "--token",
        TOKEN,
        "--node-id",
        name,
    ])
    .arg("--state-dir")
    .arg(dir.join(format!("{name}-state")))
    .arg("--workspace")
    .arg(format!("ws={}", root.display()));
    for (flag, path) in tls {
        cmd.arg(flag).arg(path);
    }
    cmd.output().unwrap()
}

#[test]
fn tls_and_mutual_tls() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    std::fs::create_dir_all(&certs).unwrap();
    let good = ca("ghostmirror test CA");
    let other = ca("someone else's CA");
    let good_pem = write_ca(&certs, &good, "ca");
    let other_pem = write_ca(&certs, &other, "other-ca");
    let (server_cert, server_key) = leaf(&certs, &good, "hub", &["127.0.0.1", "localhost"]);
    let (client_cert, client_key) = leaf(&certs, &good, "client", &["node-a"]);
    let (stranger_cert, stranger_key) = leaf(&certs, &other, "stranger", &["node-x"]);

    // Server TLS.
    let tls_dir = dir.path().join("tls");
    std::fs::create_dir_all(&tls_dir).unwrap();
    let hub = Hub::start_with(
        &tls_dir,
        &[
            ("GM_TLS_CERT", server_cert.to_str().unwrap()),
            ("GM_TLS_KEY", server_key.to_str().unwrap()),
        ],
    );
    assert!(hub.url.starts_with("https://"), "{}", hub.url);
    let out = node_once(&hub, &tls_dir, "node-a", &[("--tls-ca", &good_pem)]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(hub.mirror("ws").join("node-a.txt").exists());
    // A wrong CA: the hub's certificate is not trusted.
    let out = node_once(&hub, &tls_dir, "node-b", &[("--tls-ca", &other_pem)]);
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr).to_lowercase();
    assert!(
        stderr.contains("certificate") || stderr.contains("tls") || stderr.contains("unreachable"),
        "{stderr}"
    );
    // No CA for an https:// hub: a clear setup error.
    let out = node_once(&hub, &tls_dir, "node-c", &[]);
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("--tls-ca"));

    // Mutual TLS.
    let mtls_dir = dir.path().join("mtls");
    std::fs::create_dir_all(&mtls_dir).unwrap();
    let hub = Hub::start_with(
        &mtls_dir,
        &[
            ("GM_TLS_CERT", server_cert.to_str().unwrap()),
            ("GM_TLS_KEY", server_key.to_str().unwrap()),
            ("GM_TLS_CLIENT_CA", good_pem.to_str().unwrap()),
        ],
    );
    let out = node_once(&hub, &mtls_dir, "node-d", &[("--tls-ca", &good_pem)]);
    assert!(
        !out.status.success(),
        "no client certificate must be refused"
    );
    let out = node_once(
        &hub,
        &mtls_dir,
        "node-e",
        &[
            ("--tls-ca", &good_pem),
            ("--tls-client-cert", &stranger_cert),
            ("--tls-client-key", &stranger_key),
        ],
    );
    assert!(
        !out.status.success(),
        "a client certificate from another CA must be refused"
    );
    let out = node_once(
        &hub,
        &mtls_dir,
        "node-f",
        &[
            ("--tls-ca", &good_pem),
            ("--tls-client-cert", &client_cert),
            ("--tls-client-key", &client_key),
        ],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(hub.mirror("ws").join("node-f.txt").exists());
    assert!(
        !hub.mirror("ws").join("node-d.txt").exists()
            && !hub.mirror("ws").join("node-e.txt").exists()
    );
}

#[test]
fn plaintext_on_a_network_address_needs_an_explicit_flag() {
    let dir = tempfile::tempdir().unwrap();
    let out = command()
        .args([
            "hub",
            "--listen",
            "0.0.0.0:0",
            "--admin-listen",
            "127.0.0.1:0",
            "--token",
            TOKEN,
        ])
        .arg("--data-dir")
        .arg(dir.path().join("hub"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("refusing to serve plaintext") && stderr.contains("GM_ALLOW_PLAINTEXT"),
        "{stderr}"
    );
}

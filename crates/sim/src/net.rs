//! The modelled network: one connection per node, carrying the messages of
//! the gRPC service (`Subscribe`, `Commit`, `Download`).
//!
//! Guarantees modelled, as HTTP/2 gives them: the subscription stream is
//! delivered in order; separate calls (each commit or download request and
//! its answer) are independent and may overtake each other and the
//! stream. A disconnect drops everything in flight on the connection, in
//! both directions.

use std::collections::VecDeque;

use gm_core::{ContentHash, Entry, RelPath, Seq, Versioned};

/// One proposed change (`pb::CommitOp`). `inline` says the file's bytes
/// travel with it (the simulation knows bytes by their hash).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Op {
    pub path: RelPath,
    pub base: Seq,
    pub entry: Option<Entry>,
    pub inline: bool,
}

/// The hub's answer to one op (`pb::OpResult`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpResult {
    Committed(Seq),
    Conflict {
        current: Versioned,
        copy: Option<(RelPath, Versioned)>,
    },
    NeedContent,
    Refused(String),
}

#[derive(Debug, Clone)]
pub enum ToHub {
    Subscribe {
        since: Seq,
    },
    Commit {
        call: u64,
        ops: Vec<Op>,
    },
    Download {
        call: u64,
        items: Vec<(RelPath, ContentHash)>,
    },
}

#[derive(Debug, Clone)]
pub enum ToNode {
    /// Journal changes, in seq order (subscription stream).
    Changes(Vec<(RelPath, Versioned)>),
    /// The catch-up is complete up to this seq (subscription stream).
    CaughtUp(Seq),
    CommitDone {
        call: u64,
        results: Vec<OpResult>,
    },
    /// Per item: the content, or why the hub could not serve it.
    Downloaded {
        call: u64,
        items: Vec<Result<ContentHash, String>>,
    },
}

/// One node's connection to the hub.
#[derive(Debug, Default)]
pub struct Link {
    /// Identifies the connection; messages of an older one are gone.
    pub conn: u64,
    pub up: bool,
    /// Subscription stream, hub -> node, in order.
    pub stream: VecDeque<ToNode>,
    /// Calls on their way to the hub, any order.
    pub requests: Vec<ToHub>,
    /// Answers on their way to the node, any order.
    pub answers: Vec<ToNode>,
}

impl Link {
    /// Drops the connection and everything in flight on it.
    pub fn drop_connection(&mut self) {
        self.up = false;
        self.stream.clear();
        self.requests.clear();
        self.answers.clear();
    }

    /// A new connection.
    pub fn connect(&mut self) {
        self.drop_connection();
        self.conn += 1;
        self.up = true;
    }

    pub fn in_flight(&self) -> usize {
        self.stream.len() + self.requests.len() + self.answers.len()
    }
}

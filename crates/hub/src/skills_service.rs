//! The skills' gRPC surface (`ghostmirror.skills.v1.Skills`): checks every
//! wire value (names, workspace ids, the paths and kinds of files sent by
//! `skill add`) into core types, calls `skills`, and maps its refusals to
//! statuses that say why. Served beside the sync and registry services;
//! like the registry, admin-only (a node's token is refused with
//! PERMISSION_DENIED before any handler runs, see `service::identify`).

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use gm_core::{ContentHash, Entry, RelPath, SkillName, SkillTree, WorkspaceId};
use gm_proto::skills_pb as pb;
use gm_registry::{Skill, SkillOrigin};
use tonic::{Request, Response, Status};

use crate::skills::{self, MAX_SKILL_BYTES, SkillError, SkillView};
use crate::state::Hub;

pub struct SkillsService {
    pub hub: Arc<Hub>,
}

/// The status a refused skill request becomes; failures of the hub itself
/// are logged here, where they are handled.
fn status(err: SkillError) -> Status {
    let message = err.to_string();
    match err {
        SkillError::NotFound(_) => Status::not_found(message),
        SkillError::Exists(_) => Status::already_exists(message),
        SkillError::Refused(_) => Status::failed_precondition(message),
        SkillError::Retry(_) => Status::aborted(message),
        SkillError::Registry(err) => crate::registry_service::status(err),
        SkillError::Internal(_) => {
            tracing::error!(error = %message, "skill request failed");
            Status::internal(message)
        }
    }
}

fn skill_name(raw: &str) -> Result<SkillName, Status> {
    SkillName::new(raw).map_err(|e| Status::invalid_argument(format!("name: {e}")))
}

fn skill_to_wire(view: SkillView) -> pb::Skill {
    let SkillView {
        record,
        tree,
        problem,
    } = view;
    let (origin_workspace, origin_node) = match &record.origin {
        SkillOrigin::System => (String::new(), String::new()),
        SkillOrigin::Promoted { workspace, node } => (workspace.to_string(), node.to_string()),
    };
    let files = tree.as_ref().map_or(0, |tree| {
        tree.entries()
            .iter()
            .filter(|(_, e)| e.file_hash().is_some())
            .count() as u64
    });
    pb::Skill {
        name: record.name.to_string(),
        state: record.state.as_str().to_string(),
        origin: record.origin.kind().to_string(),
        origin_workspace,
        origin_node,
        version: record.version,
        content_hash: record.content_hash,
        created_unix_ms: record.created_ms,
        updated_unix_ms: record.updated_ms,
        files,
        bytes: tree.as_ref().map_or(0, |tree| tree.bytes()),
        problem,
    }
}

impl SkillsService {
    fn wire(&self, record: Skill) -> pb::Skill {
        skill_to_wire(skills::view(&self.hub, record))
    }
}

/// Checks the files of `skill add` into a skill tree (parents implied) and
/// its contents by registry path. Errors name the file and what is wrong.
pub fn tree_from_files(
    name: &SkillName,
    files: Vec<pb::SkillFile>,
) -> Result<(SkillTree, HashMap<RelPath, Vec<u8>>), Status> {
    let mut entries: BTreeMap<RelPath, Entry> = BTreeMap::new();
    let mut contents = HashMap::new();
    let mut total = 0u64;
    let top = name.registry_dir();
    for file in files {
        let shown = file.path.clone();
        let bad = |why: String| Status::invalid_argument(format!("file {shown:?}: {why}"));
        if file.path.is_empty() {
            return Err(bad("the path is empty".into()));
        }
        let path =
            RelPath::new(&format!("{name}/{}", file.path)).map_err(|e| bad(e.to_string()))?;
        for ancestor in path.ancestors().into_iter().filter(|a| *a != top) {
            match entries.get(&ancestor) {
                None => {
                    entries.insert(ancestor, Entry::Dir);
                }
                Some(Entry::Dir) => {}
                Some(_) => {
                    return Err(bad(format!(
                        "{} is listed as a file or symlink, not a directory",
                        ancestor.as_str().trim_start_matches(&format!("{name}/"))
                    )));
                }
            }
        }
        let entry = match file.kind {
            Some(pb::skill_file::Kind::Data(data)) => {
                total += data.len() as u64;
                if total > MAX_SKILL_BYTES {
                    return Err(Status::invalid_argument(format!(
                        "skill {name} is over {MAX_SKILL_BYTES} bytes of content"
                    )));
                }
                let entry = Entry::File {
                    hash: ContentHash::of(&data),
                    size: data.len() as u64,
                    executable: file.executable,
                };
                contents.insert(path.clone(), data);
                entry
            }
            Some(pb::skill_file::Kind::Symlink(target)) => {
                gm_core::entry::check_symlink_target(&target).map_err(bad)?;
                Entry::Symlink { target }
            }
            Some(pb::skill_file::Kind::Dir(_)) => Entry::Dir,
            None => return Err(bad("no kind: send data, a symlink or a dir".into())),
        };
        match entries.get(&path) {
            None => {
                entries.insert(path, entry);
            }
            Some(Entry::Dir) if entry == Entry::Dir => {}
            Some(_) => return Err(bad("listed twice, or as a directory of other files".into())),
        }
    }
    let tree = SkillTree::from_registry(name, entries.iter())
        .map_err(|e| Status::invalid_argument(format!("skill {name}: {e}")))?;
    Ok((tree, contents))
}

#[tonic::async_trait]
impl pb::skills_server::Skills for SkillsService {
    async fn list_skills(
        &self,
        request: Request<pb::ListSkillsRequest>,
    ) -> Result<Response<pb::ListSkillsResponse>, Status> {
        let include_removed = request.into_inner().include_removed;
        let records = self
            .hub
            .registry
            .skills(None)
            .await
            .map_err(crate::registry_service::status)?;
        let skills = records
            .into_iter()
            .filter(|r| include_removed || r.state != gm_registry::SkillState::Removed)
            .map(|r| self.wire(r))
            .collect();
        let hub = self.hub.clone();
        let candidates = tokio::task::spawn_blocking(move || {
            let mut out = Vec::new();
            for ((ws, name), candidate) in hub.skills.candidates() {
                let manifest = name.dir().join(gm_core::SKILL_MANIFEST).ok();
                let has_manifest =
                    manifest.is_some_and(|path| {
                        hub.db.entry(&ws, &path).ok().flatten().is_some_and(|v| {
                            v.entry.as_ref().is_some_and(|e| e.file_hash().is_some())
                        })
                    });
                let problem = match candidate.problem {
                    Some(problem) => problem,
                    None if !has_manifest => format!(
                        "no {} at its top: not promoted until it has one",
                        gm_core::SKILL_MANIFEST
                    ),
                    None => String::new(),
                };
                out.push(pb::Candidate {
                    workspace: ws.to_string(),
                    name: name.to_string(),
                    problem,
                    quiet_ms: candidate.last_change.elapsed().as_millis() as u64,
                });
            }
            out
        })
        .await
        .map_err(|e| Status::internal(e.to_string()))?;
        Ok(Response::new(pb::ListSkillsResponse { skills, candidates }))
    }

    async fn get_skill(
        &self,
        request: Request<pb::SkillRequest>,
    ) -> Result<Response<pb::SkillDetail>, Status> {
        let name = skill_name(&request.into_inner().name)?;
        let record = self
            .hub
            .registry
            .skill(&name)
            .await
            .map_err(crate::registry_service::status)?
            .ok_or_else(|| Status::not_found(format!("skill {name} is not in the registry")))?;
        let view = skills::view(&self.hub, record);
        let prefix = format!("{}/", name.dir());
        let entries = view
            .tree
            .as_ref()
            .map(|tree| {
                tree.entries()
                    .iter()
                    .map(|(path, entry)| {
                        let mut wire = pb::SkillEntry {
                            path: path
                                .as_str()
                                .strip_prefix(&prefix)
                                .unwrap_or(path.as_str())
                                .to_string(),
                            kind: entry.kind_name().to_string(),
                            ..Default::default()
                        };
                        match entry {
                            Entry::File {
                                hash,
                                size,
                                executable,
                            } => {
                                wire.size = *size;
                                wire.executable = *executable;
                                wire.hash = hash.as_bytes().to_vec();
                            }
                            Entry::Symlink { target } => wire.target = target.clone(),
                            Entry::Dir => {}
                        }
                        wire
                    })
                    .collect()
            })
            .unwrap_or_default();
        Ok(Response::new(pb::SkillDetail {
            skill: Some(skill_to_wire(view)),
            entries,
        }))
    }

    async fn add_skill(
        &self,
        request: Request<pb::AddSkillRequest>,
    ) -> Result<Response<pb::Skill>, Status> {
        let req = request.into_inner();
        let name = skill_name(&req.name)?;
        let (tree, contents) = tree_from_files(&name, req.files)?;
        let skill = skills::add(&self.hub, tree, contents)
            .await
            .map_err(status)?;
        Ok(Response::new(self.wire(skill)))
    }

    async fn promote_skill(
        &self,
        request: Request<pb::PromoteSkillRequest>,
    ) -> Result<Response<pb::Skill>, Status> {
        let req = request.into_inner();
        let ws = WorkspaceId::new(&req.workspace)
            .map_err(|e| Status::invalid_argument(format!("workspace: {e}")))?;
        let name = skill_name(&req.name)?;
        let skill = skills::promote(&self.hub, &ws, &name)
            .await
            .map_err(status)?;
        Ok(Response::new(self.wire(skill)))
    }

    async fn remove_skill(
        &self,
        request: Request<pb::SkillRequest>,
    ) -> Result<Response<pb::Skill>, Status> {
        let name = skill_name(&request.into_inner().name)?;
        let skill = skills::remove(&self.hub, &name).await.map_err(status)?;
        Ok(Response::new(self.wire(skill)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn data(path: &str, body: &str) -> pb::SkillFile {
        pb::SkillFile {
            path: path.into(),
            kind: Some(pb::skill_file::Kind::Data(body.as_bytes().to_vec())),
            executable: false,
        }
    }

    #[test]
    fn files_become_a_tree_with_implied_parents() {
        let name = SkillName::new("s").unwrap();
        let (tree, contents) = tree_from_files(
            &name,
            vec![
                data("SKILL.md", "# s"),
                data("docs/deep/a.md", "a"),
                pb::SkillFile {
                    path: "docs/link".into(),
                    kind: Some(pb::skill_file::Kind::Symlink("../SKILL.md".into())),
                    executable: false,
                },
            ],
        )
        .unwrap();
        let paths: Vec<&str> = tree.entries().iter().map(|(p, _)| p.as_str()).collect();
        assert_eq!(
            paths,
            [
                ".skills/s/SKILL.md",
                ".skills/s/docs",
                ".skills/s/docs/deep",
                ".skills/s/docs/deep/a.md",
                ".skills/s/docs/link"
            ]
        );
        assert_eq!(contents.len(), 2);
        assert!(tree.has_manifest());
    }

    #[test]
    fn bad_files_are_refused_naming_them() {
        let name = SkillName::new("s").unwrap();
        for (files, expect) in [
            (vec![data("../x", "x")], "\"../x\""),
            (vec![data("", "x")], "empty"),
            (vec![data("a", "x"), data("a/b", "y")], "\"a/b\""),
            (vec![data("a", "x"), data("a", "y")], "listed twice"),
            (
                vec![pb::SkillFile {
                    path: "x".into(),
                    kind: None,
                    executable: false,
                }],
                "no kind",
            ),
        ] {
            let err = tree_from_files(&name, files).unwrap_err();
            assert_eq!(err.code(), tonic::Code::InvalidArgument);
            assert!(
                err.message().contains(expect),
                "{expect}: {}",
                err.message()
            );
        }
    }
}

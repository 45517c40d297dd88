//! `ghostmirror skill list|show|add|promote|remove`: the skill registry's
//! admin commands, each one call to the hub's skills service (same token as
//! sync), printed as a table or, with `--json`, as JSON. `add` reads a
//! local directory (symlinks are sent as links, never followed) and sends
//! its files; the hub checks them and registers the skill atomically.

use std::os::unix::fs::PermissionsExt;
use std::path::Path;

use clap::{Args, Subcommand};
use gm_proto::skills_pb as pb;
use pb::skills_client::SkillsClient;
use serde_json::{Value, json};

use crate::registry_cmd::{ClientArgs, channel, print_json, refused, time};

#[derive(Args)]
pub struct SkillArgs {
    #[command(flatten)]
    pub client: ClientArgs,
    #[command(subcommand)]
    pub command: SkillCommand,
}

#[derive(Subcommand)]
pub enum SkillCommand {
    /// List the skills, and the directories under `.skills/` that are not
    /// skills yet (promotion candidates, with why they wait).
    List {
        /// Removed skills too.
        #[arg(long, env = "GM_SKILL_LIST_ALL")]
        all: bool,
    },
    /// Show a skill and its files.
    Show { name: String },
    /// Register a system skill from a local directory (it must hold a
    /// SKILL.md); refused if the name is taken.
    Add {
        name: String,
        dir: std::path::PathBuf,
    },
    /// Promote `.skills/NAME/` of a workspace into the registry now.
    Promote { workspace: String, name: String },
    /// Remove a skill from the registry and every workspace (its files go
    /// to the hub's trash).
    Remove { name: String },
}

type Client = SkillsClient<crate::client::AuthedChannel>;

fn skill_json(s: &pb::Skill) -> Value {
    json!({
        "name": s.name,
        "state": s.state,
        "origin": s.origin,
        "origin_workspace": (!s.origin_workspace.is_empty()).then_some(&s.origin_workspace),
        "origin_node": (!s.origin_node.is_empty()).then_some(&s.origin_node),
        "version": s.version,
        "content_hash": s.content_hash,
        "files": s.files,
        "bytes": s.bytes,
        "created_unix_ms": s.created_unix_ms,
        "updated_unix_ms": s.updated_unix_ms,
        "problem": (!s.problem.is_empty()).then_some(&s.problem),
    })
}

fn origin_text(s: &pb::Skill) -> String {
    if s.origin == "promoted" {
        format!("promoted from {} by {}", s.origin_workspace, s.origin_node)
    } else {
        s.origin.clone()
    }
}

fn print_skill(s: &pb::Skill) {
    println!("skill     {}", s.name);
    println!("state     {}", s.state);
    println!("version   {}", s.version);
    println!("origin    {}", origin_text(s));
    println!(
        "content   {} ({} files, {} bytes)",
        s.content_hash, s.files, s.bytes
    );
    println!("created   {}", time(s.created_unix_ms));
    println!("updated   {}", time(s.updated_unix_ms));
    if !s.problem.is_empty() {
        println!("problem   {}", s.problem);
    }
}

/// Reads `dir` into the files of an AddSkill request: directories, regular
/// files (content and executable bit) and symlinks (as links). Anything
/// else, and names that are not UTF-8, stop it with the path named.
fn read_dir_files(dir: &Path) -> anyhow::Result<Vec<pb::SkillFile>> {
    let meta = std::fs::metadata(dir).map_err(|e| anyhow::anyhow!("{}: {e}", dir.display()))?;
    if !meta.is_dir() {
        anyhow::bail!("{} is not a directory", dir.display());
    }
    let mut files = Vec::new();
    let mut stack = vec![(dir.to_path_buf(), String::new())];
    while let Some((path, rel)) = stack.pop() {
        let mut entries: Vec<_> = std::fs::read_dir(&path)
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?
            .collect::<Result<_, _>>()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        entries.sort_by_key(|e| e.file_name());
        for entry in entries {
            let full = entry.path();
            let Some(name) = entry.file_name().to_str().map(str::to_string) else {
                anyhow::bail!("{}: the name is not UTF-8", full.display());
            };
            let child = if rel.is_empty() {
                name
            } else {
                format!("{rel}/{name}")
            };
            let meta = std::fs::symlink_metadata(&full)
                .map_err(|e| anyhow::anyhow!("{}: {e}", full.display()))?;
            let kind = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&full)
                    .map_err(|e| anyhow::anyhow!("{}: {e}", full.display()))?;
                let Some(target) = target.to_str().map(str::to_string) else {
                    anyhow::bail!("{}: the link target is not UTF-8", full.display());
                };
                pb::skill_file::Kind::Symlink(target)
            } else if meta.is_dir() {
                stack.push((full.clone(), child.clone()));
                pb::skill_file::Kind::Dir(true)
            } else if meta.is_file() {
                let data =
                    std::fs::read(&full).map_err(|e| anyhow::anyhow!("{}: {e}", full.display()))?;
                pb::skill_file::Kind::Data(data)
            } else {
                anyhow::bail!(
                    "{}: not a file, directory or symlink; a skill cannot hold it",
                    full.display()
                );
            };
            files.push(pb::SkillFile {
                path: child,
                executable: meta.is_file() && meta.permissions().mode() & 0o100 != 0,
                kind: Some(kind),
            });
        }
    }
    Ok(files)
}

pub async fn run(args: SkillArgs) -> anyhow::Result<()> {
    let json = args.client.json;
    let mut client: Client = SkillsClient::new(channel(&args.client).await?)
        .max_decoding_message_size(gm_proto::MAX_MESSAGE_BYTES)
        .max_encoding_message_size(gm_proto::MAX_MESSAGE_BYTES);
    match args.command {
        SkillCommand::List { all } => {
            let got = client
                .list_skills(pb::ListSkillsRequest {
                    include_removed: all,
                })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                return print_json(&json!({
                    "skills": got.skills.iter().map(skill_json).collect::<Vec<_>>(),
                    "candidates": got.candidates.iter().map(|c| json!({
                        "workspace": c.workspace,
                        "name": c.name,
                        "quiet_ms": c.quiet_ms,
                        "problem": (!c.problem.is_empty()).then_some(&c.problem),
                    })).collect::<Vec<_>>(),
                }));
            }
            if got.skills.is_empty() {
                println!("no skills");
            } else {
                println!(
                    "{:<24} {:<9} {:>7} {:>6} {:>9}  ORIGIN",
                    "NAME", "STATE", "VERSION", "FILES", "BYTES"
                );
            }
            for s in &got.skills {
                let problem = if s.problem.is_empty() {
                    String::new()
                } else {
                    format!("  ! {}", s.problem)
                };
                println!(
                    "{:<24} {:<9} {:>7} {:>6} {:>9}  {}{problem}",
                    s.name,
                    s.state,
                    s.version,
                    s.files,
                    s.bytes,
                    origin_text(s)
                );
            }
            if !got.candidates.is_empty() {
                println!("\ncandidates (directories under .skills/ that are not skills):");
                for c in &got.candidates {
                    let why = if c.problem.is_empty() {
                        format!("quiet for {} ms", c.quiet_ms)
                    } else {
                        c.problem.clone()
                    };
                    println!("  {}/.skills/{}  {why}", c.workspace, c.name);
                }
            }
        }
        SkillCommand::Show { name } => {
            let got = client
                .get_skill(pb::SkillRequest { name })
                .await
                .map_err(refused)?
                .into_inner();
            let skill = got.skill.unwrap_or_default();
            if json {
                let mut value = skill_json(&skill);
                value["entries"] = got
                    .entries
                    .iter()
                    .map(|e| {
                        json!({
                            "path": e.path,
                            "kind": e.kind,
                            "size": e.size,
                            "executable": e.executable,
                            "target": (!e.target.is_empty()).then_some(&e.target),
                        })
                    })
                    .collect();
                return print_json(&value);
            }
            print_skill(&skill);
            for e in &got.entries {
                match e.kind.as_str() {
                    "symlink" => println!("  {} -> {}", e.path, e.target),
                    "dir" => println!("  {}/", e.path),
                    _ => println!(
                        "  {}  {} bytes{}",
                        e.path,
                        e.size,
                        if e.executable { ", executable" } else { "" }
                    ),
                }
            }
        }
        SkillCommand::Add { name, dir } => {
            let files = read_dir_files(&dir)?;
            let skill = client
                .add_skill(pb::AddSkillRequest { name, files })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                return print_json(&skill_json(&skill));
            }
            println!(
                "added skill {} (version {}, {} files)",
                skill.name, skill.version, skill.files
            );
        }
        SkillCommand::Promote { workspace, name } => {
            let skill = client
                .promote_skill(pb::PromoteSkillRequest { workspace, name })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                return print_json(&skill_json(&skill));
            }
            println!(
                "promoted skill {} (version {}, {})",
                skill.name,
                skill.version,
                origin_text(&skill)
            );
        }
        SkillCommand::Remove { name } => {
            let skill = client
                .remove_skill(pb::SkillRequest { name })
                .await
                .map_err(refused)?
                .into_inner();
            if json {
                return print_json(&skill_json(&skill));
            }
            println!("removed skill {} (version {})", skill.name, skill.version);
        }
    }
    Ok(())
}

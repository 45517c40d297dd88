//! Skill records on both backends: reservation, activation, roll-back,
//! removal, re-registration, and one winner when requests race for a name.

mod common;

use gm_core::{NodeId, SkillName, WorkspaceId};
use gm_registry::{NewSkill, Registry, RegistryError, SkillOrigin, SkillState};

suite!(
    skills_reserve_activate_remove,
    skill_reservations_roll_back,
    racing_reservations_have_one_winner,
);

fn name(raw: &str) -> SkillName {
    SkillName::new(raw).expect("skill name")
}

fn system(raw: &str, hash: &str) -> NewSkill {
    NewSkill {
        name: name(raw),
        origin: SkillOrigin::System,
        content_hash: hash.to_string(),
        hub_id: "hub-1".into(),
    }
}

fn promoted(raw: &str, hash: &str) -> NewSkill {
    NewSkill {
        name: name(raw),
        origin: SkillOrigin::Promoted {
            workspace: WorkspaceId::new("ws-1").expect("ws"),
            node: NodeId::new("node-a").expect("node"),
        },
        content_hash: hash.to_string(),
        hub_id: "hub-1".into(),
    }
}

async fn skills_reserve_activate_remove(registry: &Registry) {
    let reserved = registry
        .reserve_skill(&system("review", "h1"))
        .await
        .expect("reserve");
    assert_eq!(reserved.state, SkillState::Reserved);
    assert_eq!(reserved.version, 1);
    assert_eq!(reserved.origin, SkillOrigin::System);
    // The name is taken from the moment it is reserved.
    let err = registry
        .reserve_skill(&promoted("review", "h2"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::AlreadyExists { .. }), "{err}");
    assert!(err.to_string().contains("review"), "{err}");
    let active = registry
        .activate_skill(&name("review"))
        .await
        .expect("activate");
    assert_eq!(active.state, SkillState::Active);
    assert_eq!(active.content_hash, "h1");
    let err = registry
        .reserve_skill(&system("review", "h3"))
        .await
        .unwrap_err();
    assert!(matches!(err, RegistryError::AlreadyExists { .. }), "{err}");
    // Activating twice is refused, naming the state.
    let err = registry.activate_skill(&name("review")).await.unwrap_err();
    assert!(err.to_string().contains("is active, not reserved"), "{err}");

    let other = registry
        .reserve_skill(&promoted("notes", "h4"))
        .await
        .expect("reserve");
    assert_eq!(
        other.origin.to_string(),
        "promoted from workspace ws-1 by node node-a"
    );
    let listed: Vec<String> = registry
        .skills(None)
        .await
        .expect("list")
        .iter()
        .map(|s| format!("{}:{}", s.name, s.state))
        .collect();
    assert_eq!(listed, ["notes:reserved", "review:active"]);
    let active_only = registry
        .skills(Some(SkillState::Active))
        .await
        .expect("list");
    assert_eq!(active_only.len(), 1);

    // Removed: the name may be taken again, with the next version.
    let removed = registry
        .remove_skill(&name("review"))
        .await
        .expect("remove");
    assert_eq!(removed.state, SkillState::Removed);
    let again = registry
        .reserve_skill(&promoted("review", "h5"))
        .await
        .expect("re-register");
    assert_eq!(again.version, 2);
    assert_eq!(again.content_hash, "h5");
    assert!(matches!(again.origin, SkillOrigin::Promoted { .. }));
    let replaced = {
        registry
            .activate_skill(&name("review"))
            .await
            .expect("activate");
        registry
            .replace_skill_content(&name("review"), "h6")
            .await
            .expect("replace")
    };
    assert_eq!(
        (replaced.version, replaced.content_hash.as_str()),
        (3, "h6")
    );
    let err = registry.remove_skill(&name("missing")).await.unwrap_err();
    assert!(matches!(err, RegistryError::NotFound { .. }), "{err}");
}

async fn skill_reservations_roll_back(registry: &Registry) {
    registry
        .reserve_skill(&system("a", "h"))
        .await
        .expect("reserve");
    assert!(registry.release_skill(&name("a")).await.expect("release"));
    assert_eq!(
        registry.skill(&name("a")).await.expect("get"),
        None,
        "first registration forgotten"
    );
    assert!(
        !registry
            .release_skill(&name("a"))
            .await
            .expect("release again")
    );
    // A re-registration that is rolled back goes back to removed.
    registry
        .reserve_skill(&system("b", "h"))
        .await
        .expect("reserve");
    registry.activate_skill(&name("b")).await.expect("activate");
    registry.remove_skill(&name("b")).await.expect("remove");
    registry
        .reserve_skill(&system("b", "h2"))
        .await
        .expect("reserve again");
    assert!(registry.release_skill(&name("b")).await.expect("release"));
    let b = registry.skill(&name("b")).await.expect("get").expect("row");
    assert_eq!(b.state, SkillState::Removed);
    // An active skill is not released.
    registry
        .reserve_skill(&system("c", "h"))
        .await
        .expect("reserve");
    registry.activate_skill(&name("c")).await.expect("activate");
    assert!(!registry.release_skill(&name("c")).await.expect("release"));
    assert_eq!(
        registry
            .skill(&name("c"))
            .await
            .expect("get")
            .map(|s| s.state),
        Some(SkillState::Active)
    );
}

/// Many concurrent reservations of the same names: each name has exactly
/// one winner, every other request gets `AlreadyExists`.
async fn racing_reservations_have_one_winner(registry: &Registry) {
    let names: Vec<String> = (0..20).map(|i| format!("race-{i}")).collect();
    let attempts = names.iter().flat_map(|raw| {
        (0..6).map(move |contender| async move {
            let new = if contender % 2 == 0 {
                system(raw, &format!("sys-{contender}"))
            } else {
                promoted(raw, &format!("node-{contender}"))
            };
            (raw.clone(), registry.reserve_skill(&new).await)
        })
    });
    let outcomes = futures::future::join_all(attempts).await;
    for raw in &names {
        let mine: Vec<_> = outcomes.iter().filter(|(n, _)| n == raw).collect();
        let winners: Vec<&gm_registry::Skill> =
            mine.iter().filter_map(|(_, r)| r.as_ref().ok()).collect();
        assert_eq!(winners.len(), 1, "{raw}: {mine:?}");
        for (_, outcome) in &mine {
            if let Err(err) = outcome {
                assert!(matches!(err, RegistryError::AlreadyExists { .. }), "{err}");
            }
        }
        let stored = registry.skill(&name(raw)).await.expect("get").expect("row");
        assert_eq!(
            stored.content_hash, winners[0].content_hash,
            "the winner's intent is kept"
        );
    }
}

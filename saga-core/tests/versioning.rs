//! Definition versions side by side, typed upgrades, and the resume check
//! users run in CI before deploying a new version.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use saga_core::memory::InMemoryStore;
use saga_core::testkit::assert_resumable;
use saga_core::{
    Command, DefinitionError, Engine, EngineError, Event, Handled, Message, ReplyOutcome, SagaDefinition, SagaStatus,
    SagaStore, Step, Upgrade, decide,
};

#[derive(Clone, Serialize, Deserialize)]
struct V1 {
    total: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct V2 {
    total_cents: u64,
    audited: bool,
}

fn v1() -> SagaDefinition<V1> {
    SagaDefinition::builder("payment")
        .step(
            Step::remote("charge", |_: &V1| Ok(Command::json("Charge", "bank", &())?)).on_reply(
                "Charged",
                |_: &mut V1, ok: bool| {
                    if ok {
                        ReplyOutcome::Success
                    } else {
                        ReplyOutcome::Failure("declined".into())
                    }
                },
            ),
        )
        .build()
        .expect("v1")
}

fn v2() -> SagaDefinition<V2> {
    SagaDefinition::builder("payment")
        .version(2)
        .data_version(2)
        .step(
            Step::remote("charge", |_: &V2| Ok(Command::json("Charge", "bank", &())?)).on_reply(
                "Charged",
                |_: &mut V2, ok: bool| {
                    if ok {
                        ReplyOutcome::Success
                    } else {
                        ReplyOutcome::Failure("declined".into())
                    }
                },
            ),
        )
        .step(Step::local("audit", |data: &mut V2, _| {
            data.audited = true;
            Ok(())
        }))
        .build()
        .expect("v2")
}

fn upgrade() -> Upgrade {
    Upgrade::new("payment", 1, 2, |old: V1| V2 {
        total_cents: (old.total * 100.0).round() as u64,
        audited: false,
    })
}

#[tokio::test]
async fn an_upgrade_moves_an_instance_in_flight_to_the_new_version() {
    let store = InMemoryStore::new();
    let old = Engine::builder(Arc::new(store.clone()))
        .register(v1())
        .build()
        .expect("engine");
    let id = old.start("payment", V1 { total: 21.5 }).await.expect("start");

    let new = Engine::builder(Arc::new(store.clone()))
        .register(v2())
        .upgrade(upgrade())
        .build()
        .expect("engine");
    let reply = Message::json("Charged", "r", &true)
        .expect("json")
        .with_correlation_id(id.to_string());
    new.handle(&reply).await.expect("handle");

    let instance = store.load(id).await.expect("load").expect("exists");
    assert_eq!(instance.definition_version, 2, "the instance continues under v2");
    assert_eq!(instance.data_version, 2);
    assert_eq!(instance.status, SagaStatus::Completed, "and runs v2's extra step");
    let data: V2 = serde_json::from_str(&instance.data).expect("v2 data");
    assert_eq!(
        data,
        V2 {
            total_cents: 2150,
            audited: true
        }
    );
}

#[tokio::test]
async fn the_resume_check_names_what_would_break() {
    let store = InMemoryStore::new();
    let old = Engine::builder(Arc::new(store.clone()))
        .register(v1())
        .build()
        .expect("engine");
    let id = old.start("payment", V1 { total: 3.0 }).await.expect("start");
    let sample = store.load(id).await.expect("load").expect("exists");

    // Without the upgrade, v2 alone cannot run a v1 instance.
    let v2_only = Engine::builder(Arc::new(InMemoryStore::new()))
        .register(v2())
        .build()
        .expect("engine");
    assert!(matches!(
        v2_only.check_resumable(&sample),
        Err(EngineError::UnknownDefinition { version: 1, .. })
    ));

    let with_upgrade = Engine::builder(Arc::new(InMemoryStore::new()))
        .register(v2())
        .upgrade(upgrade())
        .build()
        .expect("engine");
    let upgraded = with_upgrade.check_resumable(&sample).expect("resumable");
    assert_eq!(upgraded.definition_version, 2);
    assert_resumable(&with_upgrade, std::slice::from_ref(&sample));

    let mut corrupt = sample.clone();
    corrupt.data = r#"{"total":"lots"}"#.to_owned();
    assert!(matches!(
        with_upgrade.check_resumable(&corrupt),
        Err(EngineError::Decode { .. })
    ));

    let mut lost = sample.clone();
    lost.step = 7;
    assert!(
        matches!(with_upgrade.check_resumable(&lost), Err(EngineError::NotResumable { reason, .. }) if reason.contains("step 7"))
    );
    let both_versions = Engine::builder(Arc::new(InMemoryStore::new()))
        .register(v1())
        .register(v2())
        .build()
        .expect("engine");
    assert_resumable(&both_versions, &[sample]);
}

#[test]
fn an_upgrade_must_lead_to_a_registered_newer_version() {
    let to_nowhere = Engine::builder(Arc::new(InMemoryStore::new()))
        .register(v1())
        .upgrade(upgrade())
        .build();
    assert!(matches!(
        to_nowhere,
        Err(DefinitionError::BadUpgrade { from: 1, to: 2, .. })
    ));
    let backwards = Engine::builder(Arc::new(InMemoryStore::new()))
        .register(v1())
        .upgrade(Upgrade::new("payment", 2, 1, |v: V2| V1 {
            total: v.total_cents as f64 / 100.0,
        }))
        .build();
    assert!(matches!(backwards, Err(DefinitionError::BadUpgrade { .. })));
    let twice = Engine::builder(Arc::new(InMemoryStore::new()))
        .register(v1())
        .register(v2())
        .upgrade(upgrade())
        .upgrade(upgrade())
        .build();
    assert!(matches!(twice, Err(DefinitionError::DuplicateUpgrade { from: 1, .. })));
}

#[test]
fn an_upgrade_that_would_leave_an_awaited_reply_unhandled_is_refused() {
    // v2 renames the reply `charge` waits for: a v1 instance waiting for
    // `Charged` would be upgraded before its reply is decided, then ignore it.
    let renamed = SagaDefinition::builder("payment")
        .version(2)
        .data_version(2)
        .step(
            Step::remote("charge", |_: &V2| Ok(Command::json("Charge", "bank", &())?))
                .on_reply("PaymentTaken", |_: &mut V2, _: bool| ReplyOutcome::Success),
        )
        .build()
        .expect("v2");
    let refused = Engine::builder(Arc::new(InMemoryStore::new()))
        .register(v1())
        .register(renamed)
        .upgrade(upgrade())
        .build();
    assert!(
        matches!(&refused, Err(DefinitionError::UpgradeDropsReply { step, kind, from: 1, to: 2, .. })
            if step == "charge" && kind == "Charged"),
        "{:?}",
        refused.err()
    );
    // Kept by the step the instance lands on: accepted.
    assert!(
        Engine::builder(Arc::new(InMemoryStore::new()))
            .register(v1())
            .register(v2())
            .upgrade(upgrade())
            .build()
            .is_ok()
    );
}

#[tokio::test]
async fn an_instance_past_its_definitions_steps_is_refused_not_run_off_the_end() {
    let store = InMemoryStore::new();
    let engine = Engine::builder(Arc::new(store.clone()))
        .register(v1())
        .build()
        .expect("engine");
    let id = engine.start("payment", V1 { total: 3.0 }).await.expect("start");
    let sample = store.load(id).await.expect("load").expect("exists");
    let reply = Message::json("Charged", "r", &true)
        .expect("json")
        .with_correlation_id(id.to_string());

    // Rows a redeploy that dropped steps without a new version leaves behind:
    // compensating from there used to index past the steps (a panic), and
    // running there used to complete the saga without a word.
    for status in [
        SagaStatus::Running,
        SagaStatus::Compensating,
        SagaStatus::NeedsAttention,
    ] {
        let mut lost = sample.clone();
        lost.status = status;
        lost.step = 7;
        let decided = decide(&v1(), &lost, Event::Message(&reply), sample.updated_at);
        assert!(
            matches!(&decided, Err(EngineError::NotResumable { reason, .. }) if reason.contains("step 7")),
            "{status:?} at step 7 must be refused"
        );
    }
    // The last step's end is a place to compensate from.
    let mut compensating = sample.clone();
    compensating.status = SagaStatus::Compensating;
    compensating.step = 1;
    assert!(decide(&v1(), &compensating, Event::Message(&reply), sample.updated_at).is_ok());
}

/// Version 3 of `payment`: the bank's reply renamed, correlated by key.
fn v3_renamed() -> SagaDefinition<V1> {
    SagaDefinition::builder("payment")
        .version(3)
        .key(|_: &V1| "the-only-payment".to_owned())
        .step(
            Step::remote("charge", |_: &V1| Ok(Command::json("Charge", "bank", &())?)).on_reply_keyed(
                "PaymentCharged",
                |_: &String| "the-only-payment".to_owned(),
                |_: &mut V1, _: String| ReplyOutcome::Success,
            ),
        )
        .build()
        .expect("v3")
}

#[tokio::test]
async fn replies_of_an_older_version_still_reach_its_instances() {
    let store = InMemoryStore::new();
    let old = Engine::builder(Arc::new(store.clone()))
        .register(v1())
        .build()
        .expect("engine");
    let id = old.start("payment", V1 { total: 4.0 }).await.expect("start");
    // Deployed side by side: v3 renamed the reply and correlates by key.
    let both = Engine::builder(Arc::new(store.clone()))
        .register(v1())
        .register(v3_renamed())
        .build()
        .expect("engine");
    let fresh = both.start("payment", V1 { total: 5.0 }).await.expect("start v3");
    let charged = Message::json("Charged", "r", &true)
        .expect("json")
        .with_correlation_id(id.to_string());
    let handled = both.handle(&charged).await;
    assert!(
        matches!(handled, Ok(Handled::Applied { .. })),
        "v1's reply: {handled:?}"
    );
    let renamed = Message::json("PaymentCharged", "r", &"the-only-payment").expect("json");
    let handled = both.handle(&renamed).await;
    assert!(
        matches!(handled, Ok(Handled::Applied { .. })),
        "v3's reply: {handled:?}"
    );
    for saga in [id, fresh] {
        let instance = store.load(saga).await.expect("load").expect("exists");
        assert_eq!(
            instance.status,
            SagaStatus::Completed,
            "v{}",
            instance.definition_version
        );
    }
}

#[tokio::test]
async fn a_replica_without_the_newer_version_gives_its_replies_back() {
    // A deployment under way: a new replica starts v2 instances while an
    // old one still consumes the shared reply queue.
    let store = InMemoryStore::new();
    let new = Engine::builder(Arc::new(store.clone()))
        .register(v1())
        .register(v2())
        .build()
        .expect("engine");
    let id = new
        .start(
            "payment",
            V2 {
                total_cents: 100,
                audited: false,
            },
        )
        .await
        .expect("start");
    let old = Engine::builder(Arc::new(store.clone()))
        .register(v1())
        .build()
        .expect("engine");
    let reply = Message::json("Charged", "r", &true)
        .expect("json")
        .with_correlation_id(id.to_string());
    match old.handle(&reply).await {
        Err(
            e @ EngineError::NewerVersion {
                version: 2, newest: 1, ..
            },
        ) => {
            assert!(e.is_retryable(), "back to the queue for a replica that has v2");
        }
        other => panic!("expected NewerVersion, got {other:?}"),
    }
    assert!(matches!(new.handle(&reply).await, Ok(Handled::Applied { .. })));
}
